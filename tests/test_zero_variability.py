"""variability=0 param groups: the plain base optimizer in the same launch.

Such a group must follow torch.optim's SGD / Adam / AdamW on its parameters (up to the rounding
of a different operation order; 16-bit parameters keep a compensation buffer, so they are
compared with an fp32 reference), never be perturbed, and leave the other groups' noise alone.
"""
import pytest
import torch

import nvrm_ext

BACKENDS = ["torch", "cpu", "triton"]
STEPS = 12
CASES = {
    "sgd": (nvrm_ext.FusedVSGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
            torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "sgd-nesterov": (nvrm_ext.FusedVSGD, dict(lr=0.05, momentum=0.9, nesterov=True),
                     torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (nvrm_ext.FusedVAdam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True),
             torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    "adamw": (nvrm_ext.FusedVAdam, dict(lr=1e-2, weight_decay=1e-1, decoupled=True),
              torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-1)),
}
# bfloat16: the state buffers are bfloat16 too, so the run drifts from the fp32 reference by a
# few bf16 ulps over the steps; a perturbation of the group (variability 0.05) would be far larger
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-6, atol=1e-2)}


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in [(33, 17), (17,), (64,)]]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_variability_group_is_the_base_optimizer_and_never_perturbed(case, dtype, backend, capturable):
    cls, kwargs, torch_cls, torch_kwargs = CASES[case]
    params = _params(dtype)
    quiet, noisy = params[:2], params[2:]
    opt = cls([{"params": quiet, "variability": 0.0}, {"params": noisy}], **kwargs, variability=0.05,
              num_iters=5, seed=3, backend=backend, capturable=capturable)
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in quiet]
    torch_opt = torch_cls(reference, **torch_kwargs, foreach=False)
    initial_noisy = noisy[0].detach().clone()
    for step in range(STEPS):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        for p, g in zip(reference, grads[:2]):
            p.grad = g.float()
        opt.step()
        torch_opt.step()
        for p, q in zip(quiet, reference):  # after every step: nothing but the base update on it
            torch.testing.assert_close(p.detach().float(), q.detach(), **TOLERANCE[dtype])
            assert int(opt.state[p]["noise_step"]) == 0
        if (step + 1) % 5:  # every 5th step of the noisy group leaves it clean (num_iters=5)
            assert int(opt.state[noisy[0]]["noise_step"]) == step + 1
    with opt.denoised():  # removes the other group's noise only
        for p, q in zip(quiet, reference):
            torch.testing.assert_close(p.detach().float(), q.detach(), **TOLERANCE[dtype])
        clean = noisy[0].detach().clone()
    assert not torch.equal(clean, noisy[0].detach())  # the other group does carry noise
    assert not torch.equal(clean, initial_noisy)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_from_an_earlier_variability_is_removed_at_the_next_step(backend, capturable):
    """Setting a group's variability to 0 mid-run: its next step removes the old noise, adds none."""
    params = _params(torch.float32)
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, variability=0.05, num_iters=100, seed=4, backend=backend,
                             capturable=capturable)
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    with opt.denoised():
        clean = [p.detach().clone() for p in params]
    opt.param_groups[0]["variability"] = 0
    grads = _grads(params, 3)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p, c, g in zip(params, clean, grads):
        torch.testing.assert_close(p.detach(), c - 0.1 * g, rtol=1e-6, atol=1e-7)
        assert int(opt.state[p]["noise_step"]) == 0
    before = [p.detach().clone() for p in params]
    with opt.denoised():
        assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_negative_or_infinite_variability_is_still_rejected():
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="Invalid variability"):
            nvrm_ext.FusedVSGD(_params(torch.float32), lr=0.1, variability=bad)
