"""C-level getters for the per-tensor scans of a step: a Python-level loop over the tensors
costs several times more than map() over these (bench/test_host_overhead.py)."""
from __future__ import annotations

import operator

import torch

GRAD = operator.attrgetter("grad")
VERSION = operator.attrgetter("_version")
DTYPE = operator.attrgetter("dtype")
SHAPE = operator.attrgetter("shape")
STRIDE = torch.Tensor.stride
DATA_PTR = torch.Tensor.data_ptr
PLAIN_TENSOR = {torch.Tensor}
increment_versions = torch._C._increment_version  # torch.autograd.graph.increment_version's C call: a list in one go

try:  # torch.compile's C++ tensor check (its guards' TensorGuards): private, so optional
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - a torch without it: the map() scans alone
    _TensorGuards = None
_guards_work = None  # whether _TensorGuards passed its self-test (_check_tensor_guards), once


def layout_guard(tensors, shapes: list, strides: list):
    """A check of `tensors` made in one C++ call: each still a plain torch.Tensor (exact type)
    with exactly these shapes and strides and the dtype, device, dispatch keys and
    requires_grad it has now -- what steady_grad_pointers compares with four map() scans
    (type, dtype, shape, strides): about 80 ns a tensor instead of about 400 with the list
    comparisons, which took a steady FusedVSGD step from 1.12x to 0.97x torch's fused SGD at
    148 tensors and from 0.99x to 0.87x at 2,000 (bench/ab_host.py). Returns an object whose
    check(*tensors) is True only when all of that holds (a False may be spurious: the caller
    then scans), or None where this torch lacks TensorGuards or it fails its self-test."""
    global _guards_work
    if _guards_work is None:
        _guards_work = _check_tensor_guards()
    if not _guards_work:
        return None
    try:
        return _TensorGuards(*tensors, dynamic_dims_sizes=[list(s) for s in shapes],
                             dynamic_dims_strides=[list(s) for s in strides])
    except Exception:  # noqa: BLE001 - a signature this torch does not take: scan instead
        return None


def guard_passes(guard, tensors) -> bool:
    """guard.check(*tensors), False where it refuses the arguments (a length it was not made for)."""
    try:
        return guard.check(*tensors)
    except (TypeError, RuntimeError):
        return False


def _check_tensor_guards() -> bool:
    """Whether _TensorGuards tells apart every change the steady step must notice (it is
    private to torch.compile: a torch that checks less must not be trusted)."""
    if _TensorGuards is None:
        return False
    try:
        base = torch.zeros(2, 3)
        guard = _TensorGuards(base, dynamic_dims_sizes=[[2, 3]], dynamic_dims_strides=[[3, 1]])
        changed = [torch.zeros(3, 2), torch.zeros(6), torch.zeros(3, 2).t(), torch.zeros(2, 3, dtype=torch.float64),
                   torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3, dtype=torch.float16),
                   torch.nn.Parameter(torch.zeros(2, 3)), torch.zeros(2, 3).to_sparse(),
                   torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3, device="meta"), None, 0.0]
        return guard.check(torch.ones(2, 3)) is True and not any(guard_passes(guard, (t,)) for t in changed)
    except Exception:  # noqa: BLE001 - any failure: not trusted
        return False
