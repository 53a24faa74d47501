"""Which weights a model file holds, told apart by the weight samples in the optimizer's
state_dict (the deployment save's clean model file resumes exactly, a permuted or foreign load
is refused before anything changes); version counters bumped by every backend's launches (torch's
in-place error, two optimizers on the same parameters); a cleared state still knowing the noise
on its weights. Expectations come from the noise specification (nvrm_ext/noise.py), torch.optim,
and the optimizer's own documented equivalents (reset_noise() after loading clean weights)."""
import copy

import pytest
import torch

import nvrm_ext
from nvrm_ext import WeightsChangedError
from nvrm_ext import noise as spec
from test_weight_tracking import _bitwise, _load, _model, _snapshot, _train, _vsgd

ORDERS = ["model-first", "optimizer-first"]
MODES = [False, True]


def _small(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(100, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def _noise_now(opt, params):
    """The noise on each parameter now, by the specification (float32)."""
    out = []
    for key, p in enumerate(params):
        state = opt.state[p]
        step = int(state["noise_step"])
        noise_type = spec.NOISE_TYPES[int(state["noise_type"])]
        out.append(spec.from_memory_order(spec.noise(noise_type, float(state["noise_scale"]), opt.seed, key, step,
                                                     p.numel()), p))
    return out


# ---------------------------------------------------------------------- the deployment save
def _deployment_checkpoint(dtype, backend, capturable, how):
    model = _model(dtype)
    opt = _vsgd(model, backend, capturable=capturable)
    _train(model, opt, 3)
    if how == "clean_state_dict":
        checkpoint = {"model": opt.clean_state_dict(model), "optimizer": opt.state_dict()}
    else:  # the model saved inside denoised(), the optimizer outside it
        with opt.denoised():
            saved_model = copy.deepcopy(model.state_dict())
        checkpoint = {"model": saved_model, "optimizer": opt.state_dict()}
    return model, opt, copy.deepcopy(checkpoint)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("capturable", MODES, ids=["host", "capturable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("how", ["clean_state_dict", "inside denoised()"])
def test_a_clean_model_file_resumes_exactly_from_the_clean_weights(how, backend, dtype, capturable, order):
    """The README's deployment save: the model file is clean, the optimizer state says noise step
    3. The resumed run must equal the original declaring those clean weights clean
    (model.load_state_dict + reset_noise()), bit for bit, in either load order."""
    model, opt, checkpoint = _deployment_checkpoint(dtype, backend, capturable, how)
    model.load_state_dict(checkpoint["model"])
    opt.reset_noise()
    _train(model, opt, 3, first=3)

    resumed = _model(dtype, seed=5)
    resumed_opt = _vsgd(resumed, backend, seed=99, capturable=capturable)
    _load(resumed, resumed_opt, checkpoint, order)
    _train(resumed, resumed_opt, 3, first=3)
    assert _bitwise(_snapshot(model), _snapshot(resumed))


@pytest.mark.parametrize("dtype, capturable", [(torch.float32, False), (torch.bfloat16, True)])
def test_a_clean_model_file_resumes_exactly_on_triton(dtype, capturable):
    """The Triton kernels (under the interpreter here): the same check, one order, a small model."""
    def trained():
        model = _small(dtype)
        opt = _vsgd(model, "triton", capturable=capturable)
        _train(model, opt, 2)
        return model, opt

    model, opt = trained()
    checkpoint = copy.deepcopy({"model": opt.clean_state_dict(model), "optimizer": opt.state_dict()})
    model.load_state_dict(checkpoint["model"])
    opt.reset_noise()
    _train(model, opt, 2, first=2)
    resumed = _small(dtype, seed=5)
    resumed_opt = _vsgd(resumed, "triton", seed=99, capturable=capturable)
    _load(resumed, resumed_opt, checkpoint, "optimizer-first")
    _train(resumed, resumed_opt, 2, first=2)
    assert _bitwise(_snapshot(model), _snapshot(resumed))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_the_first_step_after_a_clean_resume_is_torch_sgd_from_the_clean_weights(backend, order):
    """Independent of the optimizer's own paths: after the resume from the clean model file,
    one step's clean weights are torch.optim.SGD's update of those weights with the saved
    momentum, and the noise on them is the specification's noise of the new step."""
    _, _, checkpoint = _deployment_checkpoint(torch.float32, backend, False, "clean_state_dict")
    resumed = _model(seed=5)
    resumed_opt = _vsgd(resumed, backend, seed=99)
    _load(resumed, resumed_opt, checkpoint, order)
    reference = _model(seed=5)
    reference.load_state_dict(checkpoint["model"])
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, foreach=False)
    for index, q in enumerate(reference.parameters()):
        sgd.state[q]["momentum_buffer"] = checkpoint["optimizer"]["state"][index]["momentum_buffer"].clone()
    _train(resumed, resumed_opt, 1, first=3)
    _train(reference, sgd, 1, first=3)
    params = list(resumed.parameters())
    assert all(int(resumed_opt.state[p]["noise_step"]) == 4 for p in params)
    for p, q, n in zip(params, reference.parameters(), _noise_now(resumed_opt, params)):
        torch.testing.assert_close(p.detach() - n, q.detach(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("capturable", MODES, ids=["host", "capturable"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_the_clean_samples_are_what_denoised_gives(backend, capturable):
    """Bit for bit, 16-bit compensation included: the sample positions of clean_state_dict()."""
    from nvrm_ext.backends import tables as T

    model = _model(torch.bfloat16)
    opt = _vsgd(model, backend, capturable=capturable)
    _train(model, opt, 3)
    clean = opt.clean_state_dict(model)
    samples = opt.state_dict()["state"]
    for index, (name, p) in enumerate(model.named_parameters()):
        assert _bitwise([samples[index]["weight_samples"][0]], [T.sample_view(p.detach()).contiguous()])
        assert _bitwise([samples[index]["weight_samples"][1]], [T.sample_view(clean[name]).contiguous()])
        assert not torch.equal(samples[index]["weight_samples"][0], samples[index]["weight_samples"][1])


@pytest.mark.parametrize("order", ORDERS)
def test_a_noisy_model_file_still_resumes_as_saved(order):
    model = _model()
    opt = _vsgd(model)
    _train(model, opt, 3)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    _train(model, opt, 3, first=3)
    resumed = _model(seed=5)
    resumed_opt = _vsgd(resumed, seed=99)
    _load(resumed, resumed_opt, checkpoint, order)
    _train(resumed, resumed_opt, 3, first=3)
    assert _bitwise(_snapshot(model), _snapshot(resumed))


def _assert_refused_unchanged(resumed, resumed_opt, operation, match):
    weights = _snapshot(resumed)
    before = copy.deepcopy(resumed_opt.state_dict())
    with pytest.raises(WeightsChangedError, match=match):
        operation()
    assert _bitwise(_snapshot(resumed), weights)
    assert not resumed_opt.noise_removed
    after = resumed_opt.state_dict()
    for index, state in before["state"].items():
        assert after["state"][index].keys() == state.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert _bitwise([after["state"][index][key]], [value]), key
            else:
                assert after["state"][index][key] == value, key


@pytest.mark.parametrize("operation", ["step", "denoised", "remove_noise", "clean_state_dict"])
@pytest.mark.parametrize("order", ORDERS)
def test_a_model_file_of_another_run_is_refused_before_anything_changes(order, operation):
    _, _, checkpoint = _deployment_checkpoint(torch.float32, "cpu", False, "clean_state_dict")
    other = _model(seed=7)
    other_opt = _vsgd(other, seed=3)
    _train(other, other_opt, 2)
    checkpoint["model"] = copy.deepcopy(other.state_dict())
    resumed = _model(seed=5)
    resumed_opt = _vsgd(resumed, seed=99)
    _load(resumed, resumed_opt, checkpoint, order)

    def run():
        if operation == "step":
            _train(resumed, resumed_opt, 1, first=3)
        elif operation == "denoised":
            with resumed_opt.denoised():
                pass
        elif operation == "remove_noise":
            resumed_opt.remove_noise()
        else:
            resumed_opt.clean_state_dict(resumed)

    _assert_refused_unchanged(resumed, resumed_opt, run,
                              r"parameter 0 \(shape \(100, 100\)\) holds neither.*model file.*reset_noise")
    resumed_opt.reset_noise()  # the way out: declare them clean
    _train(resumed, resumed_opt, 1, first=3)


@pytest.mark.parametrize("order", ORDERS)
def test_a_state_loaded_in_another_parameter_order_is_refused(order):
    """Same shapes, other order: the noise would be removed with the wrong keys."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 20), torch.nn.Tanh(), torch.nn.Linear(20, 20))
    opt = nvrm_ext.FusedVSGD(model.parameters(), lr=0.05, momentum=0.9, variability=0.05, seed=1, backend="cpu")
    x = torch.randn(8, 20)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    resumed = copy.deepcopy(model)
    first, second = resumed[0], resumed[2]
    permuted = nvrm_ext.FusedVSGD([second.weight, second.bias, first.weight, first.bias], lr=0.05, momentum=0.9,
                                  variability=0.05, seed=1, backend="cpu")
    _load(resumed, permuted, checkpoint, order)

    def step():
        permuted.zero_grad()
        resumed(x).square().mean().backward()
        permuted.step()

    _assert_refused_unchanged(resumed, permuted, step, r"parameter 0 \(shape \(20, 20\)\).*another order")


@pytest.mark.parametrize("order", ORDERS)
def test_a_state_dict_without_samples_still_loads_and_is_trusted(order):
    """The previous format: no samples, the state is trusted as saved (a noisy model file)."""
    model = _model()
    opt = _vsgd(model)
    _train(model, opt, 3)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    for state in checkpoint["optimizer"]["state"].values():
        del state["weight_samples"]
    _train(model, opt, 2, first=3)
    resumed = _model(seed=5)
    resumed_opt = _vsgd(resumed, seed=99)
    _load(resumed, resumed_opt, checkpoint, order)
    _train(resumed, resumed_opt, 2, first=3)
    assert _bitwise(_snapshot(model), _snapshot(resumed))


def test_malformed_samples_are_refused_at_load_with_nothing_loaded():
    model = _small()
    opt = _vsgd(model)
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["weight_samples"] = torch.zeros(2, 3)
    fresh = _vsgd(_small(seed=1), seed=5)
    with pytest.raises(ValueError, match=r"parameter 0 has 'weight_samples' \(2, 3\).*\(2, 8\).*nothing was loaded"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0 and fresh.seed == 5


def test_a_state_dict_taken_before_the_model_is_loaded_passes_the_samples_on():
    """Optimizer loaded, state_dict() taken before the model file is: nothing is decided yet."""
    _, _, checkpoint = _deployment_checkpoint(torch.float32, "cpu", False, "clean_state_dict")
    resumed = _model(seed=5)
    resumed_opt = _vsgd(resumed, seed=99)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    again = copy.deepcopy(resumed_opt.state_dict())
    for index, state in checkpoint["optimizer"]["state"].items():
        assert torch.equal(again["state"][index]["weight_samples"], state["weight_samples"])
    resumed.load_state_dict(checkpoint["model"])
    twin = _model(seed=6)
    twin_opt = _vsgd(twin, seed=98)
    _load(twin, twin_opt, {"model": checkpoint["model"], "optimizer": again}, "model-first")
    _train(resumed, resumed_opt, 2, first=3)
    _train(twin, twin_opt, 2, first=3)
    assert _bitwise(_snapshot(resumed), _snapshot(twin))


# ---------------------------------------------------------------------- version counters
BACKENDS = ["torch", "cpu", "triton"]


@pytest.mark.parametrize("capturable", MODES, ids=["host", "capturable"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_between_forward_and_backward_raises_torchs_inplace_error(backend, capturable):
    model = _small()
    opt = _vsgd(model, backend, capturable=capturable)
    _train(model, opt, 1)
    loss = model(torch.randn(4, 100)).square().mean()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # the same for torch.optim (the reference behaviour; its fused CPU step, in torch 2.13, bumps nothing)
    reference = _small()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, foreach=False)
    loss = reference(torch.randn(4, 100)).square().mean()
    for p in reference.parameters():
        p.grad = torch.ones_like(p)
    sgd.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_denoised_and_clean_state_dict_bump_what_they_write(backend):
    model = _small()
    opt = _vsgd(model, backend)
    _train(model, opt, 1)
    versions = [p._version for p in model.parameters()]
    with opt.denoised():
        assert all(p._version > v for p, v in zip(model.parameters(), versions))


@pytest.mark.parametrize("inside_denoised", [False, True])
@pytest.mark.parametrize("capturable", MODES, ids=["host", "capturable"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_optimizers_stepping_the_same_parameters_are_refused(backend, capturable, inside_denoised):
    """Each would remove noise the other put there."""
    model = _small()
    first = _vsgd(model, backend, seed=1, capturable=capturable)
    second = _vsgd(model, backend, seed=2, capturable=capturable)
    _train(model, first, 1)
    _train(model, second, 1)
    if inside_denoised:
        operation = first.denoised().__enter__
    else:
        def operation():
            _train(model, first, 1, first=1)
    weights = _snapshot(model)
    with pytest.raises(WeightsChangedError, match="parameter 0"):
        operation()
    assert _bitwise(_snapshot(model), weights)


# ---------------------------------------------------------------------- cleared states
def _clear(opt, params, how):
    if how == "state.clear()":
        opt.state.clear()
    else:
        for p in params:
            opt.state[p] = {}


@pytest.mark.parametrize("operation", ["denoised", "clean_state_dict", "remove_noise"])
@pytest.mark.parametrize("how", ["state.clear()", "state[p] = {}"])
@pytest.mark.parametrize("capturable", MODES, ids=["host", "capturable"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_cleared_state_still_shows_the_clean_weights(backend, capturable, how, operation):
    model = _model(torch.bfloat16)
    opt = _vsgd(model, backend, capturable=capturable)
    _train(model, opt, 3)
    params = list(model.parameters())
    expected = opt.clean_state_dict(model)
    noisy = _snapshot(model)
    # the specification's clean weights agree (bf16 rounding aside)
    for p, n, name in zip(params, _noise_now(opt, params), [n for n, _ in model.named_parameters()]):
        torch.testing.assert_close(expected[name].float(),
                                   (p.detach().float() + opt.state[p]["compensation"].float() - n),
                                   rtol=0, atol=2e-2)
    _clear(opt, params, how)
    if operation == "clean_state_dict":
        clean = opt.clean_state_dict(model)
        assert _bitwise(list(clean.values()), list(expected.values()))
    elif operation == "denoised":
        with opt.denoised():
            assert _bitwise(_snapshot(model), list(expected.values()))
        assert _bitwise(_snapshot(model), noisy)
    else:
        opt.remove_noise()
        assert _bitwise(_snapshot(model), list(expected.values()))
        opt.restore_noise()
    assert all(int(opt.state[p]["step"]) == 0 and "momentum_buffer" not in opt.state[p] for p in params)


@pytest.mark.parametrize("capturable", MODES, ids=["host", "capturable"])
def test_a_state_dict_saved_after_a_clear_keeps_the_noise(capturable):
    """Saved right after the clear, loaded into a fresh optimizer: the next step removes the
    noise that is on the weights, like the optimizer that was cleared and stepped on."""
    model = _model()
    opt = _vsgd(model, capturable=capturable)
    _train(model, opt, 3)
    opt.state.clear()
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert all(s["noise_step"] == 3 and s["step"] == 0 for s in checkpoint["optimizer"]["state"].values())
    _train(model, opt, 2, first=3)
    resumed = _model(seed=5)
    resumed_opt = _vsgd(resumed, seed=99, capturable=capturable)
    _load(resumed, resumed_opt, checkpoint, "optimizer-first")
    _train(resumed, resumed_opt, 2, first=3)
    assert _bitwise(_snapshot(model), _snapshot(resumed))


@pytest.mark.parametrize("before_the_clear", ["nothing", "denoised()"])
@pytest.mark.parametrize("samples", [True, False], ids=["samples", "previous format"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("capturable", MODES, ids=["host", "capturable"])
def test_a_state_cleared_right_after_a_load_keeps_the_noise(capturable, order, samples, before_the_clear):
    """Cleared before any step: the counters and samples of the load still tell the noise. The
    reference: the optimizer that was not saved, cleared at the same point."""
    model = _model()
    opt = _vsgd(model, capturable=capturable)
    _train(model, opt, 3)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    if not samples:
        for state in checkpoint["optimizer"]["state"].values():
            del state["weight_samples"]
    opt.state.clear()
    _train(model, opt, 2, first=3)
    resumed = _model(seed=5)
    resumed_opt = _vsgd(resumed, seed=99, capturable=capturable)
    _load(resumed, resumed_opt, checkpoint, order)
    if before_the_clear == "denoised()":
        with resumed_opt.denoised():
            pass
    resumed_opt.state.clear()
    _train(resumed, resumed_opt, 2, first=3)
    assert _bitwise(_snapshot(model), _snapshot(resumed))


def test_a_cleared_state_whose_weights_were_rewritten_takes_them_as_they_are():
    model = _model()
    opt = _vsgd(model)
    _train(model, opt, 3)
    clean = opt.clean_state_dict(model)
    opt.state.clear()
    model.load_state_dict(clean)
    with opt.denoised():  # nothing to remove: a fresh state on loaded weights
        assert _bitwise(_snapshot(model), list(clean.values()))


@pytest.mark.parametrize("aliased", [False, True], ids=["own counters", "views of one buffer"])
def test_steady_steps_compare_no_samples(monkeypatch, aliased):
    """The optimizer's own bumps are recorded, so a steady step reads no weights back (a device
    sync on a GPU), also where parameters share one version counter (views of one buffer)."""
    import nvrm_ext.optim.records as records

    buffer = torch.randn(40)
    params = ([buffer[:20].detach().requires_grad_(), buffer[20:].detach().requires_grad_()] if aliased
              else [torch.nn.Parameter(torch.randn(20)) for _ in range(2)])
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, seed=1, backend="cpu")
    calls = []
    original = records._samples_differ
    monkeypatch.setattr(records, "_samples_differ", lambda *args: calls.append(1) or original(*args))
    for _ in range(4):
        for p in params:
            p.grad = torch.ones(20)
        opt.step()
    assert calls == []
    with torch.no_grad():
        params[0].add_(1.0)  # a write of our own: seen
    with pytest.raises(WeightsChangedError, match="parameter 0"):
        opt.step()
    assert calls


@pytest.mark.parametrize("then", ["restore_noise()", "state_dict() and a resume"])
@pytest.mark.parametrize("capturable", MODES, ids=["host", "capturable"])
def test_a_state_cleared_while_the_noise_is_removed(capturable, then):
    """remove_noise(), state.clear(), then restore_noise() (or a checkpoint): the held noisy copies
    still carry their noise, as if the state had been cleared after restore_noise()."""
    model = _model(torch.bfloat16)
    opt = _vsgd(model, capturable=capturable)
    _train(model, opt, 3)
    twin = copy.deepcopy(model)
    twin_opt = _vsgd(twin, capturable=capturable)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_opt.state.clear()
    opt.remove_noise()
    opt.state.clear()
    if then == "restore_noise()":
        opt.restore_noise()
    else:
        checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
        model = _model(torch.bfloat16, seed=5)
        opt = _vsgd(model, seed=99, capturable=capturable)
        _load(model, opt, checkpoint, "optimizer-first")
        opt.restore_noise()
    _train(model, opt, 2, first=3)
    _train(twin, twin_opt, 2, first=3)
    assert _bitwise(_snapshot(model), _snapshot(twin))


def test_weights_replaced_after_a_checked_load_and_a_clear_are_taken_as_they_are():
    """Load, denoised() (the load is checked), other clean weights loaded, state cleared: a fresh
    state on those weights, nothing subtracted from them."""
    model = _model()
    opt = _vsgd(model)
    _train(model, opt, 3)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    clean = opt.clean_state_dict(model)
    resumed = _model(seed=5)
    resumed_opt = _vsgd(resumed, seed=99)
    _load(resumed, resumed_opt, checkpoint, "model-first")
    with resumed_opt.denoised():
        pass
    resumed.load_state_dict(clean)
    resumed_opt.state.clear()
    with resumed_opt.denoised():
        assert _bitwise(_snapshot(resumed), list(clean.values()))
