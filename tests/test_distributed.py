"""Data-parallel (DDP) and sharded (FSDP2) training on CPU with 2 gloo processes.

Replicas must draw the same noise (the seed is broadcast from rank 0), and a sharded run must
equal the unsharded one (noise follows the *global* element index).

Setup and teardown cannot hang: the ranks run under tests/ranks.py's harness.
"""
import pytest
import torch

import nvrm_ext
from ranks import WORLD, spawn

STEPS = 50
BATCH = 16


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _optimizer(kind, params, seed):
    """kind: 'vsgd' or 'vadam', '-capturable' for device-side counters (same trajectory), or
    'nvrm-adamw': NVRM around torch's AdamW."""
    if kind == "nvrm-adamw":
        return nvrm_ext.NVRM(torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2), variability=0.02, num_iters=7,
                             seed=seed)
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


def _train_rank(rank, out_dir, mode, kind):
    """One rank of a DDP or FSDP2 run (tests/ranks.py spawns it): its noisy and clean weights."""
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
    return {"seed": opt.seed, "noisy": noisy, "clean": clean}


def _run(mode, kind, tmp_path):
    return spawn(_train_rank, (mode, kind), tmp_path, world=WORLD)


@pytest.mark.parametrize("kind", ["vsgd", "vadam", "vsgd-capturable", "nvrm-adamw"])
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


@pytest.mark.parametrize("kind", ["vsgd", "vadam", "vadam-capturable", "nvrm-adamw"])
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
