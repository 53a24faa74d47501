"""nvrm_ext.integrations.zero.denoised with ZeroRedundancyOptimizer on 2 gloo processes.

The harness follows tests/test_distributed.py's rules against hangs: the ranks meet through a
FileStore in the test's directory (no port to race for), collectives have a timeout, a barrier
precedes destroy_process_group, a worker leaves with os._exit once it is done, and the parent
joins with a deadline and kills the ranks, failing with what each reported."""
from __future__ import annotations

import datetime
import multiprocessing
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from nvrm_ext import FusedVSGD
from test_integrations_reference import clean_reference

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")]

WORLD = 2
DEADLINE_S = 180


def run_ranks(worker, tmp_path):
    """Run worker(rank) in WORLD spawned processes of one gloo group; fail with the ranks'
    tracebacks, or if any rank has not finished by the deadline."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(worker, rank, str(tmp_path)), daemon=True) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + DEADLINE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = [tmp_path / f"error{rank}.txt" for rank in range(WORLD)]
    messages = "\n".join(e.read_text() for e in errors if e.exists())
    if hung or any(proc.exitcode != 0 for proc in procs):
        pytest.fail(f"ranks hung: {hung}, exit codes {[proc.exitcode for proc in procs]}\n{messages}")


def _entry(worker, rank, tmp_path):
    """One rank; leaves with os._exit (0: done; 1: the traceback is in error<rank>.txt)."""
    code = 1
    try:
        torch.set_num_threads(1)
        store = dist.FileStore(os.path.join(tmp_path, "store"), WORLD)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        worker(rank)
        dist.barrier()  # both ranks are done communicating before either tears down
        dist.destroy_process_group()
        code = 0
    except BaseException:
        with open(os.path.join(tmp_path, f"error{rank}.txt"), "w") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        os._exit(code)  # skip interpreter finalization with gloo's threads alive


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


def _worker(rank):
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
    assert all(torch.equal(p, q) for p, q in zip(params, noisy))  # the noisy weights, bit for bit
    with zero.optim.denoised():  # what the local optimizer alone gives: only its shard is clean
        local_only = [p.detach().clone() for p in params]
    assert not same_on_every_rank(local_only)
    for _ in range(2):
        step()
    twin, _, _ = make(5)  # the same run without any denoised block
    assert all(torch.equal(p, q) for p, q in zip(params, twin.parameters()))

    # a ZeRO around a plain torch optimizer is refused with a clear error
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = torch.nn.Linear(4, 2)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="not an nvrm_ext optimizer"):
        with denoised(zero):
            pass


def test_denoised_gives_clean_weights_on_every_rank_and_training_continues_bit_for_bit(tmp_path):
    """Also: a ZeRO around a plain torch optimizer is refused (one spawn for both checks)."""
    run_ranks(_worker, tmp_path)
