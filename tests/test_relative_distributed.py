"""relative=True on data-parallel and sharded parameters (docs/noise.md §5.1): the spread that
sets tensor k's noise scale is the whole tensor's, the same on every rank. DDP replicas hold the
whole tensor; an FSDP2 (DTensor) shard's spread comes from sums all-reduced over the mesh.

References: torch.std of the whole tensor (gathered with full_tensor() at each period's first
step, or the single-process model at step 1) and the single-process run of the same optimizer.
All runs share one 2-rank gloo spawn (tests/ranks.py), so the module costs one process start.
"""
import pytest
import torch

import nvrm_ext
from ranks import WORLD, spawn

STEPS = 10
NUM_ITERS = 4
PERIOD_STARTS = tuple(range(1, STEPS + 1, NUM_ITERS))  # 1, 5, 9: the steps that measure the spread
VARIABILITY = 0.1  # × each tensor's spread
BATCH = 16
SEED = 1234
FSDP_KINDS = ("vsgd", "vadam", "nvrm-adamw", "vsgd-capturable")  # the last: counters on the device
DDP_KINDS = ("vsgd", "vadam")


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    with torch.no_grad():
        model[2].bias.fill_(0.25)  # zero spread: no noise on it in the first period
    return model


def _optimizer(kind, params, seed):
    if kind in ("vsgd", "vsgd-capturable"):
        return nvrm_ext.FusedVSGD(params, lr=0.05, momentum=0.9, variability=VARIABILITY, num_iters=NUM_ITERS,
                                  relative=True, seed=seed, capturable=kind == "vsgd-capturable")
    if kind == "vadam":
        return nvrm_ext.FusedVAdam(params, lr=1e-2, variability=VARIABILITY, num_iters=NUM_ITERS, relative=True,
                                   seed=seed)
    return nvrm_ext.NVRM(torch.optim.AdamW(params, lr=1e-2), variability=VARIABILITY, num_iters=NUM_ITERS,
                         relative=True, seed=seed)


def _full(model):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def _weight_stds(opt):
    """The recorded spread of each parameter, read from the state_dict (NVRM prefixes its keys)."""
    states = opt.state_dict()["state"]
    return [states[i].get("weight_std", states[i].get("nvrm_weight_std")) for i in sorted(states)]


def _train(model, opt, rank, world):
    """STEPS steps; the whole weights before each period's first step and the spreads after it."""
    before, stds = {}, {}
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        if step in PERIOD_STARTS:
            before[step] = _full(model)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()
        if step in PERIOD_STARTS:
            stds[step] = _weight_stds(opt)
    noisy = _full(model)
    with opt.denoised():
        clean = _full(model)
    return {"before": before, "stds": stds, "noisy": noisy, "clean": clean, "seed": opt.seed}


def _replicated_and_2d_rank():
    """DTensor parameters placed by hand: replicated on a 1-D mesh (every rank holds all of it,
    nothing to add up), and on 2-D meshes (1 x 2 and 2 x 1) sharded on one dimension,
    replicated on the other (HSDP's layout). One SGD step with the same gradient on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    layouts = {"replicated": (init_device_mesh("cpu", (WORLD,)), [Replicate()]),
               "1x2": (init_device_mesh("cpu", (1, WORLD)), [Replicate(), Shard(0)]),
               "2x1": (init_device_mesh("cpu", (WORLD, 1)), [Shard(0), Replicate()])}
    out = {}
    for name, (mesh, placements) in layouts.items():
        p = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, placements))  # may share storage
        p.grad = distribute_tensor(grad, mesh, placements)
        opt = nvrm_ext.FusedVSGD([p], lr=0.1, variability=VARIABILITY, num_iters=NUM_ITERS, relative=True, seed=SEED)
        opt.step()
        out[name] = (opt.state[p]["weight_std"], p.full_tensor())
    return {"weight": weight, "grad": grad, "layouts": out}


def _all_rank(rank, out_dir):
    from torch.distributed.fsdp import fully_shard

    results = {}
    for kind in FSDP_KINDS:
        torch.manual_seed(rank)  # a rank's own draw would differ: the seed must come from rank 0
        model = _model()
        fully_shard(model)
        results["fsdp", kind] = _train(model, _optimizer(kind, model.parameters(), SEED if rank == 0 else 99),
                                       rank, WORLD)
    for kind in DDP_KINDS:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        results["ddp", kind] = _train(model, _optimizer(kind, model.parameters(), SEED if rank == 0 else None),
                                      rank, WORLD)
    results["dtensor"] = _replicated_and_2d_rank()
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp")
    return spawn(_all_rank, (), tmp_path_factory.mktemp("relative_ranks"))


def _std(t):
    return torch.std(t.double(), correction=0).item()


def _single_process(kind):
    model = _model()
    return _train(model, _optimizer(kind, model.parameters(), SEED), 0, 1)


@pytest.mark.parametrize("mode,kind", [("fsdp", k) for k in FSDP_KINDS] + [("ddp", k) for k in DDP_KINDS])
def test_every_rank_records_the_whole_tensors_spread(ranks, mode, kind):
    first, second = (result[mode, kind] for result in ranks)
    assert first["stds"] == second["stds"]  # the same floats on every rank
    start = [_std(p) for p in _model().parameters()]  # step 1: the single-process model's weights
    assert first["stds"][1] == pytest.approx(start, rel=1e-12, abs=0)
    assert first["stds"][1][3] == 0.0  # the constant bias
    for step in PERIOD_STARTS:
        whole = [_std(p) for p in first["before"][step]]
        assert first["stds"][step] == pytest.approx(whole, rel=1e-12, abs=1e-300), step
    assert first["stds"][PERIOD_STARTS[-1]][3] > 0  # the bias spread out since: measured again


@pytest.mark.parametrize("mode,kind", [("fsdp", k) for k in FSDP_KINDS] + [("ddp", k) for k in DDP_KINDS])
def test_the_parallel_run_follows_the_single_process_run(ranks, mode, kind):
    got = ranks[0][mode, kind]
    assert got["seed"] == ranks[1][mode, kind]["seed"] == SEED
    want = _single_process(kind)
    for step in PERIOD_STARTS:
        assert got["stds"][step] == pytest.approx(want["stds"][step], rel=1e-5), step
    for a, b in zip(got["noisy"], want["noisy"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(got["clean"], want["clean"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for got_n, got_c, want_n, want_c in zip(got["noisy"], got["clean"], want["noisy"], want["clean"]):
        assert (got_n - got_c).abs().max() > 1e-4  # the relative noise is there, and is the same noise
        torch.testing.assert_close(got_n - got_c, want_n - want_c, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", DDP_KINDS)
def test_ddp_replicas_agree_bit_for_bit(ranks, kind):
    first, second = (result["ddp", kind] for result in ranks)
    for key in ("noisy", "clean"):
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(first[key], second[key]))


@pytest.mark.parametrize("layout", ["replicated", "1x2", "2x1"])
def test_replicated_and_two_dimensional_dtensors_use_the_whole_tensor(ranks, layout):
    """A replicated mesh dimension adds nothing up (summing the copies would double the mean)."""
    from nvrm_ext import noise as spec

    first, second = (result["dtensor"] for result in ranks)
    weight, grad = first["weight"], first["grad"]
    std, after = first["layouts"][layout]
    assert std == second["layouts"][layout][0]
    assert std == pytest.approx(_std(weight), rel=1e-12, abs=0)
    expected = weight - 0.1 * grad + spec.noise("Gaussian", VARIABILITY * std, SEED, 0, 1, weight.numel()).view_as(weight)
    torch.testing.assert_close(after, expected, rtol=0, atol=2e-6)
    assert torch.equal(after, second["layouts"][layout][1])


def test_capturable_sharded_run_is_bitwise_the_host_mode_one(ranks):
    """The spreads all-reduced on the device at every step (capturable) and at each period's
    first step (host mode) give the same bits: the same weights, noisy and clean, on every rank."""
    for result in ranks:
        host, live = result["fsdp", "vsgd"], result["fsdp", "vsgd-capturable"]
        assert live["stds"] == host["stds"]
        for key in ("noisy", "clean"):
            assert all(torch.equal(a, b) for a, b in zip(host[key], live[key]))
