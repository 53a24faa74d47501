"""16-bit parameters: the compensation buffer keeps the clean weights exact under the noise.

Without it, w + n - n rounds w away in an 8-bit (bf16) or 11-bit (fp16) mantissa at every step,
and the clean weights random-walk off (by ~0.4 absolute after 10,000 steps at variability 0.01).
"""
import pytest
import torch

import nvrm_ext


def _weights(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(257, generator=g).to(dtype), torch.randn(33, 7, generator=g).to(dtype)]


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two tensors of one 16-bit dtype."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    # map the sign-magnitude bit patterns to a monotonic integer line
    ia = torch.where(ia < 0, -32768 - ia, ia)
    ib = torch.where(ib < 0, -32768 - ib, ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("backend,steps", [("cpu", 10_000), ("torch", 1_000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_noise_on_and_off_for_thousands_of_steps_leaves_clean_weights_in_place(dtype, backend, steps):
    start = _weights(dtype)
    params = [torch.nn.Parameter(w.clone()) for w in start]
    for p in params:  # not all zero: that first step at lr 0 would only create the state (DCP's init)
        p.grad = torch.ones_like(p)
    opt = nvrm_ext.FusedVSGD(params, lr=0.0, variability=0.01, num_iters=10**9, seed=1, backend=backend)
    for _ in range(steps):
        opt.step()
    assert opt.state[params[0]]["noise_step"] == steps  # the noise really is on
    with opt.denoised():
        for p, w in zip(params, start):
            assert _ulps_apart(p.detach(), w) <= 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bf16_tracks_fp32_at_least_as_closely_as_plain_bf16_adam(backend):
    """Same gradients for all four runs, so only the optimizers' arithmetic differs."""

    def run(dtype, make_optimizer, steps=200):
        params = [torch.nn.Parameter(w.to(dtype)) for w in _weights(torch.float32)]
        opt = make_optimizer(params)
        g = torch.Generator().manual_seed(5)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        if isinstance(opt, nvrm_ext.FusedVAdam):
            return [t.float() for t in opt.clean_state_dict(torch.nn.ParameterList(params)).values()]
        return [p.detach().float() for p in params]

    def distance(a, b):
        return sum(((x - y) ** 2).sum() for x, y in zip(a, b)).sqrt().item()

    def fused(params):
        return nvrm_ext.FusedVAdam(params, lr=1e-3, variability=0.01, seed=3, backend=backend)

    def plain(params):
        return torch.optim.Adam(params, lr=1e-3)

    ours = distance(run(torch.bfloat16, fused), run(torch.float32, fused))
    theirs = distance(run(torch.bfloat16, plain), run(torch.float32, plain))
    assert ours <= theirs, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compensation_is_bit_identical_across_backends(dtype):
    runs = []
    for backend in ("torch", "triton", "cpu"):
        params = [torch.nn.Parameter(w.clone()) for w in _weights(dtype)]
        opt = nvrm_ext.FusedVAdam(params, lr=1e-2, variability=0.02, num_iters=3, noise_type="Uniform",
                                  seed=2, backend=backend)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        runs.append([p.detach().clone() for p in params] + [opt.state[p]["compensation"].clone() for p in params])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_clean_state_dict_of_16_bit_parameters_leaves_compensation_untouched():
    params = [torch.nn.Parameter(w.clone()) for w in _weights(torch.bfloat16)]
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, variability=0.05, seed=0, backend="cpu")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    compensation = [opt.state[p]["compensation"].clone() for p in params]
    clean = opt.clean_state_dict(torch.nn.ParameterList(params))
    for p, c in zip(params, compensation):
        assert torch.equal(opt.state[p]["compensation"], c)
    with opt.denoised():
        for p, value in zip(params, clean.values()):
            assert torch.equal(p.detach(), value)
