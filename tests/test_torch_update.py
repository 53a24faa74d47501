"""The 'torch' backend's grouped update (torch_update) against its per-row path and the fused
'cpu' backend, bit for bit, on one optimizer whose step mixes everything the grouping splits
on: param groups with different flags and coefficients, float32 next to bfloat16 with the
compensation and float64, non-contiguous and channels_last parameters, a parameter without a
gradient, rows batched into flat copies and rows updated where they lie (thresholds lowered so
that small tensors exercise both), a GradScaler-style unscale."""
from __future__ import annotations

import pytest
import torch

import nvrm_ext
from nvrm_ext.backends import torch_ref, torch_update

SEED = 11


def _params(generator):
    """(tensor, has grad) pairs covering the layouts and dtypes."""
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator).to(dtype)
    return [
        (randn(37), True),
        (randn(8, 5).t(), True),                                                      # non-contiguous
        (randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), True),
        (randn(300), True),                                                            # a large row
        (randn(11), False),                                                            # no gradient
        (randn(53, dtype=torch.bfloat16), True),                                       # + compensation
        (randn(400, dtype=torch.bfloat16), True),
        (randn(29, dtype=torch.float64), True),
        (randn(3, 7, dtype=torch.float64).t(), True),
    ]


def _groups(family, tensors):
    """Three param groups over the same tensors, with flags and coefficients that differ."""
    thirds = [tensors[0::3], tensors[1::3], tensors[2::3]]
    if family == "sgd":
        options = [dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
                   dict(lr=0.05, momentum=0.8, dampening=0.1),
                   dict(lr=0.1, weight_decay=3e-3)]
    else:
        options = [dict(lr=1e-2, amsgrad=True, weight_decay=1e-2),
                   dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.0),
                   dict(lr=1e-2, amsgrad=True, decoupled_weight_decay=True, weight_decay=0.1)]
    return [dict(params=params, **option) for params, option in zip(thirds, options)]


def _run(family, backend, grouped, steps=5, variability=0.05):
    """Weights and states after `steps` steps (noise swapped on every step, num_iters 3)."""
    generator = torch.Generator().manual_seed(5)
    pairs = _params(generator)
    params = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t, _ in pairs]
    grads = [[torch.randn(p.shape, generator=generator).to(p.dtype) if has else None
              for p, (_, has) in zip(params, pairs)] for _ in range(steps)]
    cls = nvrm_ext.FusedVSGD if family == "sgd" else nvrm_ext.FusedVAdam
    opt = cls(_groups(family, params), variability=variability, num_iters=3, seed=SEED, backend=backend)
    torch_ref.TORCH.grouped = grouped
    try:
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = None if g is None else g.clone(memory_format=torch.preserve_format)
            opt.step()
    finally:
        torch_ref.TORCH.grouped = True
    states = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return [p.detach() for p in params] + states


def _assert_same_bits(ours, theirs):
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape, index
        width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        assert torch.equal(a.contiguous().view(width), b.contiguous().view(width)), index


@pytest.fixture
def small_thresholds(monkeypatch):
    """Rows of >= 64 elements are 'large'; chunks of <= 256 elements: a few rows per flat batch,
    several chunks per group, so that both kinds of units and the chunking run here."""
    monkeypatch.setattr(torch_update, "LARGE_ROW_ELEMENTS", 64)
    monkeypatch.setattr(torch_update, "CHUNK_ELEMENTS", 256)


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_grouped_update_matches_the_per_row_path_bit_for_bit(family, small_thresholds):
    _assert_same_bits(_run(family, "torch", grouped=True), _run(family, "torch", grouped=False))


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_grouped_update_with_default_thresholds_matches_the_per_row_path(family):
    _assert_same_bits(_run(family, "torch", grouped=True), _run(family, "torch", grouped=False))


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_grouped_update_matches_the_fused_cpu_backend(family, small_thresholds):
    """The 'cpu' backend's kernels, not the torch code under test, are the reference for the
    update arithmetic (without noise: the two backends' noises may differ in the last bit,
    tests/test_torch_noise.py). float64 rows run the torch backend on both sides."""
    _assert_same_bits(_run(family, "torch", grouped=True, variability=0.0),
                      _run(family, "cpu", grouped=True, variability=0.0))


def test_the_comparison_can_fail(small_thresholds, monkeypatch):
    """A grouped update that rounds one op differently (an alpha= form) is caught."""
    def fused_decay(g, p, weight_decay):
        return [torch.add(x, y, alpha=weight_decay) for x, y in zip(g, p)]
    monkeypatch.setattr(torch_update, "_weight_decayed", fused_decay)
    with pytest.raises(AssertionError):
        _assert_same_bits(_run("adam", "torch", grouped=True), _run("adam", "torch", grouped=False))


def test_grouped_unscale_matches_the_per_row_path(small_thresholds):
    """GradScaler's fused protocol (capturable): the grads are unscaled, rounded to their dtype
    and written back, then used; float32 next to bfloat16, flat batches and large rows."""
    def run(grouped):
        generator = torch.Generator().manual_seed(9)
        params = [torch.nn.Parameter(torch.randn(n, generator=generator).to(dtype))
                  for n, dtype in [(50, torch.float32), (100, torch.float32), (70, torch.bfloat16), (9, torch.bfloat16)]]
        opt = nvrm_ext.FusedVAdam(params, lr=1e-2, variability=0.05, num_iters=3, seed=SEED, backend="torch",
                                  capturable=True)
        torch_ref.TORCH.grouped = grouped
        try:
            for _ in range(3):
                for p in params:
                    p.grad = (torch.randn(p.shape, generator=generator) * 1000).to(p.dtype)
                opt.grad_scale, opt.found_inf = torch.tensor(1000.0), torch.tensor(0.0)
                opt.step()
        finally:
            torch_ref.TORCH.grouped = True
        return [p.detach() for p in params] + [p.grad for p in params]
    _assert_same_bits(run(True), run(False))
