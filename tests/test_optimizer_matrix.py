"""The properties torch's optimizer test matrix (OptimizerInfo, test/test_optim.py) checks for every
torch optimizer, held for FusedVSGD / FusedVAdam and for NVRM(inner optimizer).

Where torch compares two implementations (foreach or fused against the for-loop), both are
also checked against the independent expectation of tests/nvrm_reference.py (plain torch.optim
on a copy of the perturbed weights, then the noise swap of nvrm_ext/noise.py) at every step.
Where NVRM's noise makes torch's property false by design (a step with zero gradients still
swaps the noise), the property is left out. Round trips (state_dict, deepcopy) are compared
with the uninterrupted run bit for bit.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import nvrm_ext
from nvrm_reference import LockstepReference, assert_weights_equal

SEED = 2024
NOISE = dict(variability=0.02, num_iters=3, noise_type="Gaussian")
SECOND_GROUP_NOISE = dict(variability=0.05, num_iters=2, noise_type="Laplace")
STEPS = 9
FUSED_BACKENDS = ["torch", "cpu"]


# ---------------------------------------------------------------------- the optimizers under test
class Case:
    """An optimizer under test (`make(groups)`) and its plain torch counterpart (`make_inner(groups)`,
    the reference's base optimizer), with the noise defaults both use."""

    def __init__(self, name, make, make_inner, noise=NOISE, denoise=True):
        self.name, self.make, self.make_inner, self.noise, self.denoise = name, make, make_inner, noise, denoise

    def __repr__(self):
        return self.name


SGD_OPTIONS = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
ADAM_OPTIONS = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)


def fused_vsgd(backend="cpu", capturable=False, lr=SGD_OPTIONS["lr"], denoise=True):
    options = {**SGD_OPTIONS, "lr": lr}
    return Case(f"FusedVSGD[{backend}{',capturable' if capturable else ''}]",
                lambda groups: nvrm_ext.FusedVSGD(groups, **options, **NOISE, seed=SEED, backend=backend,
                                                  capturable=capturable, denoise=denoise),
                lambda groups: torch.optim.SGD(groups, **SGD_OPTIONS), denoise=denoise)


def fused_vadam(backend="cpu", capturable=False, lr=ADAM_OPTIONS["lr"]):
    options = {**ADAM_OPTIONS, "lr": lr}
    return Case(f"FusedVAdam[{backend}{',capturable' if capturable else ''}]",
                lambda groups: nvrm_ext.FusedVAdam(groups, **options, decoupled=True, **NOISE, seed=SEED,
                                                   backend=backend, capturable=capturable),
                lambda groups: torch.optim.AdamW(groups, **ADAM_OPTIONS))


FUSED_CASES = [fused_vsgd(b) for b in FUSED_BACKENDS] + [fused_vadam(b) for b in FUSED_BACKENDS] \
    + [fused_vsgd("cpu", capturable=True), fused_vadam("cpu", capturable=True)]

# inner optimizers of NVRM and the implementations torch offers for them on the CPU
INNER = {
    "SGD": (torch.optim.SGD, SGD_OPTIONS, ("forloop", "foreach", "fused")),
    "Adam": (torch.optim.Adam, ADAM_OPTIONS, ("forloop", "foreach", "fused")),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), ("forloop", "foreach", "fused")),
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.1, weight_decay=1e-2), ("forloop", "foreach", "fused")),
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5), ("forloop", "foreach")),
    "RAdam": (torch.optim.RAdam, dict(lr=1e-2), ("forloop", "foreach")),
}
IMPLEMENTATION = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def nvrm(inner="SGD", implementation="forloop", backend="cpu", lr=None, denoise=True):
    cls, options, _ = INNER[inner]
    options = {**options, **IMPLEMENTATION[implementation], **({} if lr is None else {"lr": lr})}
    return Case(f"NVRM({inner}[{implementation}])[{backend}]",
                lambda groups: nvrm_ext.NVRM(cls(groups, **options), **NOISE, seed=SEED, backend=backend,
                                             denoise=denoise),
                lambda groups: cls(groups, **options), denoise=denoise)


NVRM_CASES = [nvrm(name, implementation) for name, (_, _, implementations) in INNER.items()
              for implementation in implementations] + [nvrm("Adam", "fused", "torch"), nvrm("SGD", "foreach", "torch")]


# ---------------------------------------------------------------------- torch's parity protocol
def protocol_model():
    """torch's parity model (Linear(2, 3), Sigmoid, Linear(3, 1), Sigmoid) with its first weight
    transposed in memory, plus a 0-dim and a zero-size parameter; two groups (the second with
    its own noise) so that keys cross group boundaries."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    model[0].weight = torch.nn.Parameter(model[0].weight.detach().t().contiguous().t())
    scalar = torch.nn.Parameter(torch.tensor(0.5))
    empty = torch.nn.Parameter(torch.empty(0))
    groups = [{"params": [model[0].weight, model[0].bias, scalar]},
              {"params": [model[2].weight, model[2].bias, empty], **SECOND_GROUP_NOISE}]
    return model, groups


def protocol_loss(model, groups):
    scalar, empty = groups[0]["params"][2], groups[1]["params"][2]
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
    return model(x).sum() + (scalar - 0.25) ** 2 + empty.sum()


def params_of(groups):
    return [p for g in groups for p in g["params"]]


def run_protocol(case, steps=STEPS, check=True):
    """torch's _compare_between schedule: no gradients at all at step 2, the second layer frozen
    at steps 3 and 4; every step checked against the reference. Returns (params, optimizer)."""
    model, groups = protocol_model()
    opt = case.make([dict(g) for g in groups])
    reference = LockstepReference(case.make_inner, groups, case.noise, SEED, case.denoise)
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        if i == 3:
            model[2].requires_grad_(False)
        if i == 5:
            model[2].requires_grad_(True)
        if i != 2:
            protocol_loss(model, groups).backward()
        expected = reference.step()
        before = [p.detach().clone() for p in params_of(groups)]
        opt.step()
        if check:
            assert_weights_equal(params_of(groups), expected, what=f"{case} step {i}:")
        if i in (3, 4):  # frozen: no gradient, so neither an update nor a swap
            assert all(torch.equal(p, b) for p, b in zip(model[2].parameters(), before[3:5]))
    return params_of(groups), opt, reference


@pytest.mark.parametrize("case", FUSED_CASES, ids=repr)
def test_fused_matches_reference_with_frozen_layers_none_grads_zero_size_and_transposed_params(case):
    params, opt, reference = run_protocol(case)
    # the base optimizer's state too: momentum buffer / moments equal the plain torch optimizer's
    for index, p in enumerate(params):
        expected_state = reference.inner_state(index)
        for name in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if name in expected_state:
                torch.testing.assert_close(opt.state[p][name], expected_state[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", NVRM_CASES, ids=repr)
def test_nvrm_matches_reference_with_frozen_layers_none_grads_zero_size_and_transposed_params(case):
    params, opt, reference = run_protocol(case)
    for index, p in enumerate(params):  # the inner optimizer's state is the plain optimizer's
        expected_state = reference.inner_state(index)
        assert set(opt.optimizer.state.get(p, {})) == set(expected_state), index
        for name, value in expected_state.items():
            torch.testing.assert_close(torch.as_tensor(opt.optimizer.state[p][name]), torch.as_tensor(value),
                                       rtol=0, atol=0)


@pytest.mark.parametrize("inner", [name for name, (_, _, implementations) in INNER.items() if len(implementations) > 1])
def test_nvrm_over_foreach_and_fused_inner_matches_forloop_inner(inner):
    """torch's test_foreach_matches_forloop / test_fused_matches_forloop, through NVRM: the same
    parameters and inner state (torch's tolerance for float32: its implementations round
    differently), the noise counters identical."""
    implementations = INNER[inner][2]
    runs = {impl: run_protocol(nvrm(inner, impl), check=False)[:2] for impl in implementations}
    forloop_params, forloop = runs["forloop"]
    for impl in implementations[1:]:
        params, opt = runs[impl]
        for p, q in zip(forloop_params, params):
            torch.testing.assert_close(q, p, rtol=1.3e-6, atol=1e-5)
            mine, theirs = forloop.optimizer.state.get(p, {}), opt.optimizer.state.get(q, {})
            assert set(mine) == set(theirs)
            for key in mine:
                torch.testing.assert_close(torch.as_tensor(theirs[key]).to(torch.float32),
                                           torch.as_tensor(mine[key]).to(torch.float32), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("make", [fused_vsgd, fused_vadam], ids=["FusedVSGD", "FusedVAdam"])
def test_fused_backends_and_capturable_give_the_same_parameters_and_state(make):
    """torch's foreach/fused-vs-forloop parity, for our implementations: the torch reference
    backend, the compiled CPU backend and capturable counters (the latter bit for bit)."""
    runs = {name: run_protocol(case, check=False)[:2] for name, case in
            (("torch", make("torch")), ("cpu", make("cpu")), ("capturable", make("cpu", capturable=True)))}
    for name in ("torch", "capturable"):
        exact = name == "capturable"
        for p, q in zip(runs["cpu"][0], runs[name][0]):
            torch.testing.assert_close(q, p, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
        # the state as saved (capturable counters live on the device, saved as plain numbers)
        states, others = runs["cpu"][1].state_dict()["state"], runs[name][1].state_dict()["state"]
        assert set(states) == set(others)
        for index, state in states.items():
            assert set(state) == set(others[index])
            for key, value in state.items():
                torch.testing.assert_close(torch.as_tensor(others[index][key]), torch.as_tensor(value),
                                           rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6,
                                           msg=lambda m, key=key, index=index: f"{name}: state {index} {key}: {m}")


@pytest.mark.parametrize("make", [fused_vsgd, fused_vadam], ids=["FusedVSGD", "FusedVAdam"])
@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
def test_fused_tensor_lr_equals_float_lr(make, capturable):
    """torch's test_tensor_lr: a one-element tensor lr gives the float lr's weights (and both the
    reference's, checked in run_protocol)."""
    lr = (SGD_OPTIONS if make is fused_vsgd else ADAM_OPTIONS)["lr"]
    float_lr = run_protocol(make("cpu", capturable=capturable))[0]
    tensor_lr = run_protocol(make("cpu", capturable=capturable, lr=torch.tensor(lr)))[0]
    for p, q in zip(float_lr, tensor_lr):
        assert torch.equal(p, q)


@pytest.mark.parametrize("inner", ["SGD", "Adam"])
@pytest.mark.parametrize("implementation", ["forloop", "fused"])
def test_nvrm_tensor_lr_equals_float_lr(inner, implementation):
    """torch's test_tensor_lr through NVRM: each run equals its reference at every step
    (run_protocol); the two agree to torch's float32 tolerance (torch's own tensor-lr
    arithmetic rounds differently from its float-lr arithmetic)."""
    lr = INNER[inner][1]["lr"]
    float_lr = run_protocol(nvrm(inner, implementation))[0]
    tensor_lr = run_protocol(nvrm(inner, implementation, lr=torch.tensor(lr)))[0]
    for p, q in zip(float_lr, tensor_lr):
        torch.testing.assert_close(q, p)


# ---------------------------------------------------------------------- GradScaler's found_inf
def simple_groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    b = torch.nn.Parameter(torch.randn(7, generator=g))
    c = torch.nn.Parameter(torch.randn(4, 6, generator=g).t())  # transposed in memory
    return [{"params": [a, b]}, {"params": [c], **SECOND_GROUP_NOISE}]


def set_grads(groups, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params_of(groups):
        p.grad = torch.randn(p.shape, generator=g)


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy({id(p): opt.state.get(p, {}) for p in params})


def assert_unchanged(opt, params, before):
    weights, states = before
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    for p in params:
        now, then = opt.state.get(p, {}), states[id(p)]
        if not then:  # created by the skipped step, as torch's fused optimizers do: nothing counted
            assert all(float(now[key]) == 0 for key in ("step", "noise_step") if key in now), now
            continue
        assert set(now) == set(then)
        for key in now:
            assert torch.equal(torch.as_tensor(now[key]), torch.as_tensor(then[key])), key


def step_with_inf_through_grad_scaler(opt, groups):
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))  # what scaling the loss does to the scaler
    set_grads(groups, 99)
    for p in params_of(groups):
        p.grad.mul_(8.0)
    params_of(groups)[1].grad[2] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 4.0  # the scaler saw the inf


@pytest.mark.parametrize("case", FUSED_CASES + [nvrm("SGD"), nvrm("Adam", "foreach"), nvrm("AdamW", "fused"),
                                                nvrm("Adam", "fused", "torch")], ids=repr)
def test_found_inf_skips_the_step_and_the_swap(case):
    """torch.amp.GradScaler with an inf gradient: no update, no swap, no counter moves; the
    following steps equal the reference that never saw the skipped one."""
    groups = simple_groups()
    params = params_of(groups)
    opt = case.make(groups)
    reference = LockstepReference(case.make_inner, groups, case.noise, SEED, case.denoise)
    for step in range(5):
        if step in (0, 2):
            before = snapshot(opt, params)
            step_with_inf_through_grad_scaler(opt, groups)
            assert_unchanged(opt, params, before)
        set_grads(groups, step)
        expected = reference.step()
        opt.step()
        assert_weights_equal(params, expected, what=f"{case} step {step}:")


@pytest.mark.parametrize("make", [fused_vsgd, fused_vadam], ids=["FusedVSGD", "FusedVAdam"])
def test_fused_protocol_found_inf_attribute_skips_the_step(make):
    """torch's test_fused_does_not_step_if_foundinf: found_inf set on the optimizer (capturable
    mode takes GradScaler's fused protocol), with and without grad_scale."""
    check_found_inf_attribute(make("cpu", capturable=True))


@pytest.mark.parametrize("inner", ["Adam", "AdamW", "SGD"])
def test_nvrm_over_a_fused_inner_found_inf_attribute_skips_the_step_or_is_refused(inner):
    """The same through NVRM over a fused inner optimizer, the attributes set on the wrapper
    (what GradScaler.step is handed): the step is skipped, or refused with nothing changed (as
    FusedVSGD without capturable does) -- never taken with the inf gradients."""
    check_found_inf_attribute(nvrm(inner, "fused"), may_refuse=True)


def check_found_inf_attribute(case, may_refuse=False):
    for grad_scale in (None, torch.ones(())):
        groups = simple_groups()
        params = params_of(groups)
        opt = case.make(groups)
        set_grads(groups, 0)
        opt.step()
        before = snapshot(opt, params)
        set_grads(groups, 1)
        params[1].grad[0] = float("inf")
        opt.grad_scale, opt.found_inf = grad_scale, torch.ones(())
        try:
            opt.step()
        except RuntimeError as error:
            if not may_refuse:
                raise
            assert "found_inf" in str(error), error
        finally:
            del opt.grad_scale, opt.found_inf
        assert_unchanged(opt, params, before)


# ---------------------------------------------------------------------- state_dict, deepcopy, hooks
def train(opt, groups, steps, first=0):
    for step in range(first, first + steps):
        set_grads(groups, step)
        opt.step()


def assert_same_structure(a, b):
    """Equal nested state dicts, tensors bit for bit."""
    assert type(a) is type(b) or (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)))
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same_structure(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_structure(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


def weights_only_round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resume(case, edit=lambda state_dict: state_dict):
    """Saved after 4 steps, through torch.save / torch.load(weights_only=True) (equal to what was
    saved) and `edit`, loaded into a fresh optimizer over copies of the weights; both then run 4
    more steps. Returns the two runs' parameters and optimizers."""
    groups = simple_groups()
    opt = case.make(groups)
    train(opt, groups, 4)
    saved = opt.state_dict()  # holds the live state tensors: compared before training goes on
    loaded = weights_only_round_trip(saved)
    assert_same_structure(loaded, saved)
    resumed_groups = simple_groups()
    with torch.no_grad():
        for p, q in zip(params_of(resumed_groups), params_of(groups)):
            p.copy_(q)
    resumed = case.make(resumed_groups)
    resumed.load_state_dict(edit(copy.deepcopy(loaded)))
    train(opt, groups, 4, first=4)
    train(resumed, resumed_groups, 4, first=4)
    return (params_of(groups), opt), (params_of(resumed_groups), resumed)


def check_state_dict_resume(case):
    """torch's test_save_load_equality_with_weights_only and test_state_dict_deterministic: what
    torch.load(weights_only=True) gives back equals what was saved; the resumed run is the
    uninterrupted one, bit for bit, and so are the two optimizers' state dicts then."""
    (params, opt), (resumed_params, resumed) = resume(case)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
    assert_same_structure(resumed.state_dict(), opt.state_dict())


def check_older_state_dict(case):
    """torch's test_can_load_older_state_dict: a state dict without the flags later torch
    versions added to the groups loads, and the resumed optimizer steps (torch's own optimizers
    then take their defaults, so the trajectory may change: fused=True is dropped, for one)."""
    def drop_flags(state_dict):
        for group in state_dict["param_groups"]:
            for flag in ("foreach", "fused", "maximize", "capturable", "differentiable", "decoupled_weight_decay"):
                group.pop(flag, None)
        return state_dict

    (_, _), (resumed_params, _) = resume(case, drop_flags)
    assert all(torch.isfinite(p).all() for p in resumed_params)


def check_nontensor_step(case):
    """torch's test_load_nontensor_step: the steps saved as plain numbers instead of tensors
    load, and the resumed run is the uninterrupted one, bit for bit."""
    def plain_steps(state_dict):
        for state in state_dict["state"].values():
            for key, value in state.items():
                if key.endswith("step") and isinstance(value, torch.Tensor) and value.dim() == 0:
                    state[key] = value.item()
        return state_dict

    (params, _), (resumed_params, _) = resume(case, plain_steps)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def check_deepcopy(case):
    """A deep copy has the same public attributes and continues the same trajectory, bit for bit."""
    groups = simple_groups()
    opt = case.make(groups)
    train(opt, groups, 3)
    twin = copy.deepcopy(opt)
    assert {k for k in vars(opt) if not k.startswith("_")} == {k for k in vars(twin) if not k.startswith("_")}
    twin_groups = twin.param_groups
    train(opt, groups, 3, first=3)
    train(twin, twin_groups, 3, first=3)
    for p, q in zip(params_of(groups), params_of(twin_groups)):
        assert p is not q and torch.equal(p, q)


def check_step_hooks(case):
    """Pre and post hooks, local and global, run once per step in torch's order; removed, they stop."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    groups = simple_groups()
    opt = case.make(groups)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", o))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", o))),
               opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o))),
               opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))]
    try:
        train(opt, groups, 2)
    finally:
        for handle in handles:
            handle.remove()
    # a wrapper's inner optimizer steps too, and global hooks may see it: only the wrapper's own
    # calls must follow torch's order
    assert [name for name, o in calls if o is opt] == ["global pre", "pre", "post", "global post"] * 2
    assert all(o is getattr(opt, "optimizer", None) and name.startswith("global") for name, o in calls if o is not opt)
    count = len(calls)
    train(opt, groups, 1, first=2)
    assert len(calls) == count


def check_load_state_dict_hooks(case):
    """A load_state_dict pre-hook's edit (in place, or a returned dict) is what gets loaded, a
    prepended one runs first; the post-hook runs after the load."""
    groups = simple_groups()
    opt = case.make(groups)
    train(opt, groups, 2)
    saved = opt.state_dict()
    ran = []

    def set_lr(value, returns):
        def hook(optimizer, state_dict):
            if returns:
                state_dict = copy.deepcopy(state_dict)
            state_dict["param_groups"][0]["lr"] = value
            ran.append(value)
            return state_dict if returns else None
        return hook

    opt.register_load_state_dict_pre_hook(set_lr(0.002, returns=False))
    opt.register_load_state_dict_post_hook(lambda optimizer: ran.append(optimizer.param_groups[0]["lr"]))
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.002 and ran == [0.002, 0.002]
    opt.register_load_state_dict_pre_hook(set_lr(0.003, returns=True), prepend=True)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.002  # the prepended hook ran first, the other overrode it
    train(opt, groups, 1, first=2)


CHECKS = [check_state_dict_resume, check_older_state_dict, check_nontensor_step, check_deepcopy, check_step_hooks,
          check_load_state_dict_hooks]


@pytest.mark.parametrize("case", [fused_vsgd(), fused_vadam(), fused_vadam(capturable=True)], ids=repr)
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[6:])
def test_fused_round_trips_and_hooks(case, check):
    check(case)


@pytest.mark.parametrize("case", [nvrm("SGD"), nvrm("Adam", "foreach"), nvrm("AdamW", "fused"), nvrm("RMSprop", "foreach"),
                                  nvrm("Adam", "fused", "torch")], ids=repr)
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[6:])
def test_nvrm_round_trips_and_hooks(case, check):
    check(case)


@pytest.mark.parametrize("case", [fused_vsgd(), nvrm("Adam"), nvrm("SGD", "fused")], ids=repr)
@pytest.mark.parametrize("named", [(True, True), (True, False), (False, True)], ids=["named", "named-to-plain",
                                                                                    "plain-to-named"])
def test_named_parameters_state_dict_round_trip(case, named):
    """torch's test_can_load_from_to_named_state_dict: optimizers over named_parameters() save
    the names; either way round, the load resumes the uninterrupted run bit for bit."""
    def build(use_names):
        params = params_of(simple_groups())
        model = torch.nn.ParameterDict({name: p for name, p in zip("abc", params)})
        source = list(model.named_parameters()) if use_names else list(model.parameters())
        return params, case.make([{"params": source}])

    params, opt = build(named[0])
    train(opt, [{"params": params}], 3)
    saved = weights_only_round_trip(opt.state_dict())
    if named[0]:
        assert saved["param_groups"][0]["param_names"] == ["a", "b", "c"]
    resumed_params, resumed = build(named[1])
    with torch.no_grad():
        for p, q in zip(resumed_params, params):
            p.copy_(q)
    resumed.load_state_dict(saved)
    train(opt, [{"params": params}], 3, first=3)
    train(resumed, [{"params": resumed_params}], 3, first=3)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
