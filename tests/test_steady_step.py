"""The steady step (issue 11 §2): a step laid out like the last one reuses the launch data and
skips the per-tensor validation of the full path. Whatever the full path notices between two
steps must still be noticed. Each test runs one schedule of changes twice -- on one optimizer,
and on one reloaded from its own state_dict before every step (which drops every cache, so
each of its steps takes the full path) -- and wants the same bits."""
import pytest
import torch

import nvrm_ext

OPTIMIZERS = [
    (nvrm_ext.FusedVSGD, dict(lr=0.1, momentum=0.9, variability=0.05, num_iters=50)),
    (nvrm_ext.FusedVAdam, dict(lr=1e-2, variability=0.05, num_iters=50)),
]
SHAPES = ((5, 3), (7,), (2, 2, 2), (4, 4))


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(cls, kwargs, schedule, *, reload, steps=7, capturable=False):
    """Parameters and state_dict after `steps` steps; `schedule(step, opt, params)` changes
    things before a step (after the gradients are set)."""
    params = _params()
    opt = cls(params, seed=3, backend="cpu", capturable=capturable, **kwargs)
    for step in range(steps):
        if reload:
            opt.load_state_dict(opt.state_dict())
        for p, grad in zip(params, _grads(params, step)):
            p.grad = grad
        schedule(step, opt, params)
        opt.step()
    return [p.detach().clone() for p in params], opt.state_dict()


def _assert_same(a, b):
    params_a, state_a = a
    params_b, state_b = b
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
    for group_a, group_b in zip(state_a["param_groups"], state_b["param_groups"], strict=True):
        assert all(group_b[name] == value for name, value in group_a.items())  # a reload may add defaults
    assert state_a["state"].keys() == state_b["state"].keys()
    for index, entries in state_a["state"].items():
        other = state_b["state"][index]
        assert entries.keys() == other.keys()
        for name, value in entries.items():
            if torch.is_tensor(value):
                assert torch.equal(value, other[name]), (index, name)
            else:
                assert value == other[name] and type(value) is type(other[name]), (index, name)


def _hyperparameters(step, opt, params):
    group = opt.param_groups[0]
    if step == 2:
        group["lr"] *= 0.5
    if step == 3:
        group["variability"], group["noise_type"] = 0.02, "Laplace"
    if step == 4:
        group["num_iters"] = 5  # step 5 is a num_iters-th step: no new noise
    if step == 6:
        group["variability"] = 0.0


def _state_written(step, opt, params):
    if step == 2:
        opt.state[params[1]]["step"] = 0
    if step == 4:
        opt.reset_noise()
    if step == 5:
        opt.state[params[2]]["noise_scale"] = 0.5 * opt.state[params[2]]["noise_scale"]


def _gradients_changed(step, opt, params):
    if step == 2:
        params[1].grad = None  # a parameter left out of a step
    if step == 4:
        params[0].grad = params[0].grad.t().contiguous().t()  # another layout: converted
    if step == 5:
        for p in params:
            p.grad.mul_(0.5)  # the same gradient objects, written in place
    if step == 6:
        params[3].grad = params[3].grad.t()  # same shape, transposed strides


def _storage_and_groups(step, opt, params):
    if step == 2:
        params[2].data = params[2].data.clone()
    if step == 1:
        del opt.param_groups[0]["params"][3]  # params[3] moves to a group of its own
        opt.add_param_group({"params": [params[3]], "lr": 0.05})
    if step == 3:  # params[2] joins it: the same parameters in the same order, other groups
        opt.param_groups[1]["params"].insert(0, opt.param_groups[0]["params"].pop())
    if step == 5:  # cleared state: the plans must be rebuilt (the noise declared gone first: a plan
        opt.reset_noise()  # would keep what its last step left, which a reload before each step forgets)
        opt.state.clear()


SCHEDULES = [_hyperparameters, _state_written, _gradients_changed, _storage_and_groups]


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.__name__.strip("_"))
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=["vsgd", "vadam"])
def test_steady_steps_notice_what_the_full_path_notices(cls, kwargs, schedule, capturable):
    if capturable and schedule is _state_written:
        pytest.skip("capturable counters are views of a device table: numbers written into the "
                    "state do not reach it (nor did they before the steady step)")
    _assert_same(_run(cls, kwargs, schedule, reload=False, capturable=capturable),
                 _run(cls, kwargs, schedule, reload=True, capturable=capturable))


def test_momentum_switched_on_mid_run_creates_its_buffer():
    def schedule(step, opt, params):
        if step == 3:
            opt.param_groups[0]["momentum"] = 0.9

    kwargs = dict(lr=0.1, momentum=0.0, variability=0.05)
    _assert_same(_run(nvrm_ext.FusedVSGD, kwargs, schedule, reload=False),
                 _run(nvrm_ext.FusedVSGD, kwargs, schedule, reload=True))


def test_sparse_gradient_after_steady_steps_is_refused():
    params = _params()
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, seed=1, backend="cpu")
    for step in range(3):
        for p, grad in zip(params, _grads(params, step)):
            p.grad = grad
        opt.step()
    before = [p.detach().clone() for p in params]
    params[2].grad = params[2].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_steady_steps_skip_the_full_validation(monkeypatch):
    """The point of the steady step: after the first steps nothing is validated per tensor in
    Python; a changed layout takes the full path again."""
    params = _params()
    opt = nvrm_ext.FusedVAdam(params, lr=1e-2, seed=1, backend="cpu")
    calls = []
    original = type(opt)._participants
    monkeypatch.setattr(type(opt), "_participants", lambda self: calls.append(1) or original(self))
    for step in range(4):
        for p, grad in zip(params, _grads(params, step)):
            p.grad = grad
        opt.step()
    assert len(calls) == 1
    params[0].grad = None
    opt.step()
    assert len(calls) == 2


def _gradient_metadata_changed_in_place(step, opt, params):
    """The same gradient objects, their metadata changed in place: what a cache keyed on the
    gradients' identity would miss (the steady step checks their layout at every step)."""
    if step == 2:
        params[0].grad.t_()  # (5, 3) -> (3, 5) transposed: the same elements, refused below
        params[0].grad.t_()  # and back: nothing changed
        params[3].grad.as_strided_((4, 4), (1, 4))  # the same shape, transposed strides: converted
    if step == 3:
        params[1].grad.data = params[1].grad.data.double()  # another dtype: converted
    if step == 4:
        params[2].grad.data = params[2].grad.data.transpose(0, 2)  # same shape, other strides


@pytest.fixture(params=["guard", "scans"])
def grad_check(request, monkeypatch):
    """Both ways the steady step checks the gradients' layout: one C++ call
    (scan.layout_guard, where this torch has it) and the map() scans it stands in for."""
    from nvrm_ext.optim.launch import scan
    if request.param == "scans":
        monkeypatch.setattr(scan, "layout_guard", lambda *args: None)
    elif not scan._check_tensor_guards():
        pytest.skip("this torch has no usable TensorGuards: the scans alone run")
    return request.param


def _guarded(plan) -> bool:
    """Whether the plan checks the gradients' layout with scan.layout_guard's one call."""
    return plan._grad_guard is not None and plan._grad_guard is not False


@pytest.mark.parametrize("schedule", [_gradients_changed, _gradient_metadata_changed_in_place],
                         ids=lambda s: s.__name__.strip("_"))
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=["vsgd", "vadam"])
def test_gradient_layout_changes_are_noticed_either_way(cls, kwargs, schedule, grad_check):
    _assert_same(_run(cls, kwargs, schedule, reload=False), _run(cls, kwargs, schedule, reload=True))


@pytest.mark.parametrize("change", [
    lambda g: setattr(g, "data", g.data.view(3, 5)),  # same numel, other shape
    lambda g: g.t_(),
    lambda g: g.resize_(3, 5),
], ids=["data", "t_", "resize_"])
def test_gradient_reshaped_in_place_after_steady_steps_is_refused(change, grad_check):
    """A gradient object whose shape changed in place (same identity, same address) must not be
    taken for the one the plan checked: the full path refuses it, nothing stepped."""
    params = _params()
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, seed=1, backend="cpu")
    grads = _grads(params, 0)
    for p, grad in zip(params, grads):
        p.grad = grad
    for _ in range(3):  # the same gradient objects at every step: a steady step
        opt.step()
    assert all(_guarded(plan) for plan in opt._plans.values()) == (grad_check == "guard")
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[1]].items() if torch.is_tensor(v)}
    change(params[0].grad)
    with pytest.raises(RuntimeError, match="gradient of parameter 0 has shape"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[1]][k], v) for k, v in state_before.items())


def test_layout_guard_refuses_every_change_it_stands_in_for():
    """scan.layout_guard's check is True only for plain tensors of the shapes, strides and
    dtype it was made for (where this torch has TensorGuards)."""
    from nvrm_ext.optim.launch import scan
    tensors = [torch.zeros(2, 3), torch.zeros(4)]
    guard = scan.layout_guard(tensors, [t.shape for t in tensors], [t.stride() for t in tensors])
    if guard is None:
        pytest.skip("this torch has no usable TensorGuards")
    assert scan.guard_passes(guard, [torch.ones(2, 3), torch.ones(4)])
    other = torch.zeros(4)
    for changed in [torch.zeros(3, 2), torch.zeros(3, 2).t(), torch.zeros(2, 3, dtype=torch.float64),
                    torch.zeros(2, 3, dtype=torch.bfloat16), torch.nn.Parameter(torch.zeros(2, 3)),
                    torch.zeros(2, 3).to_sparse(), torch.zeros(3)[None].expand(2, 3), None]:
        assert not scan.guard_passes(guard, [changed, other]), changed
    assert not scan.guard_passes(guard, [torch.ones(2, 3)])  # another count: refused, not an error
    # made from strides other than the tensors' own: those strides are what it checks
    guard = scan.layout_guard([torch.zeros(3, 2).t()], [(2, 3)], [(1, 2)])
    assert scan.guard_passes(guard, [torch.zeros(3, 2).t()]) and not scan.guard_passes(guard, [torch.zeros(2, 3)])


def test_guard_refusing_what_the_scans_pass_gives_way_to_the_scans():
    """Gradients that require grad (a backward with create_graph=True) or a step under
    inference_mode differ from the guard's gradients in what only the guard compares: the
    scans take over (the guard is not remade at every step) and the steps stay right."""
    def schedule(step, opt, params):
        if step >= 3:
            for p in params:
                p.grad = p.grad.detach().requires_grad_(True)
        if step == 2:
            assert all(map(_guarded, opt._plans.values()))
        if step == 5:
            assert not any(map(_guarded, opt._plans.values()))

    kwargs = dict(lr=0.1, momentum=0.9, variability=0.05)
    _assert_same(_run(nvrm_ext.FusedVSGD, kwargs, schedule, reload=False),
                 _run(nvrm_ext.FusedVSGD, kwargs, lambda *args: None, reload=True))
