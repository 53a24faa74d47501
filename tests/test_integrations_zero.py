"""nvrm_ext.integrations.zero.denoised with ZeroRedundancyOptimizer on 2 gloo processes."""
from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist

from nvrm_ext import FusedVSGD
from test_integrations_reference import clean_reference

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")]

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, tmp_path, timeout=120):
    """Run worker(rank, tmp_path) in WORLD spawned processes of one gloo group; fail with the
    ranks' tracebacks, or if any rank does not finish within `timeout` seconds."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, rank, port, str(tmp_path))) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
    errors = [(tmp_path / f"error{rank}.txt") for rank in range(WORLD)]
    messages = "\n".join(e.read_text() for e in errors if e.exists())
    assert not hung, f"ranks {hung} did not finish in {timeout} s\n{messages}"
    assert all(proc.exitcode == 0 for proc in procs), messages or [proc.exitcode for proc in procs]


def _entry(worker, rank, port, tmp_path):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        worker(rank, tmp_path)
    except BaseException:
        with open(os.path.join(tmp_path, f"error{rank}.txt"), "w") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def make(steps):
    """A model trained `steps` steps by ZeRO(FusedVSGD) on the same data on every rank."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=FusedVSGD, lr=0.1, variability=0.05,
                                   num_iters=1000, momentum=0.9, seed=11)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)

    def step():
        zero.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        zero.step()

    for _ in range(steps):
        step()
    return model, zero, step


def same_on_every_rank(tensors) -> bool:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def _denoised_worker(rank, tmp_path):
    from nvrm_ext.integrations.zero import denoised

    model, zero, step = make(3)
    params = list(model.parameters())
    noisy = [p.detach().clone() for p in params]
    assert same_on_every_rank(noisy)
    owned = [p for p in params if zero._param_to_rank[p] == rank]
    assert owned and len(owned) < len(params)  # each rank owns a part
    expected = clean_reference(zero.optim)  # this rank's own parameters, by the noise specification
    with denoised(zero):
        inside = [p.detach().clone() for p in params]
        for p in owned:
            torch.testing.assert_close(p.detach(), expected[p], rtol=0, atol=1e-7)
        assert same_on_every_rank(inside)  # so every rank holds every owner's clean values
        assert all(not torch.equal(a, b) for a, b in zip(inside, noisy))
        # what the local optimizer alone gives: only the local shard is clean
    assert all(torch.equal(p, q) for p, q in zip(params, noisy))  # the noisy weights, bit for bit
    with zero.optim.denoised():
        local_only = [p.detach().clone() for p in params]
    assert not same_on_every_rank(local_only)
    for _ in range(2):
        step()
    twin, _, _ = make(5)  # the same run without any denoised block
    assert all(torch.equal(p, q) for p, q in zip(params, twin.parameters()))


def test_denoised_gives_clean_weights_on_every_rank_and_training_continues_bit_for_bit(tmp_path):
    run_ranks(_denoised_worker, tmp_path)


def test_denoised_refuses_a_zero_without_an_nvrm_optimizer(tmp_path):
    run_ranks(_plain_worker, tmp_path)


def _plain_worker(rank, tmp_path):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from nvrm_ext.integrations.zero import denoised

    model = torch.nn.Linear(4, 2)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="not an nvrm_ext optimizer"):
        with denoised(zero):
            pass
