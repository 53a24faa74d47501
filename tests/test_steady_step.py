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
