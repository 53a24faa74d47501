"""The GPU path's host-side decisions, checked without a GPU (issue 11, section 1): which GPUs
the compiled CUDA code runs on, the warning when 'auto' cannot use it, launch data a captured
CUDA graph still reads, one device-to-host copy per bucket for a capturable state_dict, and the
refusal of host-mode steps inside a capture. The same behaviours on a real GPU: test_gpu.py.
"""
import warnings

import pytest
import torch

import nvrm_ext
from nvrm_ext.backends import compiled
from nvrm_ext.optim import base
from test_compiled import library_dir  # noqa: F401  (fixture: an empty nvrm_ext/_lib/)

BUILT = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]  # setup.py's default with CUDA 13


@pytest.mark.parametrize("capability,runs", [
    ((7, 0), False),   # V100: no sm_70 cubin, and the PTX is compute_90
    ((7, 5), True), ((8, 0), True), ((8, 6), True),
    ((8, 7), True),    # Orin: the sm_86 (and sm_80) cubin, same major, higher minor
    ((8, 9), True), ((9, 0), True),
    ((10, 0), True), ((12, 0), True),  # Blackwell: the compute_90 PTX, JIT-compiled
])
def test_arch_match_of_the_default_build(capability, runs):
    assert compiled.arch_runs(capability, BUILT) is runs


def test_arch_match_rules():
    assert not compiled.arch_runs((8, 0), ["sm_86"])            # a cubin never runs on a lower minor
    assert not compiled.arch_runs((9, 0), ["sm_80", "sm_86"])   # ... nor on another major
    assert compiled.arch_runs((9, 0), ["sm_80", "compute_80"])  # PTX runs on later majors
    assert not compiled.arch_runs((7, 5), ["compute_80"])       # ... not on earlier ones
    assert compiled.arch_runs((9, 0), ["sm_90a"]) and not compiled.arch_runs((10, 0), ["sm_90a"])
    assert compiled.arch_runs((10, 0), ["sm_100"]) and not compiled.arch_runs((10, 3), ["sm_100a"])
    assert not compiled.arch_runs((9, 0), [])


def _auto_on_cuda_warning():
    """The warning 'auto' gives when resolving a CUDA float32 bucket (None if silent)."""
    with warnings.catch_warnings():  # the CPU bucket's own fallback, when the CPU library is gone too
        warnings.simplefilter("ignore")
        opt = nvrm_ext.FusedVSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, seed=0)
    base._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = opt._resolve_backend(torch.device("cuda"), torch.float32)
    assert backend.name == "triton"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) <= 1
    return messages[0] if messages else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without an NVIDIA driver")
def test_auto_says_why_it_falls_back_from_cuda_to_triton_without_a_driver():
    """The real library on a machine without a driver fails exactly as under a too-old one."""
    if not (compiled.LIB_DIR / compiled.CUDA_LIBRARY).is_file():
        pytest.skip("the CUDA library was not built")
    version = compiled.build_info().get("cuda_version")
    message = _auto_on_cuda_warning()
    assert message is not None, "'auto' fell back from cuda to triton silently"
    assert "backend='auto' uses 'triton'" in message
    assert "CUDA driver version is insufficient for CUDA runtime version" in message
    built = f"CUDA {version}" if version else "the CUDA version it was built with"
    assert f"install an NVIDIA driver that supports {built}" in message


def test_auto_says_why_it_falls_back_when_the_cuda_library_cannot_load(library_dir):  # noqa: F811
    (library_dir / compiled.CUDA_LIBRARY).write_bytes(b"not an ELF file")
    message = _auto_on_cuda_warning()
    assert message is not None, "'auto' fell back from cuda to triton silently"
    assert "cuda: the CUDA library nvrm_ext/_lib/libnvrm_cuda.so cannot be used" in message
    assert message.endswith(": reinstall with pip install .")


def test_the_fix_for_an_old_glibc_is_named():
    error = "/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.34' not found"
    assert "build nvrm_ext on it" in compiled._cuda_fix(error)
    assert compiled._cuda_fix("some other error") == ""


# ------------------------------------------------------------------ capturable bookkeeping
def _capturable_run(capturable, steps=3):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype))
              for n, dtype in ((40, torch.float32), (7, torch.bfloat16), (300, torch.float32))]
    opt = nvrm_ext.FusedVSGD(params, lr=0.05, momentum=0.9, num_iters=2, seed=3, backend="cpu",
                             capturable=capturable)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return params, opt


def _count_host_reads(monkeypatch) -> tuple:
    """Lists that fill with every Tensor.item() (a scalar read) and Tensor.cpu() (a copy) until
    monkeypatch.undo(): on a GPU each is a device-to-host transfer."""
    reads, copies = [], []
    item, cpu = torch.Tensor.item, torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or item(t))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t) or cpu(t, *a, **k))
    return reads, copies


def test_capturable_state_dict_copies_each_bucket_once_and_reads_no_scalar(monkeypatch):
    _, host_opt = _capturable_run(capturable=False)
    _, opt = _capturable_run(capturable=True)
    reads, copies = _count_host_reads(monkeypatch)
    state_dict = opt.state_dict()
    monkeypatch.undo()
    assert reads == [], f"{len(reads)} scalar reads (each a device sync on a GPU)"
    assert len(copies) == len(opt._plans) == 2  # float32 and bfloat16 buckets
    assert state_dict["state"].keys() == host_opt.state_dict()["state"].keys()
    for index, expected in host_opt.state_dict()["state"].items():
        got = state_dict["state"][index]
        for key in ("step", "noise_step", "noise_type"):
            assert got[key] == expected[key] and type(got[key]) is int, key
        # the kernels keep the scale in float32: equal up to that rounding
        assert got["noise_scale"] == pytest.approx(expected["noise_scale"], rel=1e-7)
        assert type(got["noise_scale"]) is float
        assert torch.equal(got["momentum_buffer"], expected["momentum_buffer"])


def test_capturable_remove_noise_copies_each_bucket_once_and_reads_no_scalar(monkeypatch):
    """remove_noise() (and with it denoised(), the integrations' evaluation) reads the noise
    bookkeeping with one device-to-host copy per bucket, not one sync per parameter and counter,
    and removes the same noise as host mode."""
    host_params, host_opt = _capturable_run(capturable=False)
    params, opt = _capturable_run(capturable=True)
    reads, copies = _count_host_reads(monkeypatch)
    opt.remove_noise()
    monkeypatch.undo()
    assert reads == [], f"{len(reads)} scalar reads (each a device sync on a GPU)"
    assert len(copies) == len(opt._plans) == 2  # float32 and bfloat16 buckets
    host_opt.remove_noise()
    for p, q in zip(params, host_params):
        assert torch.equal(p, q)
    opt.restore_noise()
    host_opt.restore_noise()


def test_a_captured_plan_outlives_its_rebuild():
    """What a captured graph reads and writes (device tables, live counters, staging buffers,
    the old parameter storage) stays allocated after the launch data is rebuilt."""
    params, opt = _capturable_run(capturable=True, steps=1)
    plan = opt._plans[(params[0].device, torch.float32)]
    plan._graph_owned = True  # what an upload inside torch.cuda.graph() records
    read_by_graph = (plan.live, plan.device_ints, plan.device_floats, plan.blocks, params[0].data)
    addresses = [t.data_ptr() for t in read_by_graph]
    untouched = opt._plans[(params[1].device, torch.bfloat16)]
    params[0].data = params[0].data.clone()  # new storage: the float32 bucket is rebuilt
    params[1].data = params[1].data.clone()  # ... and the bfloat16 one, never captured
    for p in params:
        p.grad = torch.ones_like(p)
    base._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="graphs captured before still update the old copy"):
        opt.step()
    assert opt._plans[(params[0].device, torch.float32)] is not plan
    assert opt._retired_plans == [plan] and untouched not in opt._retired_plans
    kept = (plan.live, plan.device_ints, plan.device_floats, plan.blocks, plan._param_storages[0])
    assert [t.data_ptr() for t in kept] == addresses


def _pretend_capturing(monkeypatch):
    """torch's capture query answering True (a CPU machine cannot capture; test_gpu.py captures)."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_host_mode_step_under_capture_is_refused_before_anything_changes(monkeypatch):
    params, opt = _capturable_run(capturable=False, steps=2)
    before = [p.detach().clone() for p in params]
    state_before = opt.state_dict()
    _pretend_capturing(monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA graph capture of FusedVSGD.step\\(\\) with capturable=False"):
        opt.step()
    with pytest.raises(RuntimeError, match="CUDA graph capture of FusedVSGD.denoised\\(\\)"):
        with opt.denoised():
            pass
    with pytest.raises(RuntimeError, match="CUDA graph capture of FusedVSGD.clean_state_dict\\(\\)"):
        opt.clean_state_dict(torch.nn.Linear(1, 1))
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert opt.state_dict()["state"].keys() == state_before["state"].keys()
    for index, state in opt.state_dict()["state"].items():
        assert state["step"] == state_before["state"][index]["step"] == 2
