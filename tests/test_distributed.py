"""Data-parallel (DDP) and sharded (FSDP2) training on CPU with 2 gloo processes.

Replicas must draw the same noise (the seed is broadcast from rank 0), and a sharded run must
equal the unsharded one (noise follows the *global* element index).

Setup and teardown cannot hang: the ranks meet through a FileStore in the test's own directory
(no port to race for, no store server living in rank 0's process that the other rank still
needs while rank 0 exits), every collective has a timeout, both ranks pass a barrier before
destroying the process group (so neither tears down while the other still communicates), a
worker leaves with os._exit once its result is on disk (interpreter finalization with gloo and
OpenMP threads alive is where a worker was once left waiting on a futex), and the parent joins
the workers with a deadline, then kills them and fails with what each rank reported.
"""
import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nvrm_ext

WORLD = 2
STEPS = 50
BATCH = 16
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)  # any single collective or store wait
DEADLINE_S = 240  # the whole spawned run (~40 s here); below pytest-timeout's 300 s, so the ranks get reported


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _optimizer(kind, params, seed):
    """kind: 'vsgd' or 'vadam', '-capturable' for device-side counters (same trajectory)."""
    capturable = kind.endswith("-capturable")
    if kind.startswith("vsgd"):
        return nvrm_ext.FusedVSGD(params, lr=0.05, momentum=0.9, variability=0.02, num_iters=7, seed=seed,
                                  capturable=capturable)
    return nvrm_ext.FusedVAdam(params, lr=1e-2, variability=0.02, num_iters=7, seed=seed, capturable=capturable)


def _train(model, opt, rank, world, steps=STEPS):
    for step in range(steps):
        x, y = _batch(step)
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()


def _single_process(kind):
    model = _model()
    opt = _optimizer(kind.replace("-capturable", ""), model.parameters(), seed=1234)  # the host-mode reference
    _train(model, opt, 0, 1)
    with opt.denoised():
        clean = [p.detach().clone() for p in model.parameters()]
    return [p.detach().clone() for p in model.parameters()], clean


def _worker(rank, mode, kind, out_dir):
    """One rank. Leaves with os._exit: 0 once its result is saved and the group is torn down,
    1 with the traceback in <rank>.err otherwise."""
    code = 1
    try:
        _train_rank(rank, mode, kind, out_dir)
        code = 0
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        os._exit(code)  # nothing left to run: skip finalization (threads of gloo / OpenMP)


def _train_rank(rank, mode, kind, out_dir):
    store = dist.FileStore(os.path.join(out_dir, "store"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    completed = False
    try:
        torch.manual_seed(rank)  # each rank would draw another seed on its own
        model = _model()
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
            opt = _optimizer(kind, model.parameters(), seed=1234 if rank == 0 else None)
        else:
            from torch.distributed.fsdp import fully_shard
            fully_shard(model)
            opt = _optimizer(kind, model.parameters(), seed=1234 if rank == 0 else 99)
        _train(model, opt, rank, WORLD)

        def full(p):
            return p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()

        noisy = [full(p.detach()) for p in model.parameters()]
        with opt.denoised():
            clean = [full(p.detach()) for p in model.parameters()]
        torch.save({"seed": opt.seed, "noisy": noisy, "clean": clean}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # both ranks are done communicating before either tears down
        completed = True
    finally:
        if completed:  # after a failure the other rank may be mid-collective: no collective teardown
            dist.destroy_process_group()


def _run(mode, kind, tmp_path):
    """Spawn the ranks, join them with a deadline, and fail (killing them) with what each rank
    reported rather than wait forever."""
    context = mp.get_context("spawn")
    workers = [context.Process(target=_worker, args=(rank, mode, kind, str(tmp_path)), daemon=True)
               for rank in range(WORLD)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + DEADLINE_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, worker in enumerate(workers) if worker.is_alive()]
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    reports = []
    for rank, worker in enumerate(workers):
        error = tmp_path / f"{rank}.err"
        state = "hung" if rank in hung else f"exit code {worker.exitcode}"
        wrote = "wrote its result" if (tmp_path / f"{rank}.pt").exists() else "no result"
        reports.append(f"rank {rank}: {state}, {wrote}" + (f"\n{error.read_text()}" if error.exists() else ""))
    if hung or any(worker.exitcode != 0 for worker in workers):
        pytest.fail("distributed run failed:\n" + "\n".join(reports))
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("kind", ["vsgd", "vadam", "vsgd-capturable"])
def test_ddp_replicas_agree_and_match_single_process(kind, tmp_path):
    results = _run("ddp", kind, tmp_path)
    assert results[0]["seed"] == results[1]["seed"] == 1234
    for a, b in zip(results[0]["noisy"], results[1]["noisy"]):
        assert torch.equal(a, b)
    noisy, clean = _single_process(kind)
    for got, want in zip(results[0]["noisy"], noisy):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(results[0]["clean"], clean):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["vsgd", "vadam", "vadam-capturable"])
def test_fsdp2_sharded_run_equals_unsharded_run(kind, tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    results = _run("fsdp", kind, tmp_path)
    noisy, clean = _single_process(kind)
    for got, want in zip(results[0]["noisy"], noisy):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(results[0]["clean"], clean):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the perturbation really is there and is the same noise: noisy - clean agrees elementwise
    for got_n, got_c, want_n, want_c in zip(results[0]["noisy"], results[0]["clean"], noisy, clean):
        assert (got_n - got_c).abs().max() > 1e-3
        torch.testing.assert_close(got_n - got_c, want_n - want_c, rtol=1e-3, atol=1e-5)
