"""GPU-only checks of issue 11 (run by bench/gpu_check.sh): placement on a second GPU, the
capture refusals, replays after a launch-data rebuild, the per-device architecture probe, and
DDP over nccl. Graph replay, the GradScaler fused protocol and CUDA-vs-cpu bit-exactness are in
test_capturable.py and test_compiled.py.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import nvrm_ext
from nvrm_ext.backends import compiled
from nvrm_ext.optim import base

pytestmark = pytest.mark.cuda

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).to(device)


def _train(cls, backend, device, steps=4):
    model = _model(device)
    opt = cls(model.parameters(), lr=1e-2, seed=11, backend=backend)
    data = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(8, 32, generator=data).to(device)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torch.cuda.synchronize(device)
    return [p.detach().cpu() for p in model.parameters()]


@two_gpus
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cls", [nvrm_ext.FusedVSGD, nvrm_ext.FusedVAdam])
def test_parameters_on_the_second_gpu_while_the_first_is_current(cls, backend):
    with torch.cuda.device(0):
        expected = _train(cls, backend, "cuda:0")  # same GPU model: the same float results
        got = _train(cls, backend, "cuda:1")
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@two_gpus
def test_triton_disout_and_amp_run_on_their_tensors_gpu():
    from nvrm_ext.ops.disout_triton import disout_draws, disout_triton

    x = torch.randn(2, 3, 16, 16)
    with torch.cuda.device(1):
        reference = disout_triton(x.cuda(1), 0.1, 3, 1.0, 5).cpu()
        draws = [t.cpu() for t in disout_draws(x.shape, 0.1, 3, 5, "cuda:1")]
    with torch.cuda.device(0):
        assert torch.equal(disout_triton(x.cuda(1), 0.1, 3, 1.0, 5).cpu(), reference)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(draws, disout_draws(x.shape, 0.1, 3, 5, "cuda:1")))

    def amp_run(device):
        model = _model(device)
        opt = nvrm_ext.FusedAMP(model.parameters(), lr=0.1, epsilon=0.5, inner_iter=2, backend="triton")
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)).to(device)

        def closure():
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss
        opt.step(closure)
        torch.cuda.synchronize(device)
        return [p.detach().cpu() for p in model.parameters()]
    with torch.cuda.device(1):
        reference = amp_run("cuda:1")
    with torch.cuda.device(0):
        assert all(torch.equal(a, b) for a, b in zip(reference, amp_run("cuda:1")))


def test_auto_picks_the_compiled_kernels_on_this_gpu():
    capability = torch.cuda.get_device_capability(0)
    archs = compiled.build_info().get("cuda_archs")
    assert compiled.arch_runs(capability, archs), f"no code for {capability} in {archs}"
    opt = nvrm_ext.FusedVSGD([torch.nn.Parameter(torch.zeros(4, device="cuda"))], lr=0.1)
    assert opt._resolve_backend(torch.device("cuda"), torch.float32).name == "cuda"


def _captured_step(opt, model, x):
    """Capture zero_grad + backward + step after warm-up steps on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        model(x).square().mean().backward()
        opt.step()
    return graph


def test_host_mode_step_and_denoised_inside_a_capture_are_refused():
    model = _model("cuda")
    opt = nvrm_ext.FusedVSGD(model.parameters(), lr=0.1, seed=1, backend="cuda")
    x = torch.randn(8, 32, device="cuda")
    model(x).square().mean().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=False"):
        with torch.cuda.graph(graph):
            opt.step()
    with pytest.raises(RuntimeError, match="denoised"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            with opt.denoised():
                pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state[model[0].weight]["step"] == 1


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_replay_after_a_rebuild_touches_only_memory_it_keeps(backend):
    model = _model("cuda")
    opt = nvrm_ext.FusedVAdam(model.parameters(), lr=1e-3, seed=1, backend=backend, capturable=True)
    x = torch.randn(8, 32, device="cuda")
    graph = _captured_step(opt, model, x)
    graph.replay()
    weight = model[0].weight
    weight.data = weight.data.clone()  # the old storage is what the graph writes
    opt.zero_grad(set_to_none=False)
    model(x).square().mean().backward()
    base._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="capture them again"):
        opt.step()
    assert len(opt._retired_plans) == 1
    for _ in range(3):
        graph.replay()  # under compute-sanitizer: no invalid access
    torch.cuda.synchronize()
    assert torch.isfinite(weight).all()


_FOREIGN_FAULT = """
import torch, triton, triton.language as tl
import nvrm_ext

@triton.jit
def _fault(x_ptr, offset):
    tl.store(x_ptr + offset, 1.0)

p = torch.nn.Parameter(torch.zeros(64, device="cuda"))
opt = nvrm_ext.FusedVSGD([p], lr=0.1, seed=0, backend="cuda", capturable=True)
p.grad = torch.ones_like(p)
opt.step()  # the tables are on the device now: the next step launches without a torch call
_fault[(1,)](torch.zeros(1, device="cuda"), 1 << 40)  # someone else's kernel: illegal address
try:
    torch.cuda.synchronize()
except RuntimeError:
    pass
try:
    opt.step()
except RuntimeError as error:
    print(error)
"""


def test_an_earlier_foreign_cuda_error_is_not_blamed_on_our_launch():
    """A sticky error left by another kernel surfaces at our next launch: the message must say
    it came from earlier work, not that our kernel failed (in a subprocess: the context dies)."""
    done = subprocess.run([sys.executable, "-c", _FOREIGN_FAULT], capture_output=True, text=True, timeout=300)
    message = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert "illegal memory access" in message, message
    assert "kernel launch failed" not in message, message  # blamed on our launch (before the fix)


# ------------------------------------------------------------------ DDP over nccl
def _ddp_worker(rank, port, out_dir):
    import torch.distributed as dist

    import test_distributed as td
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        model = torch.nn.parallel.DistributedDataParallel(td._model().cuda(rank), device_ids=[rank])
        opt = td._optimizer("vsgd", model.parameters(), seed=1234 if rank == 0 else None)
        for step in range(td.STEPS):
            x, y = td._batch(step)
            shard = slice(rank * td.BATCH // 2, (rank + 1) * td.BATCH // 2)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[shard].cuda(rank)), y[shard].cuda(rank)).backward()
            opt.step()
        torch.save({"seed": opt.seed, "noisy": [p.detach().cpu() for p in model.parameters()]},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@two_gpus
def test_ddp_over_nccl_replicas_agree_and_match_one_process(tmp_path):
    import test_distributed as td

    mp.spawn(_ddp_worker, args=(td._free_port(), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert results[0]["seed"] == results[1]["seed"] == 1234
    assert all(torch.equal(a, b) for a, b in zip(results[0]["noisy"], results[1]["noisy"]))
    noisy, _ = td._single_process("vsgd")
    for got, want in zip(results[0]["noisy"], noisy):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
