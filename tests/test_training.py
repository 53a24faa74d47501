"""Training-loop integration: clean checkpoints, torch.compile, mixed precision, GradScaler."""
import copy

import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec
from nvrm_ext.original import OriginalVSGD


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _step(model, opt, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clean_state_dict_matches_denoised_and_leaves_live_weights(backend):
    model = _model()
    opt = nvrm_ext.FusedVAdam(model.parameters(), lr=1e-2, variability=0.05, seed=4, backend=backend)
    for step in range(3):
        _step(model, opt, step)
    live = copy.deepcopy(model.state_dict())
    clean = opt.clean_state_dict(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, live[name])  # untouched
    with opt.denoised():
        for name, tensor in model.state_dict().items():
            assert torch.equal(clean[name], tensor)
            assert clean[name].data_ptr() != tensor.data_ptr()
    # and it really differs from the perturbed weights
    assert not torch.equal(clean["0.weight"], live["0.weight"])


def test_saved_clean_weights_load_into_a_fresh_model():
    model = _model()
    opt = nvrm_ext.FusedVSGD(model.parameters(), lr=0.1, variability=0.05, seed=1, backend="torch")
    _step(model, opt, 0)
    fresh = _model(seed=5)
    fresh.load_state_dict(opt.clean_state_dict(model))
    with opt.denoised():
        for a, b in zip(model.parameters(), fresh.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,capturable", [("torch", False), ("cpu", False), ("cpu", True)])
def test_torch_compile_of_a_training_step_matches_eager(backend, capturable):
    """The optimizer step is opaque to the compiler: no graph-break storm, same numbers."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model()
        opt = nvrm_ext.FusedVSGD(model.parameters(), lr=0.1, momentum=0.9, seed=2, backend=backend,
                                 capturable=capturable)

        def train_step(x, y):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            fn(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    torch._dynamo.reset()
    model = _model()
    opt = nvrm_ext.FusedVSGD(model.parameters(), lr=0.1, seed=2, backend=backend, capturable=capturable)

    def train_step(x, y):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    explanation = torch._dynamo.explain(train_step)(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert explanation.graph_break_count <= 2, explanation.break_reasons


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_autocast_with_fp32_parameters_works_unchanged(backend):
    """bfloat16 autocast gives float32 gradients of float32 parameters: the steps are exactly the
    original algorithm's (fed the same gradients and the specified noise), clean and perturbed."""
    model = _model()
    opt = nvrm_ext.FusedVSGD(model.parameters(), lr=0.1, momentum=0.9, variability=0.05, num_iters=3,
                             seed=0, backend=backend)
    reference = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    original = OriginalVSGD(reference, lr=0.1, momentum=0.9, variability=0.05, num_iters=3,
                            noise_fn=lambda key, p, step: spec.noise("Gaussian", 0.05, 0, key, step,
                                                                     p.numel()).view(p.shape))
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        assert loss.dtype == torch.float32  # cross_entropy autocasts to float32
        loss.backward()
        for p, r in zip(model.parameters(), reference):
            assert p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
            r.grad = p.grad.clone()
        opt.step()
        original.step()
        for p, r in zip(model.parameters(), reference):
            assert p.dtype == torch.float32
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-6)
        with opt.denoised():
            for p, r in zip(model.parameters(), reference):
                torch.testing.assert_close(p.detach(), r.detach() - original.state[r]["noise1"],
                                           rtol=1e-6, atol=1e-6)


def test_grad_scaler_skips_inf_steps_without_touching_noise_bookkeeping():
    model = _model()
    opt = nvrm_ext.FusedVSGD(model.parameters(), lr=0.1, seed=0, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _step(model, opt, 0)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
    scaler.scale(loss).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert opt.state_dict()["state"][0]["step"] == state_before[0]["step"]
    assert scaler.get_scale() < 2.0**10
