"""One way to run a test body on several gloo ranks without being able to hang.

The ranks meet through a FileStore in the test's own directory (no port to race for, no store
server living in rank 0's process that the other rank still needs while rank 0 exits), every
collective has a timeout, both ranks pass a barrier before destroying the process group (so
neither tears down while the other still communicates), a rank leaves with os._exit once its
result is on disk (interpreter finalization with gloo threads alive is where a worker was once
left waiting on a futex), and the parent joins the ranks with a deadline, then kills them and
fails with what each rank reported. The deadline stays below pytest-timeout's limit
(pyproject.toml) so that the ranks' reports, not a bare timeout, say what went wrong.
"""
from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=90)  # any single collective or store wait
DEADLINE_S = 240  # the whole spawned run


def _rank_main(rank, target, args, out_dir, world):
    """One rank: target(rank, out_dir, *args)'s result saved to <rank>.pt, or the traceback in
    <rank>.err; leaves with os._exit (0 / 1)."""
    code = 1
    try:
        store = dist.FileStore(os.path.join(out_dir, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        result = target(rank, out_dir, *args)
        dist.barrier()  # both ranks are done communicating before either tears down
        dist.destroy_process_group()
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        code = 0
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        os._exit(code)  # nothing left to run: skip finalization (gloo's threads)


def spawn(target, args, tmp_path, *, world=WORLD, deadline_s=DEADLINE_S) -> list:
    """Run target(rank, out_dir, *args) on `world` gloo ranks (target must be a module-level
    function, pickled by name); the ranks' return values, or a test failure saying what each
    rank did (ranks still alive at the deadline are killed)."""
    context = mp.get_context("spawn")
    workers = [context.Process(target=_rank_main, args=(rank, target, args, str(tmp_path), world), daemon=True)
               for rank in range(world)]
    for worker in workers:
        worker.start()
    end = time.monotonic() + deadline_s
    for worker in workers:
        worker.join(max(0.0, end - time.monotonic()))
    failed = []
    for rank, worker in enumerate(workers):
        if worker.is_alive():
            worker.kill()
            worker.join()
            failed.append(f"rank {rank}: still running at the {deadline_s} s deadline (killed)")
        elif worker.exitcode != 0:
            error = tmp_path / f"{rank}.err"
            failed.append(f"rank {rank}: exit code {worker.exitcode}\n"
                          + (error.read_text() if error.exists() else "(no traceback)"))
    if failed:
        pytest.fail("distributed run failed:\n" + "\n".join(failed))
    return [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(world)]
