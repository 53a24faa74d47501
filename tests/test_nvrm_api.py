"""NVRM(optimizer): construction, checkpoints, denoising and the errors of the wrapper.

The step's arithmetic against the noise specification is tests/test_nvrm_reference.py; here
the references are plain torch runs and nvrm_ext/noise.py."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec

BACKENDS = ["torch", "cpu"]
SEED = 1234


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def _batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 6, generator=g, dtype=dtype)


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        model(_batch(step, next(model.parameters()).dtype)).pow(2).mean().backward()
        opt.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _noise_on(model, step, variability, noise_type="Gaussian", seed=SEED):
    """What the specification puts on each parameter at noise step `step` (0: nothing)."""
    return [torch.zeros_like(p) if step == 0 else
            spec.noise(noise_type, variability, seed, key, step, p.numel()).view_as(p).to(p.dtype)
            for key, p in enumerate(model.parameters())]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_through_torch_save_is_bit_exact(backend):
    model = _model()
    opt = nvrm_ext.NVRM(torch.optim.AdamW(model.parameters(), lr=1e-2), variability=0.05, num_iters=4,
                        seed=SEED, backend=backend)
    _train(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    _train(model, opt, 6, start=5)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt2 = nvrm_ext.NVRM(torch.optim.AdamW(resumed.parameters(), lr=1e-2), seed=99, backend=backend)
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.seed == SEED
    assert opt2.param_groups[0]["num_iters"] == 4 and opt2.param_groups[0]["variability"] == 0.05
    _train(resumed, opt2, 6, start=5)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_denoised_shows_the_weights_without_their_noise(backend):
    model = _model()
    opt = nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), variability=0.1,
                        num_iters=10, seed=SEED, backend=backend)
    _train(model, opt, 3)
    noisy = _params(model)
    expected = [w - n for w, n in zip(noisy, _noise_on(model, 3, 0.1))]
    with opt.denoised():
        assert opt.noise_removed
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p, e, rtol=0, atol=1e-6)
        clean = opt.clean_state_dict(model)
    for p, w in zip(model.parameters(), noisy):
        assert torch.equal(p, w)  # back bit for bit
    for (name, value), e in zip(clean.items(), expected):
        torch.testing.assert_close(value, e, rtol=0, atol=1e-6)
    assert torch.equal(opt.clean_state_dict(model)["0.weight"], clean["0.weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_variability_group_is_the_plain_inner_optimizer(backend):
    model, plain = _model(), _model()
    opt = nvrm_ext.NVRM(torch.optim.Adam([{"params": model[0].parameters(), "variability": 0.0},
                                          {"params": model[2].parameters()}], lr=1e-2),
                        variability=0.05, num_iters=3, seed=SEED, backend=backend)
    reference = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for step in range(4):
        opt.zero_grad()
        model(_batch(step)).pow(2).mean().backward()
        # the reference takes the gradient at the same (perturbed) weights
        for p, q in zip(model.parameters(), plain.parameters()):
            q.data.copy_(p.data)
            q.grad = p.grad.clone()
        reference.step()
        opt.step()
        for p, q in zip(model[0].parameters(), plain[0].parameters()):
            assert torch.equal(p, q)
        assert not all(torch.equal(p, q) for p, q in zip(model[2].parameters(), plain[2].parameters()))


def _assert_a_period_returns_the_weights(model, opt, start, noisy) -> None:
    """Three steps at lr 0 leave the weights noisy (`noisy`: all or any of them differ), clean
    inside denoised(); the 4th (num_iters=4) takes the noise off: the start, bit for bit."""
    _train(model, opt, 3)
    assert not noisy(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    with opt.denoised():
        for p, s in zip(model.parameters(), start):
            assert torch.equal(p, s)
    _train(model, opt, 1, start=3)  # the 4th step: the noise comes off
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p, s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_weights_come_back_exactly_after_a_period_without_updates(backend):
    """lr 0: the inner update changes nothing, so after num_iters steps the noise put on and
    taken off must leave the weights exactly as they were (the 16-bit compensation at work)."""
    model = _model(torch.bfloat16)
    start = _params(model)
    opt = nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.0), variability=0.3, num_iters=4,
                        seed=SEED, backend=backend)
    _assert_a_period_returns_the_weights(model, opt, start, noisy=all)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_float64_parameters_get_the_inner_update_plus_the_noise_in_float64(backend):
    """The inner torch.optim.SGD's own float64 update, then p += n_new - n_old in float64 with
    the float32 noise n (docs/noise.md §7): bit for bit, with Uniform noise, whose reference is exact."""
    if backend == "triton":
        pytest.importorskip("triton")
    model, plain = _model(torch.float64), _model(torch.float64)
    opt = nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), variability=0.05, num_iters=3,
                        noise_type="Uniform", seed=SEED, backend=backend)
    reference = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    def noise(key, p, step):
        if step == 0:
            return torch.zeros_like(p)
        return spec.noise("Uniform", 0.05, SEED, key, step, p.numel()).double().view_as(p)

    for step in range(1, 6):
        opt.zero_grad()
        model(_batch(step, torch.float64)).pow(2).mean().backward()
        for p, q in zip(model.parameters(), plain.parameters()):  # the same gradient at the same weights
            q.data.copy_(p.data)
            q.grad = p.grad.clone()
        reference.step()
        opt.step()
        old_step, new_step = (s if s % 3 else 0 for s in (step - 1, step))
        for key, (p, q) in enumerate(zip(model.parameters(), plain.parameters())):
            assert p.dtype == torch.float64
            assert torch.equal(p, q + (noise(key, p, new_step) - noise(key, p, old_step))), (step, key)
    assert all(s["momentum_buffer"].dtype == torch.float64 for s in opt.optimizer.state.values())


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_float64_weights_come_back_exactly_after_a_period_without_updates(backend):
    """float64 has no compensation buffer: the float32 noise is swapped in float64, so weights of
    float32 precision (a float32 model made float64) come back bit for bit."""
    if backend == "triton":
        pytest.importorskip("triton")
    model = _model().to(torch.float64)
    start = _params(model)
    opt = nvrm_ext.NVRM(torch.optim.Adam(model.parameters(), lr=0.0), variability=0.3, num_iters=4,
                        seed=SEED, backend=backend)
    _assert_a_period_returns_the_weights(model, opt, start, noisy=any)


def test_psgd_keeps_adding_noise():
    model = _model()
    start = _params(model)
    opt = nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.0), variability=0.1, num_iters=100,
                        seed=SEED, backend="torch", denoise=False)
    _train(model, opt, 2)
    for p, s, n1, n2 in zip(model.parameters(), start, _noise_on(model, 1, 0.1), _noise_on(model, 2, 0.1)):
        torch.testing.assert_close(p, s + n1 + n2, rtol=0, atol=1e-6)


def test_construction_errors():
    model = _model()
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        nvrm_ext.NVRM(model.parameters())
    with pytest.raises(TypeError, match="already puts noise"):
        nvrm_ext.NVRM(nvrm_ext.FusedVSGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already puts noise"):
        nvrm_ext.NVRM(nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.1)))
    with pytest.raises(TypeError, match="LBFGS"):
        nvrm_ext.NVRM(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="param group 1: Invalid num_iters"):
        nvrm_ext.NVRM(torch.optim.SGD([{"params": model[0].parameters()},
                                       {"params": model[2].parameters(), "num_iters": 0}], lr=0.1))
    with pytest.raises(ValueError, match="Invalid noise_type"):
        nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.1), noise_type="gauss")
    with pytest.raises(ValueError, match="Invalid variability"):
        nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.1), variability=-1)
    with pytest.raises(ValueError, match="Invalid backend"):
        nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.1), backend="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_invalid_edit_is_refused_before_the_inner_update(backend):
    model = _model()
    opt = nvrm_ext.NVRM(torch.optim.Adam(model.parameters(), lr=1e-2), num_iters=5, seed=SEED, backend=backend)
    _train(model, opt, 2)
    before, moments = _params(model), [s["exp_avg"].clone() for s in opt.state.values()]
    opt.param_groups[0]["num_iters"] = 0  # len() of an empty loader
    opt.zero_grad()
    model(_batch(9)).pow(2).mean().backward()
    with pytest.raises(ValueError, match="num_iters"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for s, m in zip(opt.state.values(), moments):
        assert torch.equal(s["exp_avg"], m)
    opt.param_groups[0]["num_iters"] = 5
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_rewritten_outside_are_refused_before_the_inner_update(backend):
    model = _model()
    opt = nvrm_ext.NVRM(torch.optim.Adam(model.parameters(), lr=1e-2), seed=SEED, backend=backend)
    _train(model, opt, 2)
    with torch.no_grad():
        model[0].weight.copy_(torch.ones_like(model[0].weight))
    rewritten = _params(model)
    opt.zero_grad()
    model(_batch(9)).pow(2).mean().backward()
    with pytest.raises(nvrm_ext.WeightsChangedError):
        opt.step()
    for p, b in zip(model.parameters(), rewritten):
        assert torch.equal(p, b)
    opt.reset_noise()  # the weights as they are are clean: steps go on
    opt.step()


def test_checkpoints_of_another_optimizer_are_refused_with_nothing_loaded():
    model = _model()
    opt = nvrm_ext.NVRM(torch.optim.Adam(model.parameters(), lr=1e-2), seed=SEED, backend="torch")
    _train(model, opt, 2)
    state = copy.deepcopy(opt.state_dict())
    fused = nvrm_ext.FusedVSGD(_model().parameters(), lr=0.1, backend="torch")
    with pytest.raises(ValueError, match="saved by NVRM"):
        fused.load_state_dict(state)
    with pytest.raises(ValueError, match="saved by FusedVSGD"):
        opt.load_state_dict(fused.state_dict())
    other = nvrm_ext.NVRM(torch.optim.SGD(_model().parameters(), lr=0.1), backend="torch")
    with pytest.raises(ValueError, match="holds the state of Adam"):
        other.load_state_dict(state)
    assert len(other.state) == 0
    broken = copy.deepcopy(state)
    broken["state"][0]["nvrm_noise_step"] = -3
    fresh = nvrm_ext.NVRM(torch.optim.Adam(_model().parameters(), lr=1e-2), backend="torch")
    with pytest.raises(ValueError):
        fresh.load_state_dict(broken)
    assert len(fresh.state) == 0  # the inner half was not loaded either


def test_groups_added_either_way_get_the_noise_hyperparameters():
    model = _model()
    inner = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt = nvrm_ext.NVRM(inner, variability=0.02, num_iters=7, seed=SEED, backend="torch")
    with pytest.raises(ValueError, match="Invalid variability"):
        opt.add_param_group({"params": [model[2].weight], "variability": float("nan")})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [model[2].weight], "variability": 0.5, "noise_type": "Uniform"})
    inner.add_param_group({"params": [model[2].bias]})  # behind the wrapper's back
    _train(model, opt, 1)
    groups = opt.param_groups
    assert (groups[1]["variability"], groups[1]["noise_type"], groups[1]["num_iters"]) == (0.5, "Uniform", 7)
    assert (groups[2]["variability"], groups[2]["noise_type"], groups[2]["num_iters"]) == (0.02, "Gaussian", 7)
    assert all(group["nvrm_seed"] == SEED for group in groups)


def test_an_lr_scheduler_drives_the_inner_optimizer():
    model = _model()
    opt = nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.1), seed=SEED, backend="torch")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        _train(model, opt, 1, start=step)
        scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 8)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_go_on_as_the_original(how):
    model = _model()
    opt = nvrm_ext.NVRM(torch.optim.Adam(model.parameters(), lr=1e-2), num_iters=4, seed=SEED, backend="cpu")
    _train(model, opt, 3)
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert opt2.param_groups is opt2.optimizer.param_groups
    assert all(q is p for q, p in zip(opt2.param_groups[0]["params"], model2.parameters()))
    _train(model, opt, 3, start=3)
    _train(model2, opt2, 3, start=3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_closure_is_evaluated_at_the_perturbed_weights():
    model = _model()
    opt = nvrm_ext.NVRM(torch.optim.SGD(model.parameters(), lr=0.1), seed=SEED, backend="torch")
    _train(model, opt, 1)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(_params(model))
        loss = model(_batch(5)).pow(2).mean()
        loss.backward()
        return loss

    perturbed = _params(model)
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], perturbed))


class _CapturableSGD(torch.optim.SGD):
    """torch's capturable optimizers need a GPU; on the CPU an SGD whose groups say capturable
    stands in for one (NVRM reads only the flag)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group["capturable"] = True


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_capturable_inner_optimizer_gets_device_counters_and_the_same_trajectory(backend):
    runs = []
    for inner in (torch.optim.SGD, _CapturableSGD):
        model = _model()
        opt = nvrm_ext.NVRM(inner(model.parameters(), lr=0.1, momentum=0.9), variability=0.05, num_iters=3,
                            seed=SEED, backend=backend)
        assert opt._engine.capturable == (inner is _CapturableSGD)
        _train(model, opt, 5)
        with opt.denoised():
            clean = _params(model)
        runs.append((_params(model), clean, opt.state_dict()))
    (noisy, clean, saved), (noisy2, clean2, saved2) = runs
    for a, b in zip(noisy + clean, noisy2 + clean2):
        assert torch.equal(a, b)
    assert saved["state"][0]["nvrm_noise_step"] == saved2["state"][0]["nvrm_noise_step"] == 5
