"""relative=True: the noise scale of tensor k is variability × the spread of its weights, measured
at the first step of each num_iters period (docs/noise.md §5.1). References: a plain-torch run
of the same rule with nvrm_ext/noise.py, and torch.std."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec

SEED = 77
NUM_ITERS = 3
VARIABILITY = 0.4


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.LayerNorm(10),
                                torch.nn.Linear(10, 3))
    with torch.no_grad():  # constant gain, zero bias: zero spread at the start
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    return model


def _loss(model, step):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
    return model(x).pow(2).mean()


def _loss_in(model, step, dtype):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step)).to(dtype)
    return model(x).float().pow(2).mean()


def _spread(t):
    return torch.std(t.detach().double(), correction=0).item() if t.numel() > 1 else 0.0


def _reference_run(steps, make_inner, noise_type="Gaussian", lr_zero=False):
    """The rule in plain torch: the inner optimizer steps a copy of the perturbed weights with the
    gradients taken there; then old noise out, new noise (scale from the period's spread) in."""
    model = _model()
    inner = make_inner(model.parameters())
    clean_spread, noise_on, history = {}, {}, []
    for step in range(1, steps + 1):
        params = list(model.parameters())
        if (step - 1) % NUM_ITERS == 0:
            clean_spread = {k: _spread(p) for k, p in enumerate(params)}
        inner.zero_grad()
        _loss(model, step).backward()
        inner.step()
        new_step = step if step % NUM_ITERS else 0
        with torch.no_grad():
            for k, p in enumerate(params):
                old = noise_on.get(k)
                if old is not None:
                    p -= spec.noise(noise_type, old[1], SEED, k, old[0], p.numel()).view_as(p)
                scale = VARIABILITY * clean_spread[k]
                if new_step:
                    p += spec.noise(noise_type, scale, SEED, k, new_step, p.numel()).view_as(p)
                noise_on[k] = (new_step, scale) if new_step else None
        history.append([p.detach().clone() for p in params])
    return history


def _run(steps, optimizer_factory, backend, dtype=torch.float32):
    model = _model().to(dtype)
    opt = optimizer_factory(model.parameters(), backend)
    history = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        _loss_in(model, step, dtype).backward()
        opt.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return model, opt, history


FACTORIES = {
    "FusedVSGD": (lambda params, backend: nvrm_ext.FusedVSGD(
        params, lr=0.1, variability=VARIABILITY, num_iters=NUM_ITERS, relative=True, seed=SEED, backend=backend),
        lambda params: torch.optim.SGD(params, lr=0.1)),
    "NVRM(Adam)": (lambda params, backend: nvrm_ext.NVRM(
        torch.optim.Adam(params, lr=0.01), variability=VARIABILITY, num_iters=NUM_ITERS, relative=True, seed=SEED,
        backend=backend),
        lambda params: torch.optim.Adam(params, lr=0.01)),
}


def test_the_spread_is_the_population_std_whatever_the_thread_count():
    """docs/noise.md §5.1's statistic against torch.std, for sizes around the summation chunk,
    several dtypes and a non-contiguous tensor, the same bits on 1 and 2 threads (torch.std's
    own last bits depend on the thread count above 32k elements), the tensors left as they were."""
    from nvrm_ext.optim.relative import CHUNK, spreads

    g = torch.Generator().manual_seed(5)
    tensors = [0.1 * torch.randn(n, generator=g) + 0.5 for n in (2, 999, 999, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 400_000)]
    tensors += [tensors[2].double(), tensors[4].double(), tensors[1].bfloat16(), torch.randn(300, 70, generator=g).t()]
    tensors += [torch.randn(40, 30, generator=g).t(), torch.randn(20, 60, generator=g).t()]  # same shape, strided
    tensors += [torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last) for _ in range(2)]
    tensors += [torch.full((50,), 0.3)]
    before = [t.clone() for t in tensors]
    threads = torch.get_num_threads()
    try:
        by_threads = []
        for count in (1, 2):
            torch.set_num_threads(count)
            by_threads.append(spreads(tensors, tensors))
    finally:
        torch.set_num_threads(threads)
    assert by_threads[0] == by_threads[1]
    expected = [torch.std(t.double(), correction=0).item() for t in tensors]
    assert by_threads[0][:-1] == pytest.approx(expected[:-1], rel=1e-13, abs=0)
    assert by_threads[0][-1] == pytest.approx(0.0, abs=1e-16)  # a constant: 0 up to the mean's rounding
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
    assert [spreads([t], [t])[0] for t in tensors] == by_threads[0]  # alone as in a group of its shape


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_relative_noise_follows_the_specification(name, backend):
    make, make_inner = FACTORIES[name]
    _, _, history = _run(7, make, backend)
    reference = _reference_run(7, make_inner)
    for step, (got, expected) in enumerate(zip(history, reference), 1):
        for k, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=f"step {step}, parameter {k}")


ADAM_VARIANTS = {  # FusedVAdam's flags and the torch.optim update each one is
    "amsgrad-L2": (dict(amsgrad=True, weight_decay=0.05), "Gaussian",
                   lambda params: torch.optim.Adam(params, lr=0.01, amsgrad=True, weight_decay=0.05)),
    "amsgrad-decoupled": (dict(amsgrad=True, weight_decay=0.05, decoupled=True), "Laplace",
                          lambda params: torch.optim.AdamW(params, lr=0.01, amsgrad=True, weight_decay=0.05)),
    "decoupled": (dict(weight_decay=0.05, decoupled=True), "Uniform",
                  lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)),
}


@pytest.mark.parametrize("variant", sorted(ADAM_VARIANTS))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_relative_fused_adam_variants_follow_the_specification(variant, backend):
    """The spread sets the scale on the host, whatever update the kernel fuses with the swap:
    FusedVAdam with amsgrad and L2 / decoupled weight decay against torch's Adam / AdamW."""
    flags, noise_type, make_inner = ADAM_VARIANTS[variant]
    make = lambda params, b: nvrm_ext.FusedVAdam(params, lr=0.01, variability=VARIABILITY, num_iters=NUM_ITERS,
                                                 noise_type=noise_type, relative=True, seed=SEED, backend=b, **flags)
    steps = 4 if backend == "triton" else 7  # the interpreter is slow; 4 steps still cross a period
    _, _, history = _run(steps, make, backend)
    reference = _reference_run(steps, make_inner, noise_type)
    for step, (got, expected) in enumerate(zip(history, reference), 1):
        for k, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=f"step {step}, parameter {k}")


def test_the_state_keeps_the_period_spread_and_the_scale_the_noise_was_added_with():
    model = _model()
    params = list(model.parameters())
    start = [_spread(p) for p in params]
    opt = nvrm_ext.FusedVAdam(params, lr=0.01, variability=VARIABILITY, num_iters=NUM_ITERS, relative=True,
                              seed=SEED, backend="cpu")
    for step in range(1, 3):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    for p, spread in zip(params, start):
        state = opt.state[p]
        assert state["weight_std"] == pytest.approx(spread, rel=1e-12)
        assert state["noise_scale"] == pytest.approx(VARIABILITY * spread, rel=1e-12)
    assert opt.state[model[2].weight]["weight_std"] == 0.0  # the constant gain: no noise in this period


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_fused_backends_agree_bit_for_bit_and_removal_is_exact(backend):
    """bfloat16 weights (with their compensation buffers) at lr 0: the num_iters-th step must
    leave exactly the starting weights."""
    make = lambda params, b: nvrm_ext.FusedVSGD(params, lr=0.0, variability=VARIABILITY, num_iters=NUM_ITERS,
                                                relative=True, seed=SEED, backend=b)
    model, opt, history = _run(NUM_ITERS, make, backend, torch.bfloat16)
    start = list(_model().to(torch.bfloat16).parameters())
    for p, s in zip(model.parameters(), start):  # lr 0: the num_iters-th step leaves the start weights
        assert torch.equal(p, s)
    assert any(not torch.equal(a, b) for a, b in zip(history[0], start))
    if backend == "triton":
        _, _, on_cpu = _run(NUM_ITERS, make, "cpu", torch.bfloat16)
        for got, expected in zip(history, on_cpu):
            assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_resume_across_a_period_boundary_is_bit_exact():
    make = FACTORIES["NVRM(Adam)"][0]
    model, opt, _ = _run(2, make, "cpu")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    for step in range(3, 8):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "nvrm_weight_std" in saved["optimizer"]["state"][0]
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt2 = nvrm_ext.NVRM(torch.optim.Adam(resumed.parameters(), lr=0.01), backend="cpu")
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.param_groups[0]["relative"] is True
    for step in range(3, 8):
        opt2.zero_grad()
        _loss(resumed, step).backward()
        opt2.step()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1"])
def test_an_invalid_loaded_spread_is_refused_with_nothing_loaded(bad):
    make = FACTORIES["FusedVSGD"][0]
    _, opt, _ = _run(1, make, "cpu")
    state = copy.deepcopy(opt.state_dict())
    state["state"][1]["weight_std"] = bad
    fresh = nvrm_ext.FusedVSGD(_model().parameters(), lr=0.1, relative=True, backend="cpu")
    with pytest.raises(ValueError, match="weight_std"):
        fresh.load_state_dict(state)
    assert len(fresh.state) == 0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1", True, torch.tensor([0.1, 0.2])])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_spread_edited_mid_period_is_checked_before_anything_changes(name, bad):
    """The steady step reuses the scales of the step before while the states hold the same
    spreads; an edited one is taken if valid, refused (weights and state as they were) if not."""
    make = FACTORIES[name][0]
    model, opt, _ = _run(1, make, "cpu")
    engine = getattr(opt, "_engine", opt)  # NVRM keeps the noise state in its engine
    params = list(model.parameters())
    engine.state[params[0]]["weight_std"] = bad
    _loss(model, 2).backward()
    before = [p.detach().clone() for p in params]
    def snapshot():  # the noise state and the inner optimizer's (the same dicts for FusedVSGD)
        return [copy.deepcopy({k: v for k, v in {**state.state[p]}.items() if k != "weight_std"})
                for state in (engine, opt) for p in params]

    states = snapshot()
    with pytest.raises(ValueError, match="parameter 0's state: invalid weight_std"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for now, saved in zip(snapshot(), states):
        assert now.keys() == saved.keys()
        assert all(torch.equal(now[k], v) if isinstance(v, torch.Tensor) else now[k] == v for k, v in saved.items())
    engine.state[params[0]]["weight_std"] = 0.5  # a valid edit is taken at the next step
    opt.step()
    assert engine.state[params[0]]["noise_scale"] == VARIABILITY * 0.5
    assert engine.state[params[1]]["noise_scale"] == pytest.approx(VARIABILITY * _spread(_model()[0].bias), rel=1e-12)


def test_relative_is_a_per_group_flag_checked_like_the_others():
    model = _model()
    with pytest.raises(ValueError, match="relative"):
        nvrm_ext.FusedVSGD(model.parameters(), lr=0.1, relative="yes")
    opt = nvrm_ext.FusedVSGD([{"params": model[0].parameters(), "relative": True},
                              {"params": model[3].parameters()}], lr=0.1, variability=0.01, seed=SEED,
                             backend="cpu")
    for step in (1, 2):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    assert opt.state[model[3].weight]["noise_scale"] == 0.01
    assert opt.state[model[0].weight]["noise_scale"] == pytest.approx(0.01 * _spread(_model()[0].weight))
    opt.param_groups[1]["relative"] = "yes"
    with pytest.raises(ValueError, match="relative"):
        opt.step()
