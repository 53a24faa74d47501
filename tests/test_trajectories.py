"""Clean-weight trajectories of FusedVSGD / FusedVAdam against the original algorithm.

The oracle is nvrm_ext.original (per-tensor ops, two stored noise buffers, written from the
published algorithm). It is fed the noise the fused optimizer actually used, extracted as
"perturbed weights minus the clean weights seen inside denoised()", so both runs see the same
noise; gradients are a fixed function of the perturbed weights, as in real training.
"""
import pytest
import torch

import nvrm_ext
from nvrm_ext.original import OriginalVAdam, OriginalVSGD

STEPS = 14
SHAPES = [(7, 5), (13,), (4099,), (3, 4, 5)]


def _make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _targets(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _grad(p, target):
    """A smooth non-quadratic gradient evaluated at the (perturbed) weights."""
    return 2.0 * (p - target) + 0.5 * torch.sin(3.0 * p)


def _groups(params, option_sets):
    return [dict(params=params[i::len(option_sets)], **opts) for i, opts in enumerate(option_sets)]


SGD_CASES = {
    "plain": [dict(lr=0.05, variability=0.01, num_iters=5)],
    "momentum_dampening_wd": [
        dict(lr=0.03, momentum=0.9, dampening=0.1, weight_decay=1e-2, variability=0.02, num_iters=4),
        dict(lr=0.01, momentum=0.5, variability=0.05, noise_type="Laplace", num_iters=6),
    ],
    "nesterov": [
        dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4, variability=0.01, num_iters=5,
             noise_type="Uniform"),
        dict(lr=0.05, variability=0.03, num_iters=3),
    ],
}

ADAM_CASES = {
    "l2": [dict(lr=1e-2, weight_decay=1e-2, variability=0.01, num_iters=5)],
    "decoupled": [
        dict(lr=2e-2, weight_decay=0.1, decoupled=True, variability=0.02, num_iters=4, betas=(0.8, 0.99)),
        dict(lr=5e-3, variability=0.01, noise_type="Laplace", num_iters=7),
    ],
    "amsgrad": [
        dict(lr=1e-2, amsgrad=True, eps=1e-6, variability=0.01, num_iters=5, noise_type="Uniform"),
        dict(lr=3e-3, amsgrad=True, weight_decay=1e-3, variability=0.02, num_iters=3),
    ],
}

BACKENDS = ["torch", "triton", "cpu"]


def _run_pair(fused_cls, original_cls, option_sets, backend, dtype=torch.float32, rtol=2e-5, atol=2e-6):
    targets = _targets(dtype)
    fused_params = [torch.nn.Parameter(p) for p in _make_params(dtype=dtype)]
    original_params = [torch.nn.Parameter(p) for p in _make_params(dtype=dtype)]
    fused = fused_cls(_groups(fused_params, option_sets), seed=42, backend=backend)
    # parameter order within groups differs from SHAPES order; map by identity
    order = [p for group in fused.param_groups for p in group["params"]]
    extracted = {}
    original = original_cls(_groups(original_params, option_sets),
                            noise_fn=lambda key, p, step: extracted[(key, step)])
    orig_order = [p for group in original.param_groups for p in group["params"]]
    for step in range(1, STEPS + 1):
        for p, t in zip(fused_params, targets):
            p.grad = _grad(p.detach(), t)
        for p, t in zip(original_params, targets):
            p.grad = _grad(p.detach(), t)
        fused.step()
        with fused.denoised():
            clean = {id(p): p.detach().clone() for p in fused_params}
        for key, p in enumerate(order):
            extracted[(key, step)] = p.detach() - clean[id(p)]
        original.step()
        for key, (fp, op) in enumerate(zip(order, orig_order)):
            original_clean = op.detach() - original.state[op]["noise1"]
            torch.testing.assert_close(clean[id(fp)], original_clean, rtol=rtol, atol=atol,
                                       msg=lambda m: f"step {step}, parameter {key}: {m}")
        # the periodic de-noising step leaves the weights exactly clean
        for key, (fp, group) in enumerate(zip(order, [g for g in fused.param_groups for _ in g["params"]])):
            if step % group["num_iters"] == 0:
                assert torch.equal(fp.detach(), clean[id(fp)])
    return fused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_vsgd_tracks_original(case, backend):
    _run_pair(nvrm_ext.FusedVSGD, OriginalVSGD, SGD_CASES[case], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_vadam_tracks_original(case, backend):
    _run_pair(nvrm_ext.FusedVAdam, OriginalVAdam, ADAM_CASES[case], backend)


# Hyperparameters exact in float32, as the kernels' tables hold them, so that the float64 runs
# differ only by rounding: SGD's update is then the original's to float64 precision; Adam's
# folded step size lr / (1 - beta1^t) is a float32 value (docs/noise.md §7), ~6e-8 relative.
FLOAT64_CASES = {
    "sgd": (nvrm_ext.FusedVSGD, OriginalVSGD, [
        dict(lr=2**-5, momentum=0.875, dampening=0.125, weight_decay=2**-7, variability=2**-6, num_iters=4),
        dict(lr=2**-6, momentum=0.5, nesterov=True, variability=2**-5, noise_type="Laplace", num_iters=6)],
        dict(rtol=1e-13, atol=1e-13)),
    "adam": (nvrm_ext.FusedVAdam, OriginalVAdam, [
        dict(lr=2**-7, betas=(0.875, 0.9921875), eps=2**-20, weight_decay=2**-6, variability=2**-6, num_iters=5),
        dict(lr=2**-8, amsgrad=True, decoupled=True, weight_decay=2**-3, betas=(0.75, 0.984375),
             variability=2**-5, noise_type="Uniform", num_iters=3)],
        dict(rtol=0, atol=1e-8)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(FLOAT64_CASES))
def test_float64_tracks_original_in_float64(case, backend):
    """float64 parameters on every backend: the original's float64 trajectory, far closer than a
    float32 computation could come (~1e-7), with float64 state."""
    fused_cls, original_cls, option_sets, tolerance = FLOAT64_CASES[case]
    fused = _run_pair(fused_cls, original_cls, option_sets, backend, torch.float64, **tolerance)
    for p in fused.state:
        assert p.dtype == torch.float64
        assert all(v.dtype == torch.float64 for v in fused.state[p].values() if torch.is_tensor(v) and v.dim())


def test_denoise_false_accumulates_noise_psgd():
    """denoise=False: fresh noise every step, none removed (the PSGD baseline)."""
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = nvrm_ext.FusedVSGD([p], lr=0.0, variability=0.1, seed=1, denoise=False, backend="torch")
    p.grad = torch.ones_like(p)  # not all zero: that first step at lr 0 would only create the state (DCP's init)
    opt.step()
    first = p.detach().clone()
    opt.step()
    second_noise = p.detach() - first
    assert abs(second_noise.std().item() - 0.1) < 0.01           # a fresh draw was added ...
    assert abs(p.detach().std().item() - 0.1 * 2**0.5) < 0.015   # ... and the first was kept
    with opt.denoised():                                          # nothing to remove
        assert torch.equal(p.detach(), first + second_noise)
