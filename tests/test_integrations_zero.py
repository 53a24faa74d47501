"""nvrm_ext.integrations.zero.denoised with ZeroRedundancyOptimizer on 2 gloo processes
(tests/ranks.py's hang-proof harness)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nvrm_ext import NVRM, FusedVSGD
from nvrm_ext.optim import NoisyOptimizer
from ranks import WORLD, spawn
from test_integrations_reference import clean_reference

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


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


def _worker(rank, out_dir):
    from nvrm_ext.integrations.zero import denoised

    torch.set_num_threads(1)

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

    # update_averaged cannot clean a sharded model (each rank only its shard): refused, untouched
    from torch.optim.swa_utils import AveragedModel

    from nvrm_ext.integrations.averaging import update_averaged

    model, zero, _ = make(1)
    swa = AveragedModel(model)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="zero.denoised"):
        update_averaged(swa, model, zero)
    assert int(swa.n_averaged) == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    with denoised(zero):  # the way that works
        update_averaged(swa, model, zero.optim)  # already clean: used as it is
    assert int(swa.n_averaged) == 1


def test_denoised_gives_clean_weights_on_every_rank_and_training_continues_bit_for_bit(tmp_path):
    """Also: a ZeRO around a plain torch optimizer is refused (one spawn for both checks)."""
    spawn(_worker, (), tmp_path)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: FusedVSGD(params, lr=0.1, variability=0.05, num_iters=1000, seed=1),
    lambda params: NVRM(torch.optim.AdamW(params), seed=1),
    lambda params: torch.optim.SGD(params, lr=0.1)], ids=["FusedVSGD", "NVRM", "SGD"])
def test_denoised_of_an_optimizer_that_is_not_zero_says_what_it_takes(make_optimizer):
    from nvrm_ext.integrations.zero import denoised

    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model.parameters())
    match = "takes a ZeroRedundancyOptimizer.*, got " + type(optimizer).__name__
    if isinstance(optimizer, NoisyOptimizer):
        match += ".*optimizer.denoised"
    with pytest.raises(TypeError, match=match):
        with denoised(optimizer):
            pass


# ---------------------------------------------------------------------- NVRM around a ZeRO
def make_nvrm(steps, around_zero=True):
    """A model trained `steps` steps by NVRM(ZeRO(AdamW)) (or, around_zero=False, by NVRM(AdamW) in
    one process) on the same data on every rank."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    inner = (ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.01)
             if around_zero else torch.optim.AdamW(model.parameters(), lr=0.01))
    opt = NVRM(inner, variability=0.05, num_iters=4, seed=11 if torch.distributed.get_rank() == 0 else None)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)

    def step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    for _ in range(steps):
        step()
    return model, opt, step


def _nvrm_around_zero_worker(rank, out_dir):
    """Every rank regenerates the same noise for every parameter after ZeRO's step has broadcast
    the updated shards: the replicas agree bit for bit with no communication for the swap, equal
    the single-process NVRM(AdamW) run, and clean themselves without communication."""
    from torch.optim.swa_utils import AveragedModel

    from nvrm_ext.integrations.averaging import update_averaged
    from nvrm_ext.integrations.zero import denoised

    torch.set_num_threads(1)
    model, opt, step = make_nvrm(6)  # past num_iters = 4: a swap-only step included
    params = list(model.parameters())
    noisy = [p.detach().clone() for p in params]
    assert opt.seed == 11 and same_on_every_rank(noisy)
    reference, reference_opt, _ = make_nvrm(6, around_zero=False)
    assert all(torch.equal(p, q) for p, q in zip(params, reference.parameters()))
    expected = clean_reference(reference_opt)  # by the noise specification
    expected = [expected[q] for q in reference.parameters()]
    assert all((n - c).abs().max() > 1e-3 for n, c in zip(noisy, expected))  # the noise is on

    with denoised(opt):
        inside = [p.detach().clone() for p in params]
        assert opt.noise_removed and same_on_every_rank(inside)
        for got, want in zip(inside, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert all(torch.equal(p, q) for p, q in zip(params, noisy))  # the noisy weights, bit for bit

    swa = AveragedModel(model)
    update_averaged(swa, model, opt)  # not refused: this NVRM cleans every parameter itself
    for got, want in zip(swa.module.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-7)
    assert all(torch.equal(p, q) for p, q in zip(params, noisy))

    for _ in range(2):
        step()
    twin, _, _ = make_nvrm(8)  # the same run without any denoised block or averaging
    assert all(torch.equal(p, q) for p, q in zip(params, twin.parameters()))

    # a ZeRO whose local optimizer already puts noise on the weights: two noise rules, refused
    from torch.distributed.optim import ZeroRedundancyOptimizer

    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=FusedVSGD, lr=0.1, seed=3)
    with pytest.raises(TypeError, match="the FusedVSGD inside it already puts noise on the weights"):
        NVRM(zero)


def test_nvrm_around_zero_agrees_on_every_rank_equals_one_process_and_cleans_without_communication(tmp_path):
    spawn(_nvrm_around_zero_worker, (), tmp_path)
