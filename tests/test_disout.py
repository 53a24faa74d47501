"""Disout: torch path (autograd, statistics), Triton path, validation -- against hand formulas
(torch.std, an independent Philox re-derivation of the draws), never the module's own helpers."""
import math
import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import (conftest does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

from nvrm_ext.nn import Disout, LinearScheduler, disout
from nvrm_ext.nn.disout import (apply_distortion, block_mask_from_anchors, input_std,
                                sample_block_mask, seed_rate)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU needs TRITON_INTERPRET=1 before triton is imported")


def _triton():
    from nvrm_ext.ops import disout_triton
    return disout_triton


def _philox_uniforms(count, stream, seed):
    """The first two Philox words for counters 0 .. count-1 of a stream (third counter word),
    as tl.uint_to_uniform_float makes them float32 uniforms; independent of the kernels."""
    from nvrm_ext.noise import philox4x32
    counter = torch.arange(count, dtype=torch.int64)
    words = philox4x32(counter & 0xFFFFFFFF, counter >> 32, stream, 0,
                       seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)[:2]
    scale = torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return [torch.where(bits >= 2**31, 2**32 - 1 - bits, bits).to(torch.float32) * scale for bits in words]


def _philox_anchor_mask(shape, gamma, block_size, seed):
    """Independent re-derivation of the kernel's anchors: Philox stream 0, counter = anchor."""
    n, c, height, width = shape
    rows, cols = height - block_size + 1, width - block_size + 1
    uniform, _ = _philox_uniforms(n * c * rows * cols, 0, seed)
    fired = uniform < torch.tensor(gamma, dtype=torch.float32)
    return fired.reshape(n, c, rows, cols)


def _philox_standard_normal(shape, seed):
    """Independent re-derivation of the kernel's noise: Philox stream 1, counter = element,
    Box-Muller as tl.pair_uniform_to_normal (its first output), evaluated in float64."""
    u1, u2 = _philox_uniforms(math.prod(shape), 1, seed)
    radius = torch.sqrt(-2.0 * torch.log(u1.clamp(min=1e-7).double()))
    angle = (torch.tensor(6.283185307179586, dtype=torch.float32) * u2).double()
    return (radius * torch.cos(angle)).reshape(shape)


def _expected_disout(x, distorted, noise, alpha):
    """Disout by hand: distorted elements <- alpha * 0.01 * std(x) * noise, the unbiased
    torch.std of the whole input (0 for one element); everything times numel / kept (kept >= 1).
    float64."""
    x64 = x.detach().double()
    scale = x.numel() / max((~distorted).sum().item(), 1)
    std = torch.std(x64) if x.numel() > 1 else 0.0
    return torch.where(distorted, alpha * 0.01 * std * noise.double(), x64) * scale


def _expected_covered_fraction(gamma, block_size, height, width):
    """Exact E[covered fraction]: element (h, w) is covered by m(h, w) independent anchors."""
    def covering(size):
        anchors = size - block_size + 1
        return torch.tensor([min(i, anchors - 1) - max(0, i - block_size + 1) + 1
                             for i in range(size)], dtype=torch.float64)
    m = covering(height)[:, None] * covering(width)[None, :]
    return float((1 - (1 - gamma) ** m).mean())


# --- torch path ---------------------------------------------------------------------------

def test_gradcheck_torch_path_float64():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    distorted = sample_block_mask(x.shape, 0.3, 3, generator=generator)
    noise = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    assert distorted.any() and not distorted.all()
    # std(x) is detached as in the published code, so gradcheck holds it fixed ...
    assert torch.autograd.gradcheck(lambda t: apply_distortion(t, distorted, noise, 1.5, std=0.7),
                                    (x,))
    # ... and with alpha = 0 the function is exactly the one autograd differentiates.
    assert torch.autograd.gradcheck(lambda t: apply_distortion(t, distorted, noise, 0.0), (x,))


def test_torch_path_replaces_blocks_and_rescales():
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    out = disout(x, 0.25, 3, alpha=2.0, backend="torch",
                 generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    distorted = sample_block_mask(x.shape, 0.25, 3, generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    scale = x.numel() / (~distorted).sum().item()
    torch.testing.assert_close(out.double(), _expected_disout(x, distorted, noise, 2.0))
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, (~distorted).float() * scale)


def test_input_std_is_the_unbiased_std():
    """Hand value: [1, 2, 3, 4] has mean 2.5, squared deviations summing to 5, so the unbiased
    std is sqrt(5 / 3) (the biased one would be sqrt(5 / 4))."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    assert input_std(x).item() == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    y = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(input_std(y), torch.std(y))
    assert input_std(torch.ones(1, 1, 1, 1)).item() == 0.0  # one element: 0, not NaN


def test_block_mask_is_dilation_of_anchors():
    anchors = torch.zeros(1, 1, 5, 6, dtype=torch.bool)
    anchors[0, 0, 1, 2] = True
    mask = block_mask_from_anchors(anchors, 3)
    expected = torch.zeros(1, 1, 7, 8, dtype=torch.bool)
    expected[0, 0, 1:4, 2:5] = True  # anchor = top-left corner of a 3x3 block
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("block_size", [1, 2, 3, 6])
def test_block_mask_equals_max_pool_dilation(block_size):
    anchors = torch.rand(3, 4, 9, 7, generator=torch.Generator().manual_seed(block_size)) < 0.1
    pad = block_size - 1
    pooled = F.max_pool2d(F.pad(anchors.float(), (pad, pad, pad, pad)), block_size, stride=1)
    assert torch.equal(block_mask_from_anchors(anchors, block_size), pooled > 0)


def test_block_size_equal_to_map_distorts_whole_planes():
    x = torch.randn(64, 2, 4, 4) + 3.0
    out = disout(x, 0.5, 4, backend="torch", generator=torch.Generator().manual_seed(1))
    kept_planes = torch.isclose(out, x * (out / x).flatten(2)[..., :1, None]).flatten(2).all(2)
    # a distorted plane holds ~0.01 * std(x) noise, a kept one x (around 3) times the scale
    distorted_planes = out.abs().flatten(2).amax(dim=2) < 0.5
    assert torch.equal(kept_planes, ~distorted_planes)
    assert distorted_planes.any() and kept_planes.any()
    scale = out.numel() / (kept_planes.sum().item() * 16)
    torch.testing.assert_close(out[kept_planes], x[kept_planes] * scale)


def _assert_covered_fraction(masks, dist_prob, block_size, height, width):
    """Mean covered fraction within 5 standard errors of its exact expectation.

    Planes are independent, so the standard error is the sample std of per-plane fractions over
    sqrt(#planes) (CLT); the expectation itself is below dist_prob only by block overlaps:
    p - bs**2 * gamma * p / 2 <= E <= p (since mg - mg**2/2 <= 1 - (1-g)**m <= mg).
    """
    gamma = seed_rate(dist_prob, block_size, height, width)
    expected = _expected_covered_fraction(gamma, block_size, height, width)
    overlap_bound = block_size**2 * gamma * dist_prob / 2
    assert dist_prob - overlap_bound - 1e-12 <= expected <= dist_prob + 1e-12
    per_plane = masks.flatten(2).double().mean(dim=2).flatten()
    standard_error = per_plane.std() / math.sqrt(per_plane.numel())
    assert abs(per_plane.mean() - expected) <= 5 * standard_error + 1e-12


@pytest.mark.parametrize("dist_prob,block_size", [(0.1, 3), (0.3, 5), (0.05, 1)])
def test_covered_fraction_torch_path(dist_prob, block_size):
    masks = sample_block_mask((64, 16, 20, 20), dist_prob, block_size,
                              generator=torch.Generator().manual_seed(11))
    _assert_covered_fraction(masks, dist_prob, block_size, 20, 20)


def test_eval_and_zero_rate_are_identity():
    x = torch.randn(2, 3, 8, 8)
    module = Disout(0.3, 3).eval()
    assert module(x) is x
    assert Disout(0.0, 3)(x) is x
    assert disout(x, 0.3, 3, training=False) is x


def test_linear_scheduler_ramps_and_holds():
    module = Disout(0.0, 3)
    scheduler = LinearScheduler(module, 0.0, 0.2, nr_steps=5)
    seen = []
    for _ in range(7):
        scheduler.step()
        seen.append(module.dist_prob)
    assert seen == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    x = torch.randn(1, 1, 6, 6)
    assert scheduler.eval()(x) is x


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(dist_prob=1.0), r"dist_prob must be in \[0, 1\); got 1.0"),
    (dict(dist_prob=-0.1), r"dist_prob must be in \[0, 1\); got -0.1"),
    (dict(dist_prob=0.1, block_size=0), r"block_size must be an integer >= 1; got 0"),
    (dict(dist_prob=0.1, block_size=2.5), r"block_size must be an integer >= 1; got 2.5"),
    (dict(dist_prob=0.1, alpha=-1.0), r"alpha must be >= 0; got -1.0"),
    (dict(dist_prob=0.1, backend="cuda"), r"backend must be one of 'auto', 'torch', 'triton'"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Disout(**kwargs)


def test_bad_assignment_leaves_module_unchanged():
    module = Disout(0.1, 3)
    with pytest.raises(ValueError, match=r"dist_prob must be in \[0, 1\); got 1.5"):
        module.dist_prob = 1.5
    assert module.dist_prob == 0.1
    with pytest.raises(ValueError, match=r"stop_value must be in \[0, 1\); got 1.0"):
        LinearScheduler(module, 0.0, 1.0, 3)
    assert module.dist_prob == 0.1


@pytest.mark.parametrize("shape,message", [
    ((2, 3, 8), r"Disout expects a 4-D \(N, C, H, W\) input; got shape \(2, 3, 8\)"),
    ((2, 3, 4, 8), r"block_size 5 does not fit the 4x8 feature map"),
])
def test_bad_inputs_raise_and_leave_input_alone(shape, message):
    x = torch.randn(shape)
    before = x.clone()
    with pytest.raises(ValueError, match=message):
        Disout(0.1, 5)(x)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match=r"floating-point input; got dtype torch.int64"):
        Disout(0.1, 1)(torch.ones(1, 1, 2, 2, dtype=torch.int64))


# --- Triton path --------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape,block_size,dist_prob,seed", [
    ((2, 3, 11, 13), 3, 0.2, 1), ((2, 3, 11, 13), 3, 0.2, 0x1234_5678_9ABC),
    ((1, 2, 6, 6), 6, 0.5, 77), ((3, 1, 5, 7), 1, 0.1, 5), ((2, 2, 9, 10), 4, 0.3, 2**40 + 3)])
def test_triton_mask_is_dilation_of_philox_anchors(shape, block_size, dist_prob, seed):
    ops = _triton()
    gamma = seed_rate(dist_prob, block_size, shape[2], shape[3])
    distorted, noise = ops.disout_draws(shape, gamma, block_size, seed, device=TRITON_DEVICE)
    anchors = _philox_anchor_mask(shape, gamma, block_size, seed)
    assert anchors.any()
    assert torch.equal(distorted.cpu(), block_mask_from_anchors(anchors, block_size))
    kept = ops.count_kept(torch.Size(shape), gamma, block_size, seed, TRITON_DEVICE)
    assert kept.item() == (~distorted).sum().item()
    torch.testing.assert_close(noise.cpu().double(), _philox_standard_normal(shape, seed), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype,shape,block_size,dist_prob,alpha", [
    (torch.float32, (2, 3, 11, 13), 3, 0.2, 1.0), (torch.float64, (2, 3, 11, 13), 3, 0.2, 1.0),
    (torch.float32, (1, 2, 6, 6), 6, 0.5, 3.0), (torch.float32, (4, 5, 8, 8), 2, 0.3, 0.0),
    (torch.float64, (1, 1, 1, 1), 1, 0.5, 1.0), (torch.float16, (2, 3, 11, 13), 3, 0.2, 1.0),
    (torch.bfloat16, (2, 3, 11, 13), 3, 0.2, 1.0)])
def test_triton_matches_hand_formula_given_same_draws(dtype, shape, block_size, dist_prob, alpha):
    ops = _triton()
    gamma = seed_rate(dist_prob, block_size, shape[2], shape[3])
    seed = 987654321
    x = torch.randn(shape, dtype=dtype, device=TRITON_DEVICE, requires_grad=True)
    grad_out = torch.randn_like(x)

    out = ops.disout_triton(x, gamma, block_size, alpha, seed)
    out.backward(grad_out)
    distorted, noise = ops.disout_draws(shape, gamma, block_size, seed, device=TRITON_DEVICE)
    expected = _expected_disout(x.cpu(), distorted.cpu(), noise.cpu(), alpha)
    scale = x.numel() / max((~distorted).sum().item(), 1)

    # The kernel computes in float32 (float64) and rounds once; the reference is float64.
    tolerance = {torch.float32: dict(rtol=1e-5, atol=1e-6),
                 torch.float64: dict(rtol=1e-6, atol=1e-7),
                 torch.float16: dict(rtol=1e-3, atol=1e-3),
                 torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}[dtype]
    torch.testing.assert_close(out.cpu().double(), expected, **tolerance)
    expected_grad = torch.where(distorted.cpu(), 0.0, grad_out.cpu().double() * scale)
    torch.testing.assert_close(x.grad.cpu().double(), expected_grad, **tolerance)
    # the torch path gives the same given the same draws
    torch.testing.assert_close(apply_distortion(x.detach().cpu(), distorted.cpu(), noise.cpu(), alpha).double(),
                               expected, **tolerance)


@needs_triton
def test_triton_backward_recomputes_instead_of_storing_mask():
    ops = _triton()
    x = torch.randn(2, 2, 8, 8, device=TRITON_DEVICE, requires_grad=True)
    out = ops.disout_triton(x, 0.05, 3, 1.0, 7)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].numel() == 1  # only the rescale factor
    again = ops.disout_triton(x, 0.05, 3, 1.0, 7)
    assert torch.equal(out, again)
    assert not torch.equal(out, ops.disout_triton(x, 0.05, 3, 1.0, 8))


@needs_triton
def test_covered_fraction_triton_path():
    ops = _triton()
    shape, dist_prob, block_size = (8, 8, 10, 10), 0.2, 3
    gamma = seed_rate(dist_prob, block_size, 10, 10)
    distorted, _ = ops.disout_draws(shape, gamma, block_size, 2024, device=TRITON_DEVICE)
    _assert_covered_fraction(distorted.cpu(), dist_prob, block_size, 10, 10)


@needs_triton
def test_module_triton_backend_is_repeatable_and_identity_in_eval():
    x = torch.randn(2, 3, 8, 8, device=TRITON_DEVICE)
    first = Disout(0.2, 3, backend="triton", generator=torch.Generator().manual_seed(3))(x)
    second = Disout(0.2, 3, backend="triton", generator=torch.Generator().manual_seed(3))(x)
    assert torch.equal(first, second) and not torch.equal(first, x)
    assert Disout(0.2, 3, backend="triton").eval()(x) is x
