"""What the two Disout implementations share: the torch path (nvrm_ext.nn.disout) and the
fused Triton kernels (nvrm_ext.ops.disout_triton). Kept here, below both, so that neither
imports the other for it."""
from __future__ import annotations

import torch

DISTORTION_STD_FACTOR = 0.01  # the published code's fixed factor in alpha * 0.01 * std(x)


def input_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the whole tensor (0 for a single element instead of NaN)."""
    return x.var(correction=1 if x.numel() > 1 else 0).sqrt()
