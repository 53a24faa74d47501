"""The Triton step kernel's paths, against the compiled CPU kernel and the torch reference.

The kernel has a vectorized path for rows flagged FLAG_ALIGNED and a lane-by-lane path for the
rest; both must give the CPU kernel's bits. Runs in Triton's interpreter here (conftest).
"""
import numpy as np
import pytest
import torch

import nvrm_ext
from nvrm_ext.backends import tables as T

pytest.importorskip("triton")
from nvrm_ext.backends.triton_support import device_guard  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def _amsgrad_with_a_nan_gradient(backend, dtype):
    """Three FusedVAdam(amsgrad) steps; the second gradient has NaNs, the third is finite again."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(37, generator=g, dtype=dtype)),
              torch.nn.Parameter(torch.randn(8, 16, generator=g, dtype=dtype))]
    opt = nvrm_ext.FusedVAdam(params, lr=1e-2, variability=0.01, amsgrad=True, weight_decay=0.1, seed=5,
                              backend=backend)
    history = []
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
            if step == 1:
                p.grad.view(-1)[::5] = float("nan")
        opt.step()
        history.append([(p.detach().clone(), opt.state[p]["max_exp_avg_sq"].clone()) for p in params])
    return history


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_amsgrad_keeps_a_nan_like_the_cpu_kernel_and_torch(dtype):
    """update.h and torch.maximum propagate NaN into max_exp_avg_sq; tl.maximum (max.f32) drops it."""
    runs = {backend: _amsgrad_with_a_nan_gradient(backend, dtype) for backend in ("triton", "cpu", "torch")}
    for step in range(3):
        for k in range(2):
            (triton_p, triton_v), (cpu_p, cpu_v), (torch_p, torch_v) = (runs[b][step][k] for b in runs)
            assert torch.equal(_bits(triton_v), _bits(cpu_v)), f"step {step}"
            if dtype == torch.float32:
                assert torch.equal(_bits(torch_v), _bits(cpu_v)), f"step {step}"
            else:  # weight decay carries the noise's ulps (torch's z) into float64 moments
                v_nan = torch.isnan(cpu_v)
                assert torch.equal(_bits(torch_v)[v_nan], _bits(cpu_v)[v_nan]), f"step {step}"
                torch.testing.assert_close(torch_v[~v_nan], cpu_v[~v_nan], rtol=1e-6, atol=0)
            assert bool(torch.isnan(cpu_v).any()) == (step >= 1)  # the NaN stays in the running maximum
            assert torch.equal(_bits(triton_p), _bits(cpu_p)), f"step {step}"
            nan = torch.isnan(cpu_p)
            assert torch.equal(torch.isnan(torch_p), nan)
            assert torch.equal(_bits(torch_p)[nan], _bits(cpu_p)[nan])  # elsewhere the noise differs in ulps
            torch.testing.assert_close(torch_p[~nan], cpu_p[~nan], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_aligned_and_unaligned_rows_match_the_cpu_kernel(optimizer, dtype):
    """Rows whose addresses, offset or size break 16-byte quads take the lane-by-lane path; the
    others the vector path. Both give the CPU kernel's bits, over steps that add and remove noise."""

    def run(backend):
        g = torch.Generator().manual_seed(7)
        storage = torch.randn(2000, generator=g).to(dtype)
        params = [torch.nn.Parameter(torch.randn(4096, generator=g).to(dtype)),  # aligned, several tiles
                  torch.nn.Parameter(storage[1:1 + 1032]),   # one element past an aligned address
                  torch.nn.Parameter(torch.randn(37, generator=g).to(dtype))]  # not whole quads
        kwargs = dict(lr=0.05, variability=0.02, num_iters=3, seed=9, backend=backend)
        if optimizer == "sgd":
            opt = nvrm_ext.FusedVSGD(params, momentum=0.9, nesterov=True, weight_decay=1e-3, **kwargs)
        else:
            opt = nvrm_ext.FusedVAdam(params, amsgrad=True, **kwargs)
        for _ in range(4):  # step 3 is a num_iters boundary: no new noise
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        flags = T.alignment_flags(np.array([[p.data_ptr(), p.grad.data_ptr(), 0, 0, 0, p.numel(), 0, 0, 0, 0, 0,
                                             0, 0, 0] for p in params], dtype=np.int64))
        return [p.detach().clone() for p in params], flags

    (by_triton, flags), (by_cpu, _) = run("triton"), run("cpu")
    assert flags.tolist() == [T.FLAG_ALIGNED, 0, 0]
    for a, b in zip(by_triton, by_cpu):
        assert torch.equal(_bits(a), _bits(b))


def test_alignment_flags_need_every_address_and_whole_quads():
    row = [1024, 2048, 4096, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0]
    cases = {"aligned": (row, True), "grad 8 bytes off": ({T.I_GRAD: 2056}, False),
             "state 4 bytes off": ({T.I_STATE1: 4100}, False), "comp 2 bytes off": ({T.I_COMP: 1026}, False),
             "numel not a multiple of 4": ({T.I_NUMEL: 66}, False), "shard offset 2": ({T.I_OFFSET: 2}, False),
             "shard offset 8": ({T.I_OFFSET: 8}, True)}
    for name, (change, aligned) in cases.items():
        ints = np.array([row], dtype=np.int64)
        if isinstance(change, dict):
            for column, value in change.items():
                ints[0, column] = value
        assert T.alignment_flags(ints).tolist() == [T.FLAG_ALIGNED if aligned else 0], name


def test_device_guard_leaves_cpu_launches_alone():
    """The interpreter's CPU tensors need no device switch, and asking must not touch CUDA (a
    CPU-only torch raises on any torch.cuda device query)."""
    with device_guard(torch.device("cpu")):
        pass
    assert type(device_guard(torch.device("cpu"))).__name__ == "nullcontext"
