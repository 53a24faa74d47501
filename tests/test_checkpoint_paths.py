"""The noise state survives every checkpoint path: ZeroRedundancyOptimizer (2 gloo processes),
torch.distributed.checkpoint's get_/set_{model,optimizer}_state_dict (single process, and FSDP2
on 2 gloo processes), and old checkpoints. Each resumed run is built with ANOTHER seed and
another initialisation, and must continue the uninterrupted trajectory bit for bit."""

import collections
import os

import pytest
import torch
import torch.distributed as dist

import nvrm_ext
from ranks import WORLD, spawn

FIRST, THEN = 4, 5  # steps before and after the checkpoint
BATCH = 16


def nvrm_adamw(params, *, seed, lr, variability, num_iters, weight_decay):
    """NVRM around torch's AdamW, built like the fused optimizers (also as ZeRO's optimizer_class)."""
    return nvrm_ext.NVRM(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), variability=variability,
                         num_iters=num_iters, seed=seed)


KINDS = {
    "vsgd": (nvrm_ext.FusedVSGD, dict(lr=0.05, momentum=0.9, dampening=0.1, variability=0.05, num_iters=7)),
    "vadam": (nvrm_ext.FusedVAdam, dict(lr=1e-2, variability=0.05, num_iters=7, weight_decay=1e-2)),
    "nvrm-adamw": (nvrm_adamw, dict(lr=1e-2, variability=0.05, num_iters=7, weight_decay=1e-2)),
}


def _model(init_seed):
    torch.manual_seed(init_seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def _optimizer(kind, params, seed):
    cls, kwargs = KINDS[kind]
    return cls(params, seed=seed, **kwargs)


def _train(model, opt, first, steps, rank=0, world=1):
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()


def _full(model):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def _bitwise(a, b):
    return len(a) == len(b) and all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b))


# ---------------------------------------------------------------------- ZeroRedundancyOptimizer
def _zero_rank(rank, out_dir, kind):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    def zero(model, seed):
        cls, kwargs = KINDS[kind]
        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, seed=seed, **kwargs)

    model = _model(0)
    ddp = DistributedDataParallel(model)
    opt = zero(ddp, 1234)
    _train(ddp, opt, 0, FIRST, rank, WORLD)
    opt.consolidate_state_dict(to=0)
    path = os.path.join(out_dir, "checkpoint.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    _train(ddp, opt, FIRST, THEN, rank, WORLD)  # the uninterrupted run
    reference = _full(model)
    dist.barrier()
    checkpoint = torch.load(path)
    resumed = _model(7)
    ddp = DistributedDataParallel(resumed)
    opt = zero(ddp, 999)  # another seed: the checkpoint's must win
    resumed.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    _train(ddp, opt, FIRST, THEN, rank, WORLD)
    return {"reference": reference, "resumed": _full(resumed), "seed": opt.optim.seed}


@pytest.mark.parametrize("kind", ["vadam", "vsgd"])  # NVRM wraps the ZeRO instead: see test_nvrm_around_zero_*
def test_zero_redundancy_optimizer_resume_continues_bit_for_bit(kind, tmp_path):
    results = spawn(_zero_rank, (kind,), tmp_path)
    for result in results:
        assert result["seed"] == 1234
        assert _bitwise(result["resumed"], result["reference"])
    assert _bitwise(results[0]["reference"], results[1]["reference"])


def _zero_clean_checkpoint_rank(rank, out_dir):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from nvrm_ext.integrations.zero import denoised
    from test_integrations_reference import clean_reference

    cls, kwargs = KINDS["vsgd"]
    model = _model(0)
    ddp = DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, seed=1234, **kwargs)
    _train(ddp, opt, 0, FIRST, rank, WORLD)
    path = os.path.join(out_dir, "clean.pt")
    with denoised(opt):  # every rank's model clean, each local optimizer in the removed state
        opt.consolidate_state_dict(to=0)
        clean = _full(model)
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    dist.barrier()
    checkpoint = torch.load(path, weights_only=False)
    resumed = _model(7)
    ddp = DistributedDataParallel(resumed)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, seed=999, **kwargs)
    resumed.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])  # ZeRO's own load: the per-parameter state as saved
    local = opt.optim
    buffers = {p: local.state[p]["momentum_buffer"].clone() for group in local.param_groups for p in group["params"]}
    noise_steps = [local.state[p]["noise_step"] for p in buffers]
    _train(ddp, opt, FIRST, 1, rank, WORLD)
    # the step started from the clean weights: clean now = clean then - lr * (momentum * buf + (1 - dampening) * g)
    clean_now = clean_reference(local)
    clean_then = dict(zip(resumed.parameters(), clean))
    errors = [(clean_now[p] - (clean_then[p] - kwargs["lr"] * (kwargs["momentum"] * buffers[p]
                                                             + (1 - kwargs["dampening"]) * p.grad))).abs().max().item()
              for p in buffers]
    return {"seed": local.seed, "noise_steps": noise_steps, "max_error": max(errors), "owned": len(buffers)}


def test_zero_resumes_a_checkpoint_saved_while_clean_from_the_clean_weights(tmp_path):
    """ZeroRedundancyOptimizer's own load keeps the state as saved: saved while the noise was
    removed (integrations.zero.denoised), it says noise_step 0 for the clean model file beside
    it, so the resumed step starts from the clean weights -- no noise is subtracted that is not
    there (the noisy copies it also carries are dropped when the launch data is built)."""
    for result in spawn(_zero_clean_checkpoint_rank, (), tmp_path):
        assert result["seed"] == 1234 and result["owned"] > 0
        assert result["noise_steps"] == [0] * result["owned"]
        assert result["max_error"] < 1e-6, result


def _nvrm_around_zero_rank(rank, out_dir):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    _, kwargs = KINDS["nvrm-adamw"]

    def nvrm_around_zero(model, seed):
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=kwargs["lr"],
                                       weight_decay=kwargs["weight_decay"])
        return nvrm_ext.NVRM(zero, variability=kwargs["variability"], num_iters=kwargs["num_iters"], seed=seed)

    model = _model(0)
    ddp = DistributedDataParallel(model)
    opt = nvrm_around_zero(ddp, 1234)
    _train(ddp, opt, 0, FIRST, rank, WORLD)
    before = _full(model)
    with pytest.raises(RuntimeError, match="consolidate_state_dict"):  # ZeRO's own requirement, kept
        opt.state_dict()
    assert _bitwise(_full(model), before) and not opt.noise_removed
    opt.optimizer.consolidate_state_dict(to=0)
    path = os.path.join(out_dir, "checkpoint.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    _train(ddp, opt, FIRST, THEN, rank, WORLD)  # the uninterrupted run
    reference = _full(model)
    dist.barrier()
    checkpoint = torch.load(path, weights_only=True)
    resumed = _model(7)
    ddp = DistributedDataParallel(resumed)
    opt = nvrm_around_zero(ddp, 999)  # another seed: the checkpoint's must win
    resumed.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    _train(ddp, opt, FIRST, THEN, rank, WORLD)
    result = {"reference": reference, "resumed": _full(resumed), "seed": opt.seed}

    # NVRM inside the ZeRO instead: ZeRO's load writes the local NVRM's inner state directly and
    # the noise bookkeeping stays behind, so every use of the noise is refused, nothing changed
    def zero_around_nvrm(model, seed):
        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=nvrm_adamw, seed=seed, **kwargs)

    model = _model(0)
    ddp = DistributedDataParallel(model)
    opt = zero_around_nvrm(ddp, 1234)
    _train(ddp, opt, 0, FIRST, rank, WORLD)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    dist.barrier()
    checkpoint = torch.load(path, weights_only=True)
    resumed = _model(7)
    ddp = DistributedDataParallel(resumed)
    opt = zero_around_nvrm(ddp, 999)
    resumed.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    loaded = _full(resumed)
    refused = []
    for attempt in (lambda: _train(ddp, opt, FIRST, 1, rank, WORLD), opt.optim.remove_noise,
                    lambda: opt.optim.clean_state_dict(resumed)):
        with pytest.raises(RuntimeError, match="loaded into the inner optimizer directly") as error:
            attempt()
        refused.append(str(error.value))
    assert _bitwise(_full(resumed), loaded) and not opt.optim.noise_removed
    result["refused"] = refused
    return result


def test_nvrm_around_zero_resume_continues_bit_for_bit_and_zero_around_nvrm_is_refused(tmp_path):
    """NVRM(ZeroRedundancyOptimizer(...)): its state_dict needs ZeRO's consolidate_state_dict
    first (ZeRO's error otherwise); saved on rank 0 and loaded on every rank with another seed and
    init, training continues the uninterrupted run bit for bit. The other nesting,
    ZeroRedundancyOptimizer(optimizer_class=<NVRM>), cannot resume through ZeRO's load and says so."""
    results = spawn(_nvrm_around_zero_rank, (), tmp_path)
    for result in results:
        assert result["seed"] == 1234
        assert _bitwise(result["resumed"], result["reference"])
        assert len(result["refused"]) == 3
    assert _bitwise(results[0]["reference"], results[1]["reference"])


@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize("how", ["state.clear()", "a new defaultdict", "one dict cleared"])
def test_resetting_the_optimizer_state_resets_the_base_optimizer_not_the_noise_on_the_weights(how, capturable):
    """Clearing optimizer.state (a common way to reset momentum or moments) forgets the base
    optimizer's state; the noise on the weights is a fact about the weights, kept so that the
    next step removes it. Checked against the noise specification and the SGD update."""
    from nvrm_ext import noise as spec

    cls, kwargs = KINDS["vsgd"]
    model = _model(0)
    opt = cls(model.parameters(), seed=41, capturable=capturable, **kwargs)
    _train(model, opt, 0, 3)
    params = list(model.parameters())
    scale, seed = kwargs["variability"], 41
    clean = [p.detach() - spec.from_memory_order(spec.noise("Gaussian", scale, seed, key, int(opt.state[p]["noise_step"]),
                                                            p.numel()), p) for key, p in enumerate(params)]
    if how == "state.clear()":
        opt.state.clear()
    elif how == "a new defaultdict":
        opt.state = collections.defaultdict(dict)
    else:
        opt.state[params[0]].clear()
    kept = {p: opt.state[p]["momentum_buffer"].clone() for p in params if opt.state.get(p)}
    _train(model, opt, 3, 1)
    lr, momentum, dampening = (kwargs[k] for k in ("lr", "momentum", "dampening"))
    for key, (p, w) in enumerate(zip(params, clean)):
        state = opt.state[p]
        assert int(state["step"]) == (4 if p in kept else 1)
        direction = momentum * kept[p] + (1 - dampening) * p.grad if p in kept else p.grad  # a fresh buffer: buf = g
        added = p.detach() - (w - lr * direction)
        expected = spec.from_memory_order(spec.noise("Gaussian", scale, seed, key, int(state["noise_step"]), p.numel()), p)
        torch.testing.assert_close(added, expected, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------- torch.distributed.checkpoint
def _dcp_resume(kind, order, checkpoint_dir, resumed, opt):
    """Load model and optimizer the way DCP users do: targets from get_*_state_dict (which calls
    step() with zero gradients at lr 0 on a fresh optimizer), dcp.load in place, set_*_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    def load_model():
        target = {"model": get_model_state_dict(resumed)}
        dcp.load(target, checkpoint_id=checkpoint_dir)
        set_model_state_dict(resumed, target["model"])

    def load_optimizer():
        target = {"optimizer": get_optimizer_state_dict(resumed, opt)}
        dcp.load(target, checkpoint_id=checkpoint_dir)
        set_optimizer_state_dict(resumed, opt, target["optimizer"])

    for load in (load_model, load_optimizer) if order == "model-first" else (load_optimizer, load_model):
        load()


def _dcp_save(model, opt, checkpoint_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
             checkpoint_id=checkpoint_dir)


@pytest.mark.filterwarnings("ignore::UserWarning")  # DCP without a process group says so
@pytest.mark.parametrize("order", ["model-first", "optimizer-first"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_distributed_checkpoint_round_trip_single_process(kind, order, tmp_path):
    model = _model(0)
    opt = _optimizer(kind, model.parameters(), 1234)
    _train(model, opt, 0, FIRST)
    _dcp_save(model, opt, str(tmp_path / "ckpt"))
    _train(model, opt, FIRST, THEN)

    resumed = _model(7)
    resumed_opt = _optimizer(kind, resumed.parameters(), 999)
    _dcp_resume(kind, order, str(tmp_path / "ckpt"), resumed, resumed_opt)
    assert resumed_opt.seed == 1234
    _train(resumed, resumed_opt, FIRST, THEN)
    assert _bitwise(_full(resumed), _full(model))


@pytest.mark.filterwarnings("ignore::UserWarning")  # DCP without a process group says so
@pytest.mark.parametrize("order", ["model-first", "optimizer-first"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_checkpoint_saved_while_removed_resumes_from_the_clean_weights_through_dcp(kind, order, tmp_path):
    """A checkpoint taken while the noise is removed (transformers' Trainer does) holds clean
    weights; DCP keeps only the standard state entries, so the resumed run must continue from
    those clean weights with fresh noise -- exactly the run that declared them clean
    (reset_noise()) -- and never subtract noise that is not on them."""
    model = _model(0)
    opt = _optimizer(kind, model.parameters(), 1234)
    _train(model, opt, 0, FIRST)
    opt.remove_noise()
    _dcp_save(model, opt, str(tmp_path / "ckpt"))
    opt.reset_noise()  # the reference: continue from the clean weights, the rest of the state kept
    _train(model, opt, FIRST, THEN)

    resumed = _model(7)
    resumed_opt = _optimizer(kind, resumed.parameters(), 999)
    _dcp_resume(kind, order, str(tmp_path / "ckpt"), resumed, resumed_opt)
    assert not resumed_opt.noise_removed
    _train(resumed, resumed_opt, FIRST, THEN)
    assert _bitwise(_full(resumed), _full(model))


def test_distributed_checkpoint_state_init_step_leaves_the_weights_alone():
    """get_optimizer_state_dict on a fresh optimizer steps it with zero gradients at lr 0 to
    create the state: a model loaded before must not get noise from that."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _model(0)
    before = _full(model)
    opt = _optimizer("vsgd", model.parameters(), 5)
    state = get_optimizer_state_dict(model, opt)
    assert _bitwise(_full(model), before)
    assert all(s["step"] == 0 and s["noise_step"] == 0 for s in state["state"].values())
    assert all(group["nvrm_seed"] == 5 and group["lr"] == 0.05 for group in state["param_groups"])
    _train(model, opt, 0, 1)  # the first real step is the first step of a fresh optimizer
    twin = _model(0)
    twin_opt = _optimizer("vsgd", twin.parameters(), 5)
    _train(twin, twin_opt, 0, 1)
    assert _bitwise(_full(model), _full(twin))


def test_distributed_checkpoint_state_init_step_leaves_the_weights_alone_with_nvrm():
    """The same for NVRM(AdamW): the init step runs the inner AdamW at lr 0 (torch's own doing:
    its step count becomes 1, as for a plain AdamW) and puts no noise on the weights; the first
    real step is plain AdamW's step from there plus the specified noise."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from test_integrations_reference import clean_reference

    model = _model(0)
    before = _full(model)
    opt = _optimizer("nvrm-adamw", model.parameters(), 5)
    state = get_optimizer_state_dict(model, opt)
    assert _bitwise(_full(model), before)
    assert all(s["nvrm_noise_step"] == 0 for s in state["state"].values()) and len(state["state"]) == 4
    assert all(group["nvrm_seed"] == 5 and group["lr"] == 1e-2 for group in state["param_groups"])

    plain = _model(0)
    _, kwargs = KINDS["nvrm-adamw"]
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=kwargs["lr"], weight_decay=kwargs["weight_decay"])
    get_optimizer_state_dict(plain, plain_opt)  # the same init step for the plain AdamW
    _train(model, opt, 0, 1)
    _train(plain, plain_opt, 0, 1)
    clean = clean_reference(opt)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(clean[p], q.detach(), rtol=0, atol=1e-7)
        assert (p.detach() - q.detach()).abs().max() > 1e-3  # and the noise is on


def _fsdp2_rank(rank, out_dir, kind):
    from torch.distributed.fsdp import fully_shard

    def sharded(init_seed, seed):
        model = _model(init_seed)
        fully_shard(model)
        return model, _optimizer(kind, model.parameters(), seed)

    model, opt = sharded(0, 1234)
    _train(model, opt, 0, FIRST, rank, WORLD)
    checkpoint_dir = os.path.join(out_dir, "ckpt")
    _dcp_save(model, opt, checkpoint_dir)
    _train(model, opt, FIRST, THEN, rank, WORLD)
    result = {"reference": _full(model)}
    for order in ("model-first", "optimizer-first"):
        resumed, resumed_opt = sharded(7, 999)
        _dcp_resume(kind, order, checkpoint_dir, resumed, resumed_opt)
        _train(resumed, resumed_opt, FIRST, THEN, rank, WORLD)
        result[order] = (resumed_opt.seed, _full(resumed))
    return result


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_distributed_checkpoint_round_trip_with_fsdp2_in_both_load_orders(kind, tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    for result in spawn(_fsdp2_rank, (kind,), tmp_path):
        for order in ("model-first", "optimizer-first"):
            seed, resumed = result[order]
            assert seed == 1234, order
            assert _bitwise(resumed, result["reference"]), order


# ---------------------------------------------------------------------- seed placement
def test_seed_lives_in_every_param_group_and_old_checkpoints_still_load():
    model = _model(0)
    opt = _optimizer("vadam", [{"params": model[0].parameters()}, {"params": model[2].parameters()}], 77)
    _train(model, opt, 0, 2)
    saved = opt.state_dict()
    assert saved["nvrm"]["seed"] == 77 and [g["nvrm_seed"] for g in saved["param_groups"]] == [77, 77]

    old_format = {**saved, "nvrm": {"seed": 77, "format": 1, "optimizer": "FusedVAdam"},
                  "param_groups": [{k: v for k, v in g.items() if k != "nvrm_seed"} for g in saved["param_groups"]]}
    groups_only = {k: v for k, v in saved.items() if k != "nvrm"}
    for state_dict in (old_format, groups_only):
        other = _optimizer("vadam", [{"params": model[0].parameters()}, {"params": model[2].parameters()}], 3)
        other.load_state_dict(state_dict)
        assert other.seed == 77 and all(g["nvrm_seed"] == 77 for g in other.param_groups)

    neither = {**groups_only, "param_groups": old_format["param_groups"]}
    other = _optimizer("vadam", [{"params": model[0].parameters()}, {"params": model[2].parameters()}], 3)
    with pytest.raises(ValueError, match="carries no noise seed"):
        other.load_state_dict(neither)
    disagreeing = {**groups_only, "param_groups": [{**saved["param_groups"][0], "nvrm_seed": 1},
                                                   saved["param_groups"][1]]}
    with pytest.raises(ValueError, match="disagrees on the noise seed"):
        other.load_state_dict(disagreeing)
    assert other.seed == 3  # nothing was loaded
    other.param_groups[1]["nvrm_seed"] = 4
    with pytest.raises(ValueError, match="disagree on the noise seed"):
        _train(model, other, 0, 1)


@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
def test_a_new_seed_in_the_groups_is_refused_while_the_weights_carry_the_old_seeds_noise(capturable):
    """Noise drawn with one seed can only be removed with it: a new nvrm_seed in every group
    (edited, not loaded with its state) is refused before anything changes, and taken once
    reset_noise() has declared the weights clean."""
    model = _model(0)
    opt = _optimizer("vsgd", model.parameters(), 77) if not capturable else \
        KINDS["vsgd"][0](model.parameters(), seed=77, capturable=True, **KINDS["vsgd"][1])
    _train(model, opt, 0, 2)
    before = _full(model)
    for group in opt.param_groups:
        group["nvrm_seed"] = 78
    with pytest.raises(ValueError, match="only that seed can remove"):
        _train(model, opt, 2, 1)
    assert _bitwise(_full(model), before)
    with pytest.raises(ValueError, match="only that seed can remove"):
        opt.remove_noise()
    assert _bitwise(_full(model), before) and not opt.noise_removed
    opt.reset_noise()  # the weights as they are are declared clean: the new seed is taken
    params = list(model.parameters())
    clean = [p.detach().clone() for p in params]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in params]
    _train(model, opt, 2, 1)
    assert opt.seed == 78 and all(group["nvrm_seed"] == 78 for group in opt.param_groups)
    # the step added noise drawn with the new seed (the specification's), to the SGD update of the clean weights
    from nvrm_ext import noise as spec
    lr, momentum, dampening = (KINDS["vsgd"][1][k] for k in ("lr", "momentum", "dampening"))
    for key, (p, w, buf) in enumerate(zip(params, clean, buffers)):
        state = opt.state[p]
        added = p.detach() - (w - lr * (momentum * buf + (1 - dampening) * p.grad))
        expected = spec.from_memory_order(spec.noise("Gaussian", 0.05, 78, key, int(state["noise_step"]), p.numel()), p)
        torch.testing.assert_close(added, expected, rtol=0, atol=2e-6)
