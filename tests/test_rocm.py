"""AMD GPUs: a ROCm build of torch names them 'cuda' devices (torch.version.hip is set), where the
CUDA library's NVIDIA code cannot run and the Triton kernels can.

The choice of backend is checked here on any machine, with torch.version.hip set as a ROCm
build sets it (the rest of torch stays this build's, so nothing runs on a GPU). The
`rocm`-marked tests run the Triton path on a real AMD GPU and are skipped elsewhere: the weights
against the compiled CPU library (the fused backends agree bit for bit), NVRM's swap against the
torch reference, and one kernel launch per step.
"""
import logging
import types
import warnings

import pytest
import torch

import nvrm_ext
from nvrm_ext.backends import compiled, select

OPTIMIZERS = [
    (nvrm_ext.FusedVSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    (nvrm_ext.FusedVAdam, dict(lr=1e-2, weight_decay=1e-2)),
]


@pytest.fixture
def rocm_torch(monkeypatch):
    """torch.version.hip as a ROCm build has it; the once-only caches cleared around the test."""
    monkeypatch.setattr(torch.version, "hip", "6.4.43482", raising=False)
    caches = (compiled._cuda_library, select.note_once, select.warn_once)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


@pytest.fixture
def cuda_library_spy(monkeypatch):
    """The paths the CUDA library is opened from (compiled._open records them, then opens)."""
    opened = []
    real_open = compiled._open

    def recording_open(path):
        if path.name == compiled.CUDA_LIBRARY:
            opened.append(path)
        return real_open(path)

    monkeypatch.setattr(compiled, "_open", recording_open)
    return opened


def _optimizer(backend="auto"):
    with warnings.catch_warnings():  # a CPU bucket's own fallback is not what is tested here
        warnings.simplefilter("ignore")
        return nvrm_ext.FusedVSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, seed=0, backend=backend)


def test_auto_picks_triton_on_rocm_without_opening_the_cuda_library(rocm_torch, cuda_library_spy, caplog):
    opt = _optimizer()
    with caplog.at_level(logging.INFO, logger="nvrm_ext"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the best backend of the machine: no warning
        for dtype in (torch.float32, torch.bfloat16, torch.float32):
            assert opt._resolve_backend(torch.device("cuda", 0), dtype).name == "triton"
    assert cuda_library_spy == []
    notes = [r.getMessage() for r in caplog.records if r.name == "nvrm_ext"]
    assert len(notes) == 1, notes  # said once, not per bucket or per step
    assert "ROCm" in notes[0] and "Triton" in notes[0] and "NVIDIA" in notes[0]


def test_backend_cuda_on_rocm_is_refused_with_the_reason_and_the_fix(rocm_torch, cuda_library_spy):
    with pytest.raises(RuntimeError) as error:
        select.nvrm_backend("cuda", torch.device("cuda", 0), torch.float32)
    message = str(error.value)
    assert message.startswith("backend='cuda' cannot run torch.float32 parameters on cuda:0: ")
    assert "built for ROCm (HIP 6.4.43482)" in message and "AMD GPUs" in message
    assert "use backend='triton'" in message
    with pytest.raises(RuntimeError, match="built for ROCm"):  # a direct launch would not open it either
        compiled.load_cuda_library()
    assert cuda_library_spy == []
    assert select.nvrm_backend("triton", torch.device("cuda", 0), torch.float32).name == "triton"


def test_auto_on_nvidia_still_tries_the_cuda_library_first(cuda_library_spy):
    """The control: without torch.version.hip the CUDA library is consulted (and, on a machine
    without an NVIDIA driver, passed over with a warning)."""
    if not (compiled.LIB_DIR / compiled.CUDA_LIBRARY).is_file():
        pytest.skip("the CUDA library was not built")
    assert not select.rocm()
    compiled._cuda_library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backend = _optimizer()._resolve_backend(torch.device("cuda", 0), torch.float32)
        assert cuda_library_spy == [compiled.LIB_DIR / compiled.CUDA_LIBRARY]
        assert backend.name == ("cuda" if compiled._cuda_library()[0] is not None else "triton")
    finally:
        compiled._cuda_library.cache_clear()


def test_the_triton_launch_gives_every_thread_one_quad_on_64_thread_wavefronts(monkeypatch):
    """AMD's CDNA GPUs (MI200, MI300) run 64-thread wavefronts: the tile of a loop iteration
    doubles, so that every thread still moves its quad of 4 elements in one access."""
    from nvrm_ext.backends import triton as K

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(warp_size=64))
    K._warp_size.cache_clear()
    try:
        assert K._warp_size(torch.device("cuda", 0)) == 64
        assert K._warp_size(torch.device("cpu")) == 32  # the interpreter
    finally:
        K._warp_size.cache_clear()
    for warp_size in (32, 64):
        tiles = {v.constexprs["TILE"] for v in K.kernel_variants(warp_size) if "TILE" in v.constexprs}
        assert tiles == {4 * warp_size * K.NUM_WARPS}
    assert K.kernel_variants()[0].constexprs["TILE"] == K.TILE  # NVIDIA's, unchanged


# --- on an AMD GPU ---------------------------------------------------------------------------


def _train(cls, kwargs, device, backend, dtype, noise_type, steps=4):
    """The same parameters and gradients on any device (made on the CPU from one seed): the
    fused backends then give the same weights bit for bit."""
    data = torch.Generator().manual_seed(0)
    shapes = [(70, 33), (70,), (5, 70), (5,), (4099,)]  # 4099: a tail that is not a whole quad
    params = [torch.nn.Parameter(torch.randn(shape, generator=data).to(dtype).to(device)) for shape in shapes]
    opt = cls(params, **kwargs, num_iters=3, noise_type=noise_type, variability=0.05, seed=7, backend=backend)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=data).to(dtype).to(device)
        opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.rocm
def test_auto_is_triton_on_this_amd_gpu():
    from nvrm_ext.backends import triton as K
    import triton

    assert select.nvrm_backend("auto", torch.device("cuda", 0), torch.float32).name == "triton"
    # the tile follows the GPU's wavefront, as Triton's own driver reports it
    assert K._warp_size(torch.device("cuda", 0)) == triton.runtime.driver.active.get_current_target().warp_size


@pytest.mark.rocm
@pytest.mark.parametrize("noise_type", ["Gaussian", "Laplace", "Uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_fused_steps_on_the_amd_gpu_equal_the_cpu_library_bit_for_bit(cls, kwargs, dtype, noise_type):
    on_gpu = _train(cls, kwargs, "cuda", "auto", dtype, noise_type)
    on_cpu = _train(cls, kwargs, "cpu", "cpu", dtype, noise_type)
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert torch.equal(gpu, cpu)


@pytest.mark.rocm
@pytest.mark.parametrize("noise_type", ["Gaussian", "Uniform"])
def test_nvrm_swap_on_the_amd_gpu_agrees_with_the_torch_reference(noise_type):
    """NVRM(torch.optim.SGD) on the GPU, its swap by Triton ('auto') and by the torch reference:
    the same inner step, so the weights differ only by the reference's transforms (bit for bit
    with uniform noise, within 2e-6 otherwise, as on the CPU)."""
    runs = []
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 30).cuda()
        opt = nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), variability=0.05,
                            num_iters=3, noise_type=noise_type, seed=3, backend=backend)
        for step in range(4):
            x = torch.randn(6, 40, generator=torch.Generator().manual_seed(step)).cuda()
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        runs.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*runs):
        if noise_type == "Uniform":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


@pytest.mark.rocm
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_one_kernel_launch_per_step_on_the_amd_gpu(cls, kwargs):
    """All of a bucket's parameters in one launch: the profiler sees one GPU kernel per step."""
    from torch.profiler import ProfilerActivity, profile

    params = [torch.nn.Parameter(torch.randn(37 + 11 * i, device="cuda")) for i in range(40)]
    opt = cls(params, **kwargs, seed=1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step builds the launch data
    torch.cuda.synchronize()
    steps = 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert len(kernels) == steps, sorted({e.name for e in kernels})
