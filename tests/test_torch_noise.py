"""The 'torch' backend's batched noise (backends/torch_noise.py), compiled and eager, against the
independent specification (nvrm_ext.noise.noise, one tensor at a time) and the original
per-tensor algorithm (nvrm_ext.original) fed that specification's noise.

The compiled program (torch.compile, COMPILE_MIN_ELEMENTS lowered to 0 so that small tensors
use it too) and the eager pieces must give the specification's noise on every element: odd
sizes, offsets that start inside a quad, every pair of old and new noise types, one side
missing; and the weights of whole runs must be the original algorithm's, float32, float64
and float16 parameters included.
"""
import math
import warnings

import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec
from nvrm_ext.backends import torch_noise
from nvrm_ext.original import OriginalVAdam, OriginalVSGD

SEED = 0xFEEDFACE12345
SIDES = [None, "Gaussian", "Laplace", "Uniform"]
PAIRS = [(old, new) for old in SIDES for new in SIDES if (old, new) != (None, None)]
# (key, offset, numel): odd sizes, offsets inside a quad, a segment of one element, a long one
SEGMENTS = [(3, 0, 1), (0, 5, 7), (17, 2, 1001), (2**32 - 1, 2**33 + 3, 5), (9, 0, 4099), (4, 1, 3)]


@pytest.fixture(params=["compiled", "eager"])
def path(request, monkeypatch):
    """The compiled program (any size) or the eager pieces (never compiled)."""
    if request.param == "compiled":
        monkeypatch.setattr(torch_noise, "COMPILE_MIN_ELEMENTS", 0)
        monkeypatch.delenv("NVRM_TORCH_COMPILE", raising=False)
    else:
        monkeypatch.setenv("NVRM_TORCH_COMPILE", "0")
    return request.param


def _within_one_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal, or one float32 ulp apart: the float64 transforms are evaluated by torch's
    vectorized math on the same inputs in both, so they agree bit for bit here; the one ulp
    is the room a platform whose vector width changes which elements take a scalar tail has."""
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    ulp = (torch.nextafter(expected.abs(), torch.tensor(math.inf)) - expected.abs())
    assert ((actual - expected).abs() <= ulp).all(), (actual - expected).abs().max()


def _reference_difference(old, new, members):
    out = []
    for key, offset, numel, (old_step, _, old_scale), (new_step, _, new_scale) in members:
        n_new = spec.noise(new, new_scale, SEED, key, new_step, numel, offset=offset) if new else None
        n_old = spec.noise(old, old_scale, SEED, key, old_step, numel, offset=offset) if old else None
        out.append(-n_old if n_new is None else n_new if n_old is None else n_new - n_old)
    return out


@pytest.mark.parametrize("old,new", PAIRS, ids=lambda side: str(side))
def test_noise_differences_match_the_specification(path, old, new):
    members = [(key, offset, numel, (7 if old else 0, old, 0.25), (8 if new else 0, new, 0.03125 * (1 + key % 3)))
               for key, offset, numel in SEGMENTS]
    got = torch_noise.noise_differences(SEED, members, torch.device("cpu"))
    for actual, expected in zip(got, _reference_difference(old, new, members)):
        if "Gaussian" in (old, new) or "Laplace" in (old, new):
            _within_one_ulp(actual, expected)
        else:
            assert torch.equal(actual, expected)


def test_a_single_long_segment_and_large_steps_match_the_specification(path):
    members = [(5, 3, 70_001, (2**32 - 1, "Gaussian", 0.5), (1, "Laplace", 2.0))]
    (got,) = torch_noise.noise_differences(SEED, members, torch.device("cpu"))
    _within_one_ulp(got, _reference_difference("Gaussian", "Laplace", members)[0])


def test_the_noise_removed_is_the_noise_added_bit_for_bit(path):
    """lr 0 on zero weights: after step 1 the weights are the noise (the specification's),
    after step 2 (num_iters 2: removal only) exactly zero again -- the regenerated noise has the
    bits of the added one, although it is computed in another batch (one tensor has no
    gradient at step 2)."""
    shapes = [(1001,), (7, 3), (4099,)]
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = nvrm_ext.FusedVSGD(params, lr=0.0, variability=0.1, num_iters=2, noise_type="Gaussian", seed=SEED,
                             backend="torch")
    opt.step()
    for key, p in enumerate(params):
        expected = spec.noise("Gaussian", 0.1, SEED, key, 1, p.numel()).view(p.shape)
        _within_one_ulp(p.detach(), expected)
    params[1].grad = None
    opt.step()
    assert torch.equal(params[0], torch.zeros(shapes[0])) and torch.equal(params[2], torch.zeros(shapes[2]))


def _run_pair(cls, original_cls, kwargs, dtype, noise_type, steps=6, num_iters=3):
    """The torch backend and the original algorithm, fed the specification's noise, from the same
    weights and gradients; returns both lists of weights."""
    shapes = [(37,), (5, 7), (1,), (3, 4, 5), (4099,)]
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(shape, generator=g).to(dtype) for shape in shapes]
    grads = [[torch.randn(shape, generator=g).to(dtype) for shape in shapes] for _ in range(steps)]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    noise = dict(variability=0.05, num_iters=num_iters, noise_type=noise_type)
    fused = cls(ours, **kwargs, **noise, seed=SEED, backend="torch")

    def noise_fn(key, p, step):
        return spec.noise(noise_type, 0.05, SEED, key, step, p.numel()).view(p.shape)
    original = original_cls(theirs, **kwargs, **noise, noise_fn=noise_fn)
    for step_grads in grads:
        for a, b, grad in zip(ours, theirs, step_grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        original.step()
    return ours, theirs


CASES = [(nvrm_ext.FusedVSGD, OriginalVSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)),
         (nvrm_ext.FusedVAdam, OriginalVAdam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("noise_type", spec.NOISE_TYPES)
@pytest.mark.parametrize("cls,original_cls,kwargs", CASES, ids=["vsgd", "vadam"])
def test_torch_backend_follows_the_original_algorithm(path, cls, original_cls, kwargs, dtype, noise_type):
    ours, theirs = _run_pair(cls, original_cls, kwargs, dtype, noise_type)
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype
        # the same math in another order (the original's alpha= forms) and, for float64, the
        # noise difference n_new - n_old rounded to float32 (the original subtracts its float32
        # noise in float64): a few float32 roundings of the noise per step apart
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.detach(), b.detach(), **tolerance)


@pytest.mark.parametrize("case,dtype", [(0, torch.float16), (0, torch.bfloat16), (1, torch.bfloat16)],
                         ids=["vsgd-float16", "vsgd-bfloat16", "vadam-bfloat16"])
def test_torch_backend_16_bit_parameters_follow_the_original_algorithm(path, case, dtype):
    """16-bit weights: ours carry the compensation (exact weights as float32 sums), the original
    rounds every step; they agree to the 16-bit rounding of a few steps. (No float16 Adam: the
    original's float16 second moment underflows and its eps of 1e-8 is 0 in float16.)"""
    cls, original_cls, kwargs = CASES[case]
    ours, theirs = _run_pair(cls, original_cls, kwargs, dtype, "Gaussian")
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=2e-2, atol=2e-2)


def test_a_failing_compilation_falls_back_to_the_eager_noise_and_says_so_once(monkeypatch):
    monkeypatch.setattr(torch_noise, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch_noise, "_programs", {})
    monkeypatch.delenv("NVRM_TORCH_COMPILE", raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", broken)
    members = [(1, 3, 101, (0, None, 0.0), (2, "Gaussian", 0.5))]
    with pytest.warns(RuntimeWarning, match="torch.compile of the 'torch' backend's noise failed on cpu"):
        (first,) = torch_noise.noise_differences(SEED, members, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (second,) = torch_noise.noise_differences(SEED, members, torch.device("cpu"))
    expected = spec.noise("Gaussian", 0.5, SEED, 1, 2, 101, offset=3)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_the_compiled_program_runs_without_recompiling_across_steps_and_batches(monkeypatch):
    """One compiled program per (old type, new type): steps, seeds, scales and batch sizes are
    its inputs, so stepping on never compiles again (a recompilation would cost seconds)."""
    monkeypatch.setattr(torch_noise, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.delenv("NVRM_TORCH_COMPILE", raising=False)
    import torch._dynamo.utils as dynamo_utils
    members = [(1, 0, 513, (3, "Uniform", 0.5), (4, "Uniform", 0.25)), (2, 1, 77, (3, "Uniform", 0.5), (4, "Uniform", 1.0))]
    torch_noise.noise_differences(SEED, members, torch.device("cpu"))
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for step in range(5, 9):
        batch = [(key, offset, numel + step, (step - 1, "Uniform", 0.5), (step, "Uniform", 0.125))
                 for key, offset, numel, _, _ in members[: 1 + step % 2]]
        got = torch_noise.noise_differences(SEED + step, batch, torch.device("cpu"))
        for (key, offset, numel, old, new), delta in zip(batch, got):
            expected = (spec.noise("Uniform", new[2], SEED + step, key, new[0], numel, offset=offset)
                        - spec.noise("Uniform", old[2], SEED + step, key, old[0], numel, offset=offset))
            assert torch.equal(delta, expected)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("old,new", [("Uniform", "Uniform"), (None, "Uniform"), ("Uniform", None)], ids=str)
def test_float64_parameters_get_the_float32_noises_widened_and_subtracted_in_float64(path, old, new):
    """docs/noise.md §7: a float64 parameter receives the float32 noise of a float32 one,
    widened exactly; n_new - n_old is taken in float64 (not rounded to float32 first)."""
    members = [(key, offset, numel, (7 if old else 0, old, 0.25), (8 if new else 0, new, 0.1))
               for key, offset, numel in SEGMENTS]
    got = torch_noise.noise_differences(SEED, members, torch.device("cpu"), wide=True)
    for actual, (key, offset, numel, old_side, new_side) in zip(got, members):
        n_new = (spec.noise(new, new_side[2], SEED, key, new_side[0], numel, offset=offset).double()
                 if new else None)
        n_old = (spec.noise(old, old_side[2], SEED, key, old_side[0], numel, offset=offset).double()
                 if old else None)
        expected = -n_old if n_new is None else n_new if n_old is None else n_new - n_old
        assert actual.dtype == torch.float64 and torch.equal(actual, expected)
    if old and new:  # the float32 difference would have rounded: the test can tell the two apart
        narrow = torch_noise.noise_differences(SEED, members, torch.device("cpu"))
        assert any(not torch.equal(a, n.double()) for a, n in zip(got, narrow))
