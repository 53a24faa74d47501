"""Exact denoised() round trips, remove_noise() / restore_noise(), and weights changed outside
the optimizer (model.load_state_dict of clean weights, copy_) detected before any noise
operation touches them; reset_noise() as the way out; the ordinary resume stays exact."""
import copy

import pytest
import torch

import nvrm_ext
from nvrm_ext import WeightsChangedError

BACKENDS = ["torch", "cpu", "triton"]


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Tanh(), torch.nn.Linear(100, 3)).to(dtype)


def _train(model, opt, steps, first=0):
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(500 + step)
        x = torch.randn(16, 100, generator=g).to(next(model.parameters()).dtype)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _bitwise(a, b):
    """Bit patterns equal (also for -0 / NaN), dtype included."""
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
                                    for x, y in zip(a, b))


def _vsgd(model, backend="cpu", seed=11, **kwargs):
    return nvrm_ext.FusedVSGD(model.parameters(), lr=0.05, momentum=0.9, variability=0.05, num_iters=50,
                              seed=seed, backend=backend, **kwargs)


# ---------------------------------------------------------------------- exact round trips
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoised_gives_back_the_noisy_weights_bit_for_bit(backend, dtype):
    """A 100x100 layer: the old regenerate-and-add-back exit changed ~9% of fp32 weights by an ulp."""
    model = _model(dtype)
    opt = _vsgd(model, backend)
    _train(model, opt, 3)
    noisy = _snapshot(model)
    compensation = [opt.state[p]["compensation"].clone() for p in model.parameters()] if dtype != torch.float32 else []
    with opt.denoised():
        clean = _snapshot(model)
        assert not any(torch.equal(c, n) for c, n in zip(clean, noisy))  # the noise was really removed
    assert _bitwise(_snapshot(model), noisy)
    assert _bitwise([opt.state[p]["compensation"] for p in model.parameters()] if compensation else [], compensation)


def test_denoised_round_trip_leaves_the_trajectory_unchanged():
    """Evaluating between steps must not change training: the same run with and without
    denoised() blocks (and remove_noise()/restore_noise() pairs) ends bit for bit equal."""
    reference, evaluated = _model(), _model()
    opt_ref, opt_eval = _vsgd(reference), _vsgd(evaluated)
    for step in range(6):
        _train(reference, opt_ref, 1, first=step)
        _train(evaluated, opt_eval, 1, first=step)
        if step % 2:
            with opt_eval.denoised():
                evaluated(torch.randn(4, 100))
        else:
            opt_eval.remove_noise()
            opt_eval.remove_noise()  # no-op
            opt_eval.restore_noise()
            opt_eval.restore_noise()  # no-op
    assert _bitwise(_snapshot(reference), _snapshot(evaluated))


def test_remove_noise_shows_the_clean_weights_and_refuses_step_and_nesting():
    model = _model()
    opt = _vsgd(model)
    _train(model, opt, 3)
    clean = opt.clean_state_dict(model)
    opt.remove_noise()
    assert all(torch.equal(clean[name], p.detach()) for name, p in model.named_parameters())
    assert all(torch.equal(clean[name], t) for name, t in opt.clean_state_dict(model).items())
    with pytest.raises(RuntimeError, match="restore_noise"):
        _train(model, opt, 1)
    with pytest.raises(RuntimeError, match="do not nest"):
        with opt.denoised():
            pass
    assert opt.noise_removed
    opt.restore_noise()
    _train(model, opt, 1)  # works again


# ---------------------------------------------------------------------- weights changed outside
def _trained(backend="cpu", capturable=False):
    model = _model()
    opt = _vsgd(model, backend, capturable=capturable)
    _train(model, opt, 3)
    return model, opt


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("operation", ["denoised", "clean_state_dict", "step", "remove_noise"])
def test_reloading_clean_weights_is_detected_before_anything_changes(operation, capturable):
    model, opt = _trained(capturable=capturable)
    model.load_state_dict(opt.clean_state_dict(model))  # e.g. load_best_model_at_end, save_only_model
    weights = _snapshot(model)
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(WeightsChangedError, match=r"parameter 0 \(shape \(100, 100\)\).*reset_noise.*load_state_dict"):
        if operation == "denoised":
            with opt.denoised():
                pass
        elif operation == "clean_state_dict":
            opt.clean_state_dict(model)
        elif operation == "remove_noise":
            opt.remove_noise()
        else:
            _train(model, opt, 1, first=3)
    assert _bitwise(_snapshot(model), weights)
    assert not opt.noise_removed
    after = opt.state_dict()
    assert all(after["state"][i]["step"] == state["state"][i]["step"] == 3 for i in state["state"])
    assert all(torch.equal(after["state"][i]["momentum_buffer"], state["state"][i]["momentum_buffer"])
               for i in state["state"])


@pytest.mark.parametrize("capturable", [False, True])
def test_reset_noise_declares_the_loaded_weights_clean(capturable):
    model, opt = _trained(capturable=capturable)
    clean = opt.clean_state_dict(model)
    model.load_state_dict(clean)
    opt.reset_noise()
    with opt.denoised():  # nothing to remove: the weights are what was loaded
        assert all(torch.equal(clean[name], p) for name, p in model.named_parameters())
    # the next step updates the loaded weights and perturbs them afresh: its clean result is
    # the plain momentum-SGD update of the loaded weights (torch.optim.SGD as the reference)
    reference = _model()
    reference.load_state_dict(clean)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, foreach=False)
    for p, q in zip(model.parameters(), reference.parameters()):
        sgd.state[q]["momentum_buffer"] = opt.state[p]["momentum_buffer"].detach().clone()
    _train(model, opt, 1, first=3)
    _train(reference, sgd, 1, first=3)
    with opt.denoised():
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(model[0].weight, reference[0].weight, atol=1e-3)  # fresh noise on it


def test_a_copy_of_the_same_values_is_accepted():
    """A version bump with unchanged values (a broadcast, copy_ of the same weights) is fine."""
    model, opt = _trained()
    twin, twin_opt = _trained()
    for p in model.parameters():
        p.data.add_(0)  # through .data: no version bump
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.clone())  # a version bump, the same values
    _train(model, opt, 2, first=3)
    _train(twin, twin_opt, 2, first=3)
    assert _bitwise(_snapshot(model), _snapshot(twin))


def test_new_storage_is_compared_by_value():
    """p.data = ... (a new storage, no version bump): the same values pass, others are caught."""
    model, opt = _trained()
    twin, twin_opt = _trained()
    for p in model.parameters():
        p.data = p.data.clone()
    _train(model, opt, 1, first=3)
    _train(twin, twin_opt, 1, first=3)
    assert _bitwise(_snapshot(model), _snapshot(twin))
    clean = opt.clean_state_dict(model)
    model[0].weight.data = clean["0.weight"].clone()
    with pytest.raises(WeightsChangedError, match="parameter 0"):
        opt.clean_state_dict(model)


def test_a_parameter_left_out_of_the_last_step_is_still_watched():
    model, opt = _trained()
    clean = opt.clean_state_dict(model)
    model[2].weight.grad = None  # the next step rebuilds its launch data without this parameter
    model[2].bias.grad = None
    for p in model[0].parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with torch.no_grad():
        model[2].weight.copy_(clean["2.weight"])
    with pytest.raises(WeightsChangedError, match=r"parameter 2 \(shape \(3, 100\)\)"):
        opt.remove_noise()


def _load(model, opt, checkpoint, order):
    """Load a {"model", "optimizer"} checkpoint in the given order ("model-first" or not)."""
    if order == "model-first":
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
    else:
        opt.load_state_dict(checkpoint["optimizer"])
        model.load_state_dict(checkpoint["model"])


@pytest.mark.parametrize("order", ["model-first", "optimizer-first"])
@pytest.mark.parametrize("resumer_trained", [False, True])
def test_ordinary_resume_stays_exact_in_both_orders(order, resumer_trained):
    model, opt = _trained()
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    _train(model, opt, 4, first=3)
    resumed = _model(seed=5)
    resumed_opt = _vsgd(resumed, seed=99)
    if resumer_trained:  # its own records exist and must not flag the loaded weights
        _train(resumed, resumed_opt, 2, first=40)
    _load(resumed, resumed_opt, checkpoint, order)
    _train(resumed, resumed_opt, 4, first=3)
    assert _bitwise(_snapshot(model), _snapshot(resumed))


# ---------------------------------------------------------------------- state_dict while removed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["model-first", "optimizer-first"])
def test_checkpoint_taken_while_removed_resumes_exactly_from_a_clean_model_file(dtype, order):
    """transformers' Trainer saves inside remove_noise(): the model file holds clean weights, the
    optimizer state the exact noisy copies; restore_noise() after loading puts them back."""
    model = _model(dtype)
    opt = _vsgd(model)
    _train(model, opt, 3)
    opt.remove_noise()
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    clean = _snapshot(model)
    opt.restore_noise()
    _train(model, opt, 4, first=3)

    resumed = _model(dtype, seed=5)
    resumed_opt = _vsgd(resumed, seed=99)
    _load(resumed, resumed_opt, checkpoint, order)
    assert resumed_opt.noise_removed
    assert _bitwise(_snapshot(resumed), clean)
    with pytest.raises(RuntimeError, match="restore_noise"):
        _train(resumed, resumed_opt, 1, first=3)
    resumed_opt.restore_noise()
    _train(resumed, resumed_opt, 4, first=3)
    assert _bitwise(_snapshot(model), _snapshot(resumed))
    assert all("noisy_param" not in s for s in resumed_opt.state_dict()["state"].values())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_remove_noise_refused_in_a_later_bucket_changes_nothing(backend, monkeypatch):
    """remove_noise() over two (device, dtype) buckets whose second launch is refused: the
    first bucket's weights (and 16-bit compensation) are put back bit for bit and the optimizer
    is not left believing the noise is removed. (Fault injection: the second launch raises.)"""
    torch.manual_seed(0)
    fp32, bf16 = torch.nn.Linear(20, 20), torch.nn.Linear(20, 20).to(torch.bfloat16)
    params = list(fp32.parameters()) + list(bf16.parameters())
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, variability=0.05, backend=backend, seed=3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = _snapshot(fp32) + _snapshot(bf16)
    compensation = [opt.state[p]["compensation"].clone() for p in bf16.parameters()]
    launches = []
    real_launch = type(opt)._launch

    def launch_then_refuse(self, *args, **kwargs):
        launches.append(args[2])  # the bucket
        if len(launches) == 2:
            raise ValueError("refused (injected)")
        return real_launch(self, *args, **kwargs)

    monkeypatch.setattr(type(opt), "_launch", launch_then_refuse)
    with pytest.raises(ValueError, match="injected"):
        opt.remove_noise()
    monkeypatch.undo()
    assert len(launches) == 2 and not opt.noise_removed
    assert _bitwise(_snapshot(fp32) + _snapshot(bf16), before)
    assert all(torch.equal(opt.state[p]["compensation"], c) for p, c in zip(bf16.parameters(), compensation))
    with opt.denoised():  # still usable: the noise comes off and goes back
        pass
    assert _bitwise(_snapshot(fp32) + _snapshot(bf16), before)
