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
