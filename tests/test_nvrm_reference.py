"""NVRM(any optimizer) against the plain reference, step by step.

After every step the weights must equal "the same torch optimizer class stepped on a copy of the
perturbed weights with the same gradients, then the specified swap" (tests/nvrm_reference.py:
torch.optim and nvrm_ext/noise.py, nothing of the code under test), and the inner optimizer's
state must be exactly the plain optimizer's (the inner step sees the same weights and gradients).
The model has odd sizes, a parameter transposed in memory, three groups (the second with its
own noise type, scale and num_iters, the third with variability 0) and a parameter that misses
its gradient for two steps, so its noise counter lags; num_iters is small enough that the
clean num_iters-th steps happen.
"""
from __future__ import annotations

import pytest
import torch

import nvrm_ext
from nvrm_reference import ATOL, RTOL, LockstepReference, assert_weights_equal

SEED = 77
STEPS = 8
NOISE = dict(variability=0.02, num_iters=3, noise_type="Gaussian")
SHAPES = [(7, 5), (13,), (3, 7), (4,), (5, 4), (1,)]
MATRIX_SHAPES = [(7, 5), (6, 3), (3, 7), (4, 6), (5, 4), (2, 9)]  # Muon: 2-D parameters only
TRANSPOSED = 2  # this parameter is stored transposed (strides (1, 3))
NO_GRAD = {2: [1], 3: [1]}  # step -> parameters without a gradient in that step


def make_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for index, shape in enumerate(shapes):
        if index == TRANSPOSED:
            t = torch.randn(tuple(reversed(shape)), generator=g).t()
        else:
            t = torch.randn(shape, generator=g)
        params.append(torch.nn.Parameter(t))
    return params


def make_groups(params, lr_scale=None):
    """Three groups: the NVRM defaults; Uniform noise of its own scale and num_iters (and, with
    `lr_scale`, its own lr); variability 0 (no noise at all)."""
    second = {"params": [params[1], params[2], params[5]], "variability": 0.05, "noise_type": "Uniform",
              "num_iters": 4}
    if lr_scale is not None:
        second["lr_scale"] = lr_scale
    return [{"params": [params[0], params[3]]}, second, {"params": [params[4]], "variability": 0.0}]


def gradient(p, step):
    """A smooth function of the (perturbed) weights, as in training; different every step."""
    return 2.0 * (p - 0.1 * step) + 0.5 * torch.sin(3.0 * p)


def set_grads(params, step):
    for index, p in enumerate(params):
        p.grad = None if index in NO_GRAD.get(step, ()) else gradient(p.detach(), step)


def _with_lr(groups, options):
    """Group options for the inner optimizer: the group's lr_scale (a test device) applied to lr."""
    out = []
    for group in groups:
        group = dict(group)
        scale = group.pop("lr_scale", None)
        if scale is not None:
            group["lr"] = options["lr"] * scale
        out.append(group)
    return out


def lion_class():
    from lion_pytorch import Lion  # the test extra installs lion-pytorch

    return Lion


# name -> (optimizer class (or a function returning it), options, shapes[, steps])
INNER = {
    "SGD-momentum-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                                    foreach=False), SHAPES),
    "SGD-foreach": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2, foreach=True), SHAPES),
    "Adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, foreach=False), SHAPES),
    "AdamW-foreach": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=True), SHAPES),
    "AdamW-fused": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, fused=True), SHAPES),
    "Adafactor": (torch.optim.Adafactor, dict(lr=1e-2, weight_decay=1e-2, foreach=False), SHAPES),
    "Muon": (torch.optim.Muon, dict(lr=2e-2, weight_decay=0.1, momentum=0.9), MATRIX_SHAPES, 5),  # slow on CPU
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True, foreach=False), SHAPES),
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.1, lr_decay=1e-3, foreach=False), SHAPES),
    "NAdam": (torch.optim.NAdam, dict(lr=1e-2, weight_decay=1e-2, foreach=False), SHAPES),
    "RAdam": (torch.optim.RAdam, dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=1e-2, foreach=False),
              SHAPES),
    "Adamax": (torch.optim.Adamax, dict(lr=1e-2, foreach=False), SHAPES),
    "ASGD": (torch.optim.ASGD, dict(lr=1e-2, t0=3, lambd=1e-2, foreach=False), SHAPES),
    # lion-pytorch (lucidrains): a maintained, dependency-free, elementwise optimizer that people
    # use with NVRM's intended workloads; its sign update makes any perturbation of the inner
    # step's inputs visible.
    "Lion": (lion_class, dict(lr=1e-3, weight_decay=0.1), SHAPES),
}


def inner_factory(name):
    cls, options = INNER[name][:2]
    if cls is lion_class:
        cls = lion_class()
    return lambda groups: cls(_with_lr(groups, options), **options)


def run_against_reference(name, backend, steps=None, denoise=True, check_denoised_at=4):
    shapes = INNER[name][2]
    steps = steps or (INNER[name][3:] or (STEPS,))[0]
    make_inner = inner_factory(name)
    params = make_params(shapes)
    groups = make_groups(params, lr_scale=0.5)
    inner = make_inner(groups)
    opt = nvrm_ext.NVRM(inner, **NOISE, seed=SEED, backend=backend, denoise=denoise)
    reference = LockstepReference(make_inner, groups, NOISE, SEED, denoise)
    ordered = reference.params  # the parameters in key order (all groups, flat)
    for step in range(steps):
        set_grads(params, step)
        expected = reference.step()
        opt.step()
        assert_weights_equal(ordered, expected, what=f"NVRM({name})[{backend}] step {step}:")
        for index, p in enumerate(ordered):  # the inner step saw what the plain one saw
            _assert_same_state(opt.optimizer.state.get(p, {}), reference.inner_state(index),
                               f"NVRM({name}) step {step}, parameter {index}")
        if denoise and step == check_denoised_at:
            noisy = [p.detach().clone() for p in ordered]
            with opt.denoised():
                assert_weights_equal(ordered, reference.clean(), what=f"NVRM({name}) denoised() at step {step}:")
            assert all(torch.equal(p, q) for p, q in zip(ordered, noisy))
    return opt, ordered


def _assert_same_state(state, expected, what):
    state = {k: v for k, v in state.items()}
    assert set(expected) <= set(state), f"{what}: inner state {sorted(state)}, expected {sorted(expected)}"
    for key, value in expected.items():
        mine = state[key]
        if isinstance(value, torch.Tensor):
            assert isinstance(mine, torch.Tensor) and mine.dtype == value.dtype and torch.equal(mine, value), \
                f"{what}: inner state {key!r} differs"
        else:
            assert mine == value, f"{what}: inner state {key!r}: {mine!r} != {value!r}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", sorted(INNER))
def test_nvrm_equals_inner_step_on_perturbed_weights_then_the_swap(name, backend):
    run_against_reference(name, backend)


def test_nvrm_triton_backend_equals_the_reference():
    run_against_reference("AdamW-foreach", "triton", steps=5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_nvrm_denoise_false_keeps_every_noise_psgd(backend):
    run_against_reference("SGD-momentum-nesterov", backend, denoise=False)


def test_nvrm_fills_the_noise_hyperparameters_into_the_inner_groups():
    params = make_params(SHAPES)
    inner = torch.optim.SGD(make_groups(params), lr=0.1)
    opt = nvrm_ext.NVRM(inner, **NOISE, seed=SEED, backend="torch")
    assert opt.optimizer is inner and opt.param_groups is inner.param_groups and opt.seed == SEED
    expected = [(0.02, 3, "Gaussian"), (0.05, 4, "Uniform"), (0.0, 3, "Gaussian")]
    for group, (variability, num_iters, noise_type) in zip(opt.param_groups, expected):
        assert (group["variability"], group["num_iters"], group["noise_type"]) == (variability, num_iters, noise_type)
        assert group["nvrm_seed"] == SEED


# ---------------------------------------------------------------------- NVRM(SGD/Adam) vs the fused optimizers
FUSED_PAIRS = {
    "SGD": (torch.optim.SGD, nvrm_ext.FusedVSGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "SGD-nesterov": (torch.optim.SGD, nvrm_ext.FusedVSGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "Adam": (torch.optim.Adam, nvrm_ext.FusedVAdam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    "AdamW": (torch.optim.AdamW, nvrm_ext.FusedVAdam, dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("pair", sorted(FUSED_PAIRS))
def test_nvrm_agrees_with_the_fused_optimizer_given_the_same_seed(pair, backend):
    """The fused kernels do the update and the swap in one expression (p - n(old) - lr*d +
    n(new), rounded once per element), NVRM in two launches (the inner update, then p += n(new)
    - n(old)): they may differ by about one rounding of the weights per step, which can
    accumulate over the trajectory, never by a noise (about `variability`)."""
    inner_cls, fused_cls, options = FUSED_PAIRS[pair]
    fused_options = dict(options, decoupled=True) if inner_cls is torch.optim.AdamW else options
    nvrm_params, fused_params = make_params(SHAPES), make_params(SHAPES)
    nvrm = nvrm_ext.NVRM(inner_cls(make_groups(nvrm_params), **options), **NOISE, seed=SEED, backend=backend)
    fused = fused_cls(make_groups(fused_params), **fused_options, **NOISE, seed=SEED, backend=backend)
    for step in range(STEPS):
        set_grads(nvrm_params, step)
        set_grads(fused_params, step)
        nvrm.step()
        fused.step()
        for index, (p, q) in enumerate(zip(nvrm_params, fused_params)):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=(step + 1) * RTOL, atol=(step + 1) * ATOL,
                                       msg=lambda m, index=index: f"{pair} step {step} parameter {index}: {m}")


def test_nvrm_add_param_group_and_lr_scheduler():
    """A group added later takes the next keys and its own noise settings (defaults filled in);
    an LR scheduler on the wrapper drives the inner optimizer's lr."""
    params = make_params(SHAPES)
    groups = make_groups(params)
    first, added = groups[:2], groups[2]
    make_inner = inner_factory("Adam")
    opt = nvrm_ext.NVRM(make_inner(first), **NOISE, seed=SEED, backend="cpu")
    reference = LockstepReference(make_inner, first, NOISE, SEED)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, reference.inner)]
    for step in range(STEPS):
        if step == 3:
            added = {**added, "noise_type": "Laplace", "variability": 0.03}
            opt.add_param_group(dict(added))
            reference.add_param_group(added)
            assert opt.param_groups[-1]["num_iters"] == NOISE["num_iters"]
        set_grads(params, step)
        expected = reference.step()
        opt.step()
        assert_weights_equal(reference.params, expected, what=f"step {step}:")
        for scheduler in schedulers:
            scheduler.step()
    assert opt.param_groups[0]["lr"] == reference.inner.param_groups[0]["lr"] < INNER["Adam"][1]["lr"]


def test_nvrm_refuses_lbfgs_with_a_clear_message_and_leaves_it_untouched():
    """LBFGS re-evaluates its closure at weights its line search moves, over a history of
    directions: the swapped noise would corrupt both, so NVRM refuses to wrap it."""
    params = make_params(SHAPES[:2])
    inner = torch.optim.LBFGS(params, lr=0.5)
    groups_before = [dict(g) for g in inner.param_groups]
    with pytest.raises(TypeError, match="LBFGS"):
        nvrm_ext.NVRM(inner, seed=SEED)
    assert [dict(g) for g in inner.param_groups] == groups_before  # no noise keys filled in


def non_dense():
    return torch.nn.Parameter(torch.randn(10, 5, 2)[..., 0])  # torch's non-contiguous case: gaps


@pytest.mark.parametrize("how", ["NVRM(...)", "NVRM.add_param_group", "inner.add_param_group",
                                 "complex64 via inner.add_param_group"])
def test_a_parameter_the_noise_cannot_follow_is_refused_before_anything_changes(how):
    """A parameter with gaps (or a dtype the backend cannot run) is refused where it enters, or
    at the next step -- but before the inner optimizer has moved any weight."""
    kept = torch.nn.Parameter(torch.randn(4))
    if how == "NVRM(...)":
        inner = torch.optim.SGD([kept, non_dense()], lr=0.1)
        with pytest.raises(ValueError, match="dense"):
            nvrm_ext.NVRM(inner, seed=SEED, backend="cpu")
        assert "variability" not in inner.param_groups[0]
        return
    opt = nvrm_ext.NVRM(torch.optim.SGD([kept], lr=0.1), seed=SEED, backend="cpu")
    kept.grad = torch.ones(4)
    opt.step()
    bad = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)) if how.startswith("complex64") else non_dense()
    try:
        if how == "NVRM.add_param_group":
            opt.add_param_group({"params": [bad]})
        else:
            opt.optimizer.add_param_group({"params": [bad]})
    except (ValueError, RuntimeError):
        assert len(opt.param_groups) == 1  # refused at the door, nothing added
        return
    before = [kept.detach().clone(), bad.detach().clone()]
    kept.grad, bad.grad = torch.ones_like(kept), torch.ones_like(bad)
    with pytest.raises((ValueError, RuntimeError)):
        opt.step()
    assert torch.equal(kept, before[0]) and torch.equal(bad, before[1]), "the inner step ran before the refusal"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_nvrm_noise_api_against_the_reference(backend):
    """remove_noise() leaves the reference's clean weights, a step then is refused before the
    inner optimizer moves anything, restore_noise() gives the noisy weights back bit for bit;
    clean_state_dict() is the clean weights, the live ones untouched; after reset_noise() the
    weights count as clean: the next swap removes nothing, the step counters go on."""
    params = make_params(SHAPES)
    groups = make_groups(params)
    make_inner = inner_factory("Adam")
    opt = nvrm_ext.NVRM(make_inner(groups), **NOISE, seed=SEED, backend=backend)
    reference = LockstepReference(make_inner, groups, NOISE, SEED)
    ordered = reference.params
    module = torch.nn.ParameterList(ordered)  # state_dict keys: the positions '0', '1', ...

    def step(index):
        set_grads(params, index)
        expected = reference.step()
        opt.step()
        assert_weights_equal(ordered, expected, what=f"step {index}:")

    for index in range(4):
        step(index)
    noisy = [p.detach().clone() for p in ordered]
    saved = opt.clean_state_dict(module)
    assert_weights_equal([saved[str(i)] for i in range(len(ordered))], reference.clean(), what="clean_state_dict:")
    assert all(torch.equal(p, q) for p, q in zip(ordered, noisy))

    opt.remove_noise()
    assert opt.noise_removed
    assert_weights_equal(ordered, reference.clean(), what="remove_noise():")
    removed = [p.detach().clone() for p in ordered]
    inner_state = {k: v.clone() for k, v in opt.optimizer.state[ordered[0]].items() if isinstance(v, torch.Tensor)}
    set_grads(params, 4)
    with pytest.raises(RuntimeError, match="restore_noise"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ordered, removed)), "the inner step ran before the refusal"
    assert all(torch.equal(opt.optimizer.state[ordered[0]][k], v) for k, v in inner_state.items())
    opt.restore_noise()
    assert not opt.noise_removed and all(torch.equal(p, q) for p, q in zip(ordered, noisy))

    opt.reset_noise()
    reference.book.on_weights.clear()
    for index in range(4, 7):
        step(index)


def test_nvrm_closure_runs_on_the_perturbed_weights_and_its_loss_is_returned():
    params = make_params(SHAPES)
    groups = make_groups(params)
    make_inner = inner_factory("RMSprop")
    opt = nvrm_ext.NVRM(make_inner(groups), **NOISE, seed=SEED, backend="cpu")
    reference = LockstepReference(make_inner, groups, NOISE, SEED)
    for index in range(4):
        seen = []

        def closure():
            seen.append([p.detach().clone() for p in params])
            set_grads(params, index)
            return torch.tensor(float(index))

        set_grads(params, index)  # what the closure will set, for the reference
        expected = reference.step()
        before = [p.detach().clone() for p in params]
        assert opt.step(closure).item() == index
        assert len(seen) == 1 and all(torch.equal(p, q) for p, q in zip(seen[0], before))  # the perturbed weights
        assert_weights_equal(reference.params, expected, what=f"step {index}:")


def test_nvrm_weights_rewritten_between_steps_are_refused_before_the_inner_step():
    params = make_params(SHAPES)
    opt = nvrm_ext.NVRM(inner_factory("SGD-momentum-nesterov")(make_groups(params)), **NOISE, seed=SEED, backend="cpu")
    set_grads(params, 0)
    opt.step()
    with torch.no_grad():
        params[0].add_(1.0)
    rewritten = [p.detach().clone() for p in params]
    set_grads(params, 1)
    with pytest.raises(nvrm_ext.WeightsChangedError):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, rewritten))


@pytest.mark.parametrize("wrapped", [True, False], ids=["NVRM(SGD)", "FusedVSGD"])
def test_noise_values_edited_between_steps(wrapped):
    """Editing a group's variability, noise_type or num_iters between steps (a schedule of the
    noise): the noise on the weights is removed as it was added, the next follows the edit;
    variability 0 removes the noise and adds none."""
    params = make_params(SHAPES)
    groups = make_groups(params)
    options = dict(lr=0.05, momentum=0.9)
    if wrapped:
        opt = nvrm_ext.NVRM(torch.optim.SGD(groups, **options), **NOISE, seed=SEED, backend="cpu")
    else:
        opt = nvrm_ext.FusedVSGD(groups, **options, **NOISE, seed=SEED, backend="cpu")
    reference = LockstepReference(lambda g: torch.optim.SGD(g, **options), groups, NOISE, SEED)
    edits = {2: (0, dict(variability=0.01)), 3: (1, dict(noise_type="Laplace", num_iters=5)),
             5: (0, dict(variability=0.0)), 6: (0, dict(variability=0.03, noise_type="Uniform"))}
    for step in range(STEPS):
        if step in edits:
            group_index, noise = edits[step]
            opt.param_groups[group_index].update(noise)
            reference.edit_group_noise(group_index, **noise)
        set_grads(params, step)
        expected = reference.step()
        opt.step()
        assert_weights_equal(reference.params, expected, what=f"step {step}:")
