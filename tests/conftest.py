"""Test configuration.

Without a GPU, Triton kernels are tested on CPU tensors in Triton's interpreter, which must be
switched on before triton is first imported -- hence here, before any test module loads.
"""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
    _HAS_ROCM = _HAS_CUDA and bool(getattr(torch.version, "hip", None))  # ROCm: AMD GPUs as 'cuda' devices
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = _HAS_ROCM = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_rocm = pytest.mark.skip(reason="needs an AMD GPU under a ROCm build of torch")
    for item in items:
        if "cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_cuda)
        if "rocm" in item.keywords and not _HAS_ROCM:
            item.add_marker(skip_rocm)
