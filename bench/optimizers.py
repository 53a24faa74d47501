"""The optimizers being compared, with the same hyperparameters for every implementation.

Two families: "sgd" (SGD with momentum and weight decay -- momentum makes the state figures
meaningful) and "adam". Per family: the original NVRM algorithm (the baseline), torch.optim
with foreach=True and with fused=True (the floor: the same update without noise), and
nvrm_ext's fused optimizer on each of its backends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import nvrm_ext
from nvrm_ext.original import OriginalVAdam, OriginalVSGD

FAMILIES = ("sgd", "adam")

SGD_HYPER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
ADAM_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
NOISE_HYPER = dict(variability=0.01, num_iters=1000)  # num_iters > rounds: every step is noisy
NOISE_SEED = 1234

# Minimal memory traffic of one fp32 step, bytes per parameter: what the update must read and
# write however it is implemented (regenerated noise costs no traffic). SGD with momentum reads
# p, g, buf and writes p, buf; Adam reads p, g, m, v and writes p, m, v.
MIN_TRAFFIC_BYTES_PER_FP32_PARAM = {"sgd": 5 * 4, "adam": 7 * 4}


@dataclass(frozen=True)
class Implementation:
    name: str                 # stable id: test ids, JSON, report columns
    kind: str                 # "original" | "torch" | "nvrm"
    backend: str | None       # nvrm_ext backend, or the torch.optim variant ("foreach"/"fused")
    capturable: bool = False  # nvrm_ext: counters and tables on the device
    graph: bool = False       # the step captured once in a CUDA graph and replayed (needs capturable)

    def label(self, family: str) -> str:
        base = {"sgd": "SGD", "adam": "Adam"}[family]
        if self.kind == "original":
            return f"OriginalV{base}"
        if self.kind == "torch":
            return f"torch {base}({self.backend})"
        mode = ", CUDA graph" if self.graph else ", capturable" if self.capturable else ""
        return f"FusedV{base}[{self.backend}{mode}]"

    def build(self, family: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """Construct the optimizer; raises if it cannot run on these parameters."""
        if self.capturable:
            return _BUILDERS[(self.kind, family)](params, self.backend, capturable=True)
        return _BUILDERS[(self.kind, family)](params, self.backend)

    def expected_state_bytes_per_param(self, family: str, dtype: torch.dtype) -> float | None:
        """The exact state size where it is exact, else None.

        Original: two noise buffers plus the base state; nvrm_ext: the base state only (the
        noise is regenerated). torch's Adam also keeps a scalar step tensor per parameter, so
        its figure depends on the tensor count and is not asserted.
        """
        if dtype != torch.float32 or self.capturable:  # capturable: + 5 float64 counters per tensor
            return None
        base = {"sgd": 4, "adam": 8}[family]
        if self.kind == "original":
            return base + 8
        if self.kind == "nvrm" or family == "sgd":
            return base
        return None


IMPLEMENTATIONS = (
    Implementation("original", "original", None),
    Implementation("torch-foreach", "torch", "foreach"),
    Implementation("torch-fused", "torch", "fused"),
    Implementation("nvrm-torch", "nvrm", "torch"),
    Implementation("nvrm-cpu", "nvrm", "cpu"),
    Implementation("nvrm-triton", "nvrm", "triton"),
    Implementation("nvrm-cuda", "nvrm", "cuda"),
    Implementation("nvrm-cpu-capturable", "nvrm", "cpu", capturable=True),
    Implementation("nvrm-cuda-capturable", "nvrm", "cuda", capturable=True),
    Implementation("nvrm-cuda-graph", "nvrm", "cuda", capturable=True, graph=True),
)


def _torch_flags(variant: str) -> dict:
    return {"foreach": dict(foreach=True), "fused": dict(fused=True)}[variant]


_BUILDERS: dict[tuple[str, str], Callable] = {
    ("original", "sgd"): lambda params, _: OriginalVSGD(params, **SGD_HYPER, **NOISE_HYPER),
    ("original", "adam"): lambda params, _: OriginalVAdam(params, **ADAM_HYPER, **NOISE_HYPER),
    ("torch", "sgd"): lambda params, variant: torch.optim.SGD(params, **SGD_HYPER, **_torch_flags(variant)),
    ("torch", "adam"): lambda params, variant: torch.optim.Adam(params, **ADAM_HYPER, **_torch_flags(variant)),
    ("nvrm", "sgd"): lambda params, backend, **flags: nvrm_ext.FusedVSGD(
        params, **SGD_HYPER, **NOISE_HYPER, seed=NOISE_SEED, backend=backend, **flags),
    ("nvrm", "adam"): lambda params, backend, **flags: nvrm_ext.FusedVAdam(
        params, **ADAM_HYPER, **NOISE_HYPER, seed=NOISE_SEED, backend=backend, **flags),
}


def skip_reason(impl: Implementation, device: torch.device) -> str | None:
    """Why `impl` is not benchmarked on `device` without trying it, or None."""
    if impl.backend == "triton" and device.type == "cpu":
        return ("Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), which is far "
                "too slow to benchmark")
    if impl.graph and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None
