"""One step off the tested path: malformed hyperparameters, state and parameters give a clear
error with nothing changed, or the reference result; never a signal, heap corruption or
silently wrong weights. The cases that killed the process run as fresh scripts too."""
import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec
from nvrm_ext.optim.amp import FusedAMP

from edge_cases import ReferenceSGD, assert_unchanged, make_params, set_grads, snapshot

BACKENDS = ["cpu", "torch"]
SGD = dict(lr=0.1, momentum=0.9, variability=0.05, num_iters=10, seed=7)
ADAM = dict(lr=1e-2, amsgrad=True, variability=0.05, num_iters=10, seed=7)


def _stepped(cls=nvrm_ext.FusedVSGD, backend="cpu", shapes=((5, 3), (7,), (2, 2, 2)), steps=2, **kwargs):
    params = make_params(shapes)
    opt = cls(params, backend=backend, **{**(SGD if cls is nvrm_ext.FusedVSGD else ADAM), **kwargs})
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return params, opt


def _refused(opt, params, action, error=(ValueError, TypeError, RuntimeError), match=None):
    """`action` raises a clear error (a subclass of `error`, with a message) and changes nothing."""
    before = snapshot(opt, params)
    with pytest.raises(error, match=match) as info:
        action()
    assert str(info.value)
    assert_unchanged(opt, params, before)
    return info.value


# ---------------------------------------------------------------------- hyperparameters
BAD_AT_CONSTRUCTION = [
    (dict(lr=torch.tensor(-1.0)), "Invalid learning rate"),
    (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    (dict(lr="0.1"), "Invalid learning rate"),
    (dict(num_iters=float("inf")), "Invalid num_iters"),
    (dict(num_iters=float("nan")), "Invalid num_iters"),
    (dict(num_iters=2**70), "Invalid num_iters"),
    (dict(num_iters=True), "Invalid num_iters"),
    (dict(variability=1e39), "Invalid variability"),
    (dict(variability="0.1"), "Invalid variability"),
    (dict(variability=True), "Invalid variability"),
    (dict(momentum=float("nan")), "Invalid momentum value"),
    (dict(momentum=1e39), "Invalid momentum value"),
    (dict(weight_decay=float("inf")), "Invalid weight_decay value"),
    (dict(noise_type=0), "Invalid noise_type"),
    (dict(nesterov="yes"), "Invalid nesterov"),
]


@pytest.mark.parametrize("kwargs,message", BAD_AT_CONSTRUCTION)
def test_bad_hyperparameter_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nvrm_ext.FusedVSGD(make_params(), **{**SGD, **kwargs})


@pytest.mark.parametrize("kwargs,message", [
    (dict(betas=(0.9, float("nan"))), "Invalid beta parameter at index 1"),
    (dict(betas=(0.9,)), "Invalid betas"),
    (dict(betas="ab"), "Invalid betas"),
    (dict(eps=float("inf")), "Invalid epsilon value"),
    (dict(amsgrad=None), "Invalid amsgrad"),
])
def test_bad_adam_hyperparameter_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nvrm_ext.FusedVAdam(make_params(), **{**ADAM, **kwargs})


MID_RUN_EDITS = [
    ("num_iters", 0, "Invalid num_iters"),
    ("num_iters", float("inf"), "Invalid num_iters"),
    ("num_iters", float("nan"), "Invalid num_iters"),
    ("num_iters", 2**70, "Invalid num_iters"),
    ("variability", 1e39, "Invalid variability"),
    ("variability", "0.1", "Invalid variability"),
    ("variability", float("nan"), "Invalid variability"),
    ("lr", torch.tensor([0.1, 0.2]), "Tensor lr must be 1-element"),
    ("lr", torch.tensor(-1.0), "Invalid learning rate"),
    ("lr", None, "Invalid learning rate"),
    ("momentum", "0.9", "Invalid momentum value"),
    ("noise_type", "gaussian", "Invalid noise_type"),
    ("weight_decay", -1.0, "Invalid weight_decay value"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key,value,message", MID_RUN_EDITS, ids=lambda v: repr(v)[:20])
def test_bad_value_edited_into_a_group_between_steps_is_refused_at_step(backend, key, value, message):
    params, opt = _stepped(backend=backend)
    opt.param_groups[0][key] = value
    set_grads(params, 5)
    _refused(opt, params, opt.step, ValueError, message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deleted_hyperparameter_is_a_clear_error(backend):
    params, opt = _stepped(backend=backend)
    del opt.param_groups[0]["momentum"]
    set_grads(params, 5)
    _refused(opt, params, opt.step, ValueError, "lacks 'momentum'")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_edit_corrected_resumes_the_reference_trajectory(backend):
    """A refused value is refused at every step until corrected; then the run is the one that
    never saw it (torch.optim.SGD plus the specified noise)."""
    params = make_params()
    opt = nvrm_ext.FusedVSGD(params, backend=backend, **SGD)
    reference = ReferenceSGD(params, lr=0.1, momentum=0.9, seed=7, variability=0.05, num_iters=10)
    for step in range(4):
        if step == 2:
            opt.param_groups[0]["num_iters"] = 0
            set_grads(params, step)
            for _ in range(2):
                _refused(opt, params, opt.step, ValueError, "Invalid num_iters")
            opt.param_groups[0]["num_iters"] = 10.0  # normalized, as at construction
        set_grads(params, step)
        opt.step()
        reference.step([p.grad for p in params])
    assert opt.param_groups[0]["num_iters"] == 10
    for key, p in enumerate(params):
        torch.testing.assert_close(p.detach(), reference.noisy(key), rtol=0, atol=1e-6)


def test_add_param_group_refuses_bad_values_and_meta_parameters():
    params = make_params()
    opt = nvrm_ext.FusedVSGD(params[:1], **SGD)
    with pytest.raises(ValueError, match="Invalid variability"):
        opt.add_param_group({"params": params[1:], "variability": 1e39})
    with pytest.raises(ValueError, match="meta device"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.empty(3, device="meta"))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
def test_meta_parameters_are_refused_at_construction(backend):
    with pytest.raises(ValueError, match="meta device.*materialize"):
        nvrm_ext.FusedVSGD([torch.nn.Parameter(torch.empty(3, device="meta"))], lr=0.1, backend=backend)


def test_fused_amp_says_where_the_base_optimizers_backend_goes():
    params = make_params()
    with pytest.raises(ValueError, match=r"functools.partial\(FusedVSGD, backend='cpu'\)"):
        FusedAMP(params, lr=0.1, epsilon=0.1, base_optimizer=nvrm_ext.FusedVSGD, backend="cpu")
    amp = FusedAMP(params, lr=0.1, epsilon=0.1,
                   base_optimizer=functools.partial(nvrm_ext.FusedVSGD, backend="cpu", seed=0))
    assert amp.base_optimizer._backend_name == "cpu"


# ---------------------------------------------------------------------- every bucket first
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_invalid_value_in_one_bucket_leaves_every_bucket_unstepped(backend):
    """A typo in the bfloat16 group's noise_type, or a corrupted state tensor there, is found
    before the float32 bucket is launched."""
    params32 = make_params(((4, 3), (5,)))
    params16 = make_params(((6,),), seed=1, dtype=torch.bfloat16)
    opt = nvrm_ext.FusedVSGD([{"params": params32}, {"params": params16}], backend=backend, **SGD)
    everything = params32 + params16
    set_grads(everything, 0)
    opt.step()
    opt.param_groups[1]["noise_type"] = "Gausian"
    set_grads(everything, 1)
    _refused(opt, everything, opt.step, ValueError, "Invalid noise_type")
    opt.param_groups[1]["noise_type"] = "Gaussian"
    opt.state[params16[0]]["momentum_buffer"] = torch.zeros(7, dtype=torch.bfloat16)
    _refused(opt, everything, opt.step, ValueError, r"momentum_buffer.*shape \(7,\)")


# ---------------------------------------------------------------------- loaded state
def _corrupt(sd, index, key, value):
    sd = copy.deepcopy(sd)
    sd["state"][index][key] = value
    return sd


CORRUPT_STATE = [
    ("momentum_buffer", torch.zeros(2), "shape"),         # smaller: the wrong slice, silently
    ("momentum_buffer", torch.zeros(400), "shape"),       # larger: heap corruption
    ("momentum_buffer", torch.zeros(5, 3, dtype=torch.int32), "floating-point"),
    ("momentum_buffer", "zeros", "floating-point"),
    ("step", -1, "invalid step"),
    ("step", True, "invalid step"),
    ("step", float("nan"), "invalid step"),
    ("step", 2**70, "invalid step"),
    ("step", torch.tensor([1.0, 2.0]), "invalid step"),
    ("noise_step", 2.5, "invalid noise_step"),
    ("noise_type", "Gaussian", "invalid noise_type"),  # torch's load would make it "<generator ...>"
    ("noise_type", 7, "invalid noise_type"),
    ("noise_scale", float("inf"), "invalid noise_scale"),
    ("noise_scale", -0.5, "invalid noise_scale"),
    ("noise_scale", 1e39, "invalid noise_scale"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key,value,message", CORRUPT_STATE, ids=lambda v: repr(v)[:16])
def test_a_corrupted_state_dict_is_refused_before_anything_is_loaded(backend, key, value, message):
    params, opt = _stepped(backend=backend)
    saved = _corrupt(opt.state_dict(), 0, key, value)
    target_params, target = _stepped(backend=backend, steps=1, seed=3)
    _refused(target, target_params, lambda: target.load_state_dict(saved), (ValueError, TypeError), message)
    set_grads(target_params, 9)
    target.step()  # still usable


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [nvrm_ext.FusedVSGD, nvrm_ext.FusedVAdam])
def test_a_state_dict_of_parameters_in_another_order_with_other_shapes_is_refused(backend, cls):
    _, opt = _stepped(cls, backend=backend, shapes=((5,), (30, 40)))
    params, target = _stepped(cls, backend=backend, shapes=((30, 40), (5,)), steps=1)
    _refused(target, params, lambda: target.load_state_dict(opt.state_dict()), ValueError, "shape")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loaded_group_with_num_iters_zero_is_refused(backend):
    _, opt = _stepped(backend=backend)
    saved = opt.state_dict()
    saved["param_groups"][0]["num_iters"] = 0
    params, target = _stepped(backend=backend, steps=1)
    _refused(target, params, lambda: target.load_state_dict(saved), ValueError, "param group 0.*Invalid num_iters")


def test_state_for_a_parameter_no_group_lists_is_refused():
    params, opt = _stepped()
    saved = opt.state_dict()
    saved["state"][17] = saved["state"][0]
    _refused(opt, params, lambda: opt.load_state_dict(saved), ValueError, "no param group lists")


def test_held_noisy_copy_of_another_shape_is_refused():
    """A state_dict taken while the noise was removed carries noisy copies; restore_noise()
    would broadcast a wrong-shaped one into the parameter."""
    params, opt = _stepped()
    opt.remove_noise()
    saved = _corrupt(opt.state_dict(), 1, "noisy_param", torch.zeros(1))
    opt.restore_noise()
    _refused(opt, params, lambda: opt.load_state_dict(saved), ValueError, "noisy_param.*shape")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_momentum_buffer_saved_channels_last_is_used_in_the_parameters_layout(backend):
    """torch's load keeps a saved buffer's strides; the kernel indexes it like the parameter."""
    shapes = ((2, 3, 4, 5),)
    params, opt = _stepped(backend=backend, shapes=shapes)
    saved = opt.state_dict()
    twin_saved = copy.deepcopy(saved)
    saved["state"][0]["momentum_buffer"] = saved["state"][0]["momentum_buffer"].to(memory_format=torch.channels_last)
    results = []
    for state_dict in (saved, twin_saved):
        resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
        target = nvrm_ext.FusedVSGD(resumed, backend=backend, **SGD)
        target.load_state_dict(state_dict)
        set_grads(resumed, 5)
        target.step()
        results.append(resumed[0].detach().clone())
    assert torch.equal(*results)


# ---------------------------------------------------------------------- edited state
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key,value,message", [
    ("step", -3, "invalid step"), ("noise_step", "1", "invalid noise_step"), ("noise_type", 3, "invalid noise_type"),
    ("noise_scale", float("nan"), "invalid noise_scale"), ("momentum_buffer", torch.zeros(3), "shape"),
    ("momentum_buffer", torch.zeros(5, 3, dtype=torch.float64), "dtype"),
    ("momentum_buffer", torch.zeros(3, 5).t(), "strides"),
], ids=lambda v: repr(v)[:16])
def test_state_edited_between_steps_is_checked_at_the_next_step(backend, key, value, message):
    params, opt = _stepped(backend=backend)
    opt.state[params[0]][key] = value
    set_grads(params, 5)
    _refused(opt, params, opt.step, ValueError, message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_counter_deleted_from_the_state_is_a_clear_error(backend):
    params, opt = _stepped(backend=backend)
    del opt.state[params[1]]["noise_type"]
    set_grads(params, 5)
    _refused(opt, params, opt.step, ValueError, "noise_type")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,key", [(nvrm_ext.FusedVSGD, "momentum_buffer"), (nvrm_ext.FusedVAdam, "exp_avg"),
                                     (nvrm_ext.FusedVAdam, "exp_avg_sq")])
def test_a_state_tensor_replaced_in_the_dict_is_the_one_updated(backend, cls, key):
    """`opt.state[p]["momentum_buffer"] = torch.zeros_like(p)` (a momentum reset) is honoured
    like torch.optim honours it, not ignored while the kernel writes into the old buffer."""
    params, opt = _stepped(cls, backend=backend, steps=3)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = cls(twin, backend=backend, **(SGD if cls is nvrm_ext.FusedVSGD else ADAM))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's load would share the buffers
    opt.state[params[1]][key] = torch.zeros_like(params[1])
    twin_opt.state[twin[1]][key].zero_()  # the same reset, in place
    for step in range(3, 5):
        set_grads(params, step)
        set_grads(twin, step)
        opt.step()
        twin_opt.step()
    for a, b in zip(params, twin):
        assert torch.equal(a.detach(), b.detach())
    assert torch.equal(opt.state[params[1]][key], twin_opt.state[twin[1]][key])


# ---------------------------------------------------------------------- parameters changed under the optimizer
CHANGES = {  # what changes: how
    "dtype": lambda p: setattr(p, "data", p.data.half()),
    "shape": lambda p: setattr(p, "data", torch.randn(30, 40)),
    "shape (an in-place view)": lambda p: setattr(p, "data", p.data[:1]),
    "strides": lambda p: setattr(p, "data", p.data.t().contiguous().t()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", list(CHANGES))
def test_parameter_storage_changed_then_reset_noise_is_a_clear_error_then_a_fresh_start(backend, change):
    """The issue's sequence: the storage changes, step() refuses (saying what changed, not
    that the values did), reset_noise() as advised, step() again: a clear error about the
    state that no longer fits, nothing changed; dropping that state starts the parameter
    afresh, exactly as the specification's first step."""
    params, opt = _stepped(backend=backend, shapes=((5,), (3, 4)))
    CHANGES[change](params[1])
    params[1].grad = torch.randn(params[1].shape, dtype=params[1].dtype)
    error = _refused(opt, params, opt.step, nvrm_ext.WeightsChangedError, f"changed its {change.split()[0]} from")
    assert "values" not in str(error)
    opt.reset_noise()
    _refused(opt, params, opt.step, ValueError, "momentum_buffer")
    del opt.state[params[1]]
    before = params[1].detach().clone()
    grad = params[1].grad.clone()
    opt.step()
    noise = spec.from_memory_order(spec.noise("Gaussian", 0.05, 7, 1, 1, before.numel()), before)
    expected = before.float() - 0.1 * grad.float() + noise
    torch.testing.assert_close(params[1].detach().float(), expected,
                               **(dict(rtol=0, atol=1e-6) if before.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_values_in_new_strides_without_noise_are_accepted(backend):
    """With no noise on it (variability 0), a parameter in a new layout is simply followed."""
    params, opt = _stepped(backend=backend, shapes=((3, 4),), variability=0.0)
    params[0].data = params[0].data.t().contiguous().t()
    opt.state[params[0]]["momentum_buffer"] = opt.state[params[0]]["momentum_buffer"].t().contiguous().t()
    reference = torch.optim.SGD([torch.nn.Parameter(params[0].detach().clone())], lr=0.1, momentum=0.9)
    reference.state[reference.param_groups[0]["params"][0]]["momentum_buffer"] = opt.state[params[0]]["momentum_buffer"].clone()
    set_grads(params, 5)
    reference.param_groups[0]["params"][0].grad = params[0].grad.clone()
    opt.step()
    reference.step()
    torch.testing.assert_close(params[0].detach(), reference.param_groups[0]["params"][0].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("operation", ["remove_noise", "clean_state_dict"])
def test_denoising_a_parameter_in_new_strides_says_what_changed(operation):
    params, opt = _stepped(shapes=((3, 4),))
    params[0].data = params[0].data.t().contiguous().t()
    module = torch.nn.Module()
    module.register_parameter("w", params[0])
    action = opt.remove_noise if operation == "remove_noise" else functools.partial(opt.clean_state_dict, module)
    _refused(opt, params, action, nvrm_ext.WeightsChangedError, r"changed its strides from \(4, 1\) to \(1, 3\)")


def test_restore_noise_refuses_a_parameter_of_another_shape():
    params, opt = _stepped()
    opt.remove_noise()
    params[0].data = torch.zeros(1, 3)
    _refused(opt, params, opt.restore_noise, RuntimeError, "held noisy copy")


# ---------------------------------------------------------------------- the crashes, as fresh scripts
CRASHES = {
    "num_iters_zero_edited_or_loaded": """
params, opt = stepped()
sd = opt.state_dict(); sd["param_groups"][0]["num_iters"] = 0
refused(opt, params, lambda: opt.load_state_dict(sd), "Invalid num_iters")
opt.param_groups[0]["num_iters"] = 0
refused(opt, params, opt.step, "Invalid num_iters")
""",
    "larger_buffer_loaded": """
params, opt = stepped()
sd = opt.state_dict(); sd["state"][0]["momentum_buffer"] = torch.zeros(4000)
params2, opt2 = stepped(steps=1)
refused(opt2, params2, lambda: opt2.load_state_dict(sd), "shape")
""",
    "reordered_shapes_loaded": """
params, opt = stepped(shapes=((5,), (300, 40)))
params2, opt2 = stepped(shapes=((300, 40), (5,)), steps=1)
refused(opt2, params2, lambda: opt2.load_state_dict(opt.state_dict()), "shape")
""",
    "storage_changed_then_reset_noise": """
for change in ("half", "size", "view", "strides"):
    params, opt = stepped(shapes=((5,), (300, 40)))
    p = params[1]
    p.data = {"half": lambda: p.data.half(), "size": lambda: torch.randn(3, 4), "view": lambda: p.data[:1],
              "strides": lambda: p.data.t().contiguous().t()}[change]()
    p.grad = torch.randn(p.shape, dtype=p.dtype)
    refused(opt, params, opt.step, "changed its")
    opt.reset_noise()
    refused(opt, params, opt.step, "momentum_buffer")
""",
}

PRELUDE = """
import sys, torch, nvrm_ext
sys.path.insert(0, {tests!r})
from edge_cases import make_params, set_grads, snapshot, assert_unchanged
def stepped(shapes=((5, 3), (7,)), steps=2):
    params = make_params(shapes)
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, variability=0.05, num_iters=10, seed=7, backend={backend!r})
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return params, opt
def refused(opt, params, action, match):
    before = snapshot(opt, params)
    try:
        action()
    except (ValueError, TypeError, RuntimeError) as error:
        assert match in str(error), str(error)
    else:
        raise AssertionError("not refused")
    assert_unchanged(opt, params, before)
"""


@pytest.mark.parametrize("case", list(CRASHES))
def test_the_cases_that_killed_the_process_end_with_a_clear_error_in_a_fresh_script(case):
    tests = str(Path(__file__).resolve().parent)
    script = PRELUDE.format(tests=tests, backend="cpu") + CRASHES[case] + "\nprint('refused cleanly')\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tests).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert "refused cleanly" in result.stdout


@pytest.mark.parametrize("value", [torch.tensor([1.0, 2.0]), torch.tensor([]), "3", None,
                                   torch.tensor(float("nan"), dtype=torch.float64), torch.tensor(-1.0)])
def test_a_capturable_counter_replaced_by_a_malformed_value_is_refused(value):
    """Capturable counters are 0-dim tensors; a rebuild checks their shape and type (and, on
    the CPU, where reading them costs no sync, their values)."""
    params, opt = _stepped(capturable=True)
    opt.state[params[0]]["step"] = value
    opt.state[params[0]]["momentum_buffer"] = opt.state[params[0]]["momentum_buffer"].clone()  # forces a rebuild
    set_grads(params, 5)
    _refused(opt, params, opt.step, ValueError, "invalid step")
