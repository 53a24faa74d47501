"""Every piece of bookkeeping a step commits, changed between steps, against an independent oracle.

Per parameter a step commits its step count, which step's noise is now on the weights, that
noise's type and scale, and whether a momentum buffer has been used. The next step (and
denoised()) regenerates the old noise from exactly that record, so a record that is wrong or
stale gives silently wrong weights -- but only once something *changes* between steps. This
run changes all of it: a frozen parameter (never a gradient) sits before trainable ones, a
parameter gets its first gradient mid-run and another misses one, a group switches its noise
type (twice) and variability, lr and num_iters, SGD momentum is switched on (a fresh buffer
among used ones), and the optimizer is rebuilt from its state_dict half way.

The oracle is nvrm_ext.original (per-tensor ops, the noise on the weights kept in a buffer, so
it needs no record at all) fed, through `noise_fn`, the noise the specification defines for
(seed, flat parameter index, step) -- computed here from nvrm_ext.noise with the group's
*current* type and scale, independently of the optimizer under test.
"""
import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec
from nvrm_ext.original import OriginalVAdam, OriginalVSGD

SEED = 20261130
STEPS = 8
# (shape, group) in flat-key order; key 0 never has a gradient, LATE first gets one at step 3,
# SKIPS misses the gradient of step 5.
PARAMS = [((3, 4), 0), ((6, 5), 0), ((13,), 0), ((9,), 1), ((2, 3, 3), 1)]
FROZEN, LATE, SKIPS = 0, 2, 4

CASES = {
    "vsgd": (nvrm_ext.FusedVSGD, OriginalVSGD,
             [dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, variability=0.02, num_iters=4),
              dict(lr=0.08, variability=0.03, num_iters=5)]),
    "vadam": (nvrm_ext.FusedVAdam, OriginalVAdam,
              [dict(lr=1e-2, weight_decay=1e-2, variability=0.02, num_iters=4),
               dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.1, decoupled=True, variability=0.03,
                    num_iters=5)]),
}


def _changes(name: str, step: int) -> list:
    """(group index, hyperparameter, value) applied to both optimizers before `step`."""
    changes = {
        3: [(1, "noise_type", "Laplace")],
        4: [(0, "variability", 0.05), (1, "lr", 0.04)],
        5: [(0, "noise_type", "Uniform"), (1, "num_iters", 3)],
        7: [(1, "noise_type", "Gaussian"), (1, "variability", 0.01)],
    }.get(step, [])
    if name == "vsgd" and step == 4:
        changes.append((1, "momentum", 0.5))  # a fresh buffer next to used ones
    return changes


def _grad(p: torch.Tensor, key: int) -> torch.Tensor:
    """A smooth non-quadratic gradient of the (perturbed) weights, as in training."""
    return 2.0 * (p - 0.1 * key) + 0.5 * torch.sin(3.0 * p)


def _has_grad(key: int, step: int) -> bool:
    return key != FROZEN and not (key == LATE and step < 3) and not (key == SKIPS and step == 5)


def _groups(params, option_sets):
    return [dict(params=[p for p, (_, g) in zip(params, PARAMS) if g == index], **options)
            for index, options in enumerate(option_sets)]


def _new_params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape, _ in PARAMS]


def _spec_noise(groups_of_key):
    """noise_fn for the oracle: the specified noise of (key, step) with the group's current
    type and scale (docs/noise.md: float32(scale) * z(seed, key, step, element))."""
    def noise_fn(key, p, step):
        group = groups_of_key[key]
        return spec.noise(group["noise_type"], group["variability"], SEED, key, step,
                          p.numel()).view(p.shape)
    return noise_fn


def _check(step, fused, params, original, original_params, steps_taken):
    where = f"after step {step}"
    for key, (p, q) in enumerate(zip(params, original_params)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"{where}, parameter {key} (perturbed): {m}")
    with fused.denoised():
        for key, (p, q) in enumerate(zip(params, original_params)):
            state = original.state.get(q)
            clean = q.detach() - state["noise1"] if state else q.detach()
            torch.testing.assert_close(p.detach(), clean, rtol=2e-5, atol=2e-6,
                                       msg=lambda m: f"{where}, parameter {key} (denoised): {m}")
    for key, p in enumerate(params):
        if steps_taken[key] == 0:
            assert p not in fused.state, f"{where}: parameter {key} has state but no step"
        else:
            counter = fused.state[p]["step"]
            assert isinstance(counter, torch.Tensor) is fused.capturable  # live counters: device views
            assert int(counter) == steps_taken[key], f"{where}, parameter {key}"


@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_changes_between_steps_track_the_original(name, backend, capturable):
    fused_cls, original_cls, option_sets = CASES[name]
    params, original_params = _new_params(), _new_params()
    fused = fused_cls(_groups(params, option_sets), seed=SEED, backend=backend, capturable=capturable)
    original_groups = _groups(original_params, option_sets)
    groups_of_key = [original_groups[g] for _, g in PARAMS]
    original = original_cls(original_groups, noise_fn=_spec_noise(groups_of_key))
    steps_taken = [0] * len(PARAMS)
    for step in range(1, STEPS + 1):
        for group_index, name_, value in _changes(name, step):
            fused.param_groups[group_index][name_] = value
            original.param_groups[group_index][name_] = value
        if step == 6:  # resume from a checkpoint: the record must travel with it
            saved = fused.state_dict()
            fused = fused_cls(_groups(params, option_sets), seed=1, backend=backend, capturable=capturable)
            fused.load_state_dict(saved)
            assert fused.capturable is capturable  # load_state_dict keeps the mode
        for key, (p, q) in enumerate(zip(params, original_params)):
            if _has_grad(key, step):
                p.grad, q.grad = _grad(p.detach(), key), _grad(q.detach(), key)
                steps_taken[key] += 1
            else:
                p.grad = q.grad = None
        fused.step()
        original.step()
        _check(step, fused, params, original, original_params, steps_taken)
    assert params[FROZEN] not in fused.state



@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_psgd_commits_no_noise_to_remove(backend, capturable):
    """denoise=False (PSGD): each step adds fresh noise of the group's current type and scale and
    records none as on the weights, so no later step or denoised() removes any. Reference: plain
    per-tensor SGD with momentum plus the specified noise, by hand."""
    num_iters = 4
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((5, 4), (11,))]
    reference = [p.detach().clone() for p in params]
    buffers = [None, None]
    opt = nvrm_ext.FusedVSGD(params, lr=0.05, momentum=0.9, variability=0.02, num_iters=num_iters,
                             seed=SEED, backend=backend, capturable=capturable, denoise=False)
    group = opt.param_groups[0]
    for step in range(1, 7):
        if step == 3:
            group["noise_type"], group["variability"] = "Laplace", 0.04
        if step == 6:
            group["noise_type"] = "Uniform"
        for key, (p, r) in enumerate(zip(params, reference)):
            p.grad = _grad(p.detach(), key)
            buffers[key] = p.grad.clone() if buffers[key] is None else 0.9 * buffers[key] + p.grad
            r -= 0.05 * buffers[key]
            if step % num_iters:
                r += spec.noise(group["noise_type"], group["variability"], SEED, key, step,
                                r.numel()).view(r.shape)
        opt.step()
        for key, (p, r) in enumerate(zip(params, reference)):
            torch.testing.assert_close(p.detach(), r, rtol=2e-5, atol=2e-6,
                                       msg=lambda m: f"after step {step}, parameter {key}: {m}")
        outside = [p.detach().clone() for p in params]
        with opt.denoised():  # nothing is recorded as removable
            assert all(torch.equal(p.detach(), o) for p, o in zip(params, outside))
