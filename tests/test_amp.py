"""FusedAMP against a plain per-tensor reference of the published AMP algorithm.

The reference below is written from the published method (hiyouga/AMP-Regularizer, amp.py):
per tensor, delta <- delta + inner_lr * grad, clipped with a Python `if` to L2 norm <= epsilon,
the weights moved by (new delta - old delta), the closure re-evaluated, delta subtracted again
at the end and the base optimizer stepped.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvrm_ext import FusedVSGD
from nvrm_ext.optim.amp import FusedAMP

TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tensors here are tiny: intra-op threads only add waiting, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ReferenceAMP:
    """The published algorithm, one tensor at a time (test oracle, deliberately naive)."""

    def __init__(self, groups, inner_iter, base_optimizer):
        self.groups = groups  # [{'params': [...], 'epsilon': e, 'inner_lr': l}]
        self.inner_iter = inner_iter
        self.base = base_optimizer

    @torch.no_grad()
    def step(self, closure):
        def evaluate():
            for group in self.groups:
                for p in group["params"]:
                    p.grad = None
            with torch.enable_grad():
                return closure()

        outputs, loss = evaluate()
        deltas = {}
        for iteration in range(self.inner_iter):
            for group in self.groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    old = deltas[p] if iteration > 0 else torch.zeros_like(p)
                    new = old + group["inner_lr"] * p.grad
                    coef = group["epsilon"] / (new.norm() + 1e-12)
                    if coef < 1:
                        new = coef * new
                    p.sub_(old).add_(new)
                    deltas[p] = new
            evaluate()
        for p, delta in deltas.items():
            p.sub_(delta)
        self.base.step()
        return outputs.detach(), loss.detach()


def make_problem(seed=0, hidden=16):
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    inputs = torch.randn(20, 6, generator=generator)
    targets = torch.randint(0, 3, (20,), generator=generator)
    return model, inputs, targets


def make_closure(model, optimizer, inputs, targets):
    def closure():
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        loss.backward()
        return outputs, loss
    return closure


BASES = {
    "sgd_momentum": (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-4, nesterov=True)),
    "adam": (torch.optim.Adam, dict(betas=(0.9, 0.99), weight_decay=1e-3)),
}


@pytest.mark.parametrize("inner_iter", [1, 2])
@pytest.mark.parametrize("epsilon", [0.05, 100.0], ids=["clip_binds", "clip_idle"])
@pytest.mark.parametrize("base_name", list(BASES))
def test_matches_published_algorithm(base_name, epsilon, inner_iter):
    base_class, kwargs = BASES[base_name]
    lr = 0.1 if base_name == "sgd_momentum" else 0.01
    model, inputs, targets = make_problem()
    twin = copy.deepcopy(model)

    optimizer = FusedAMP(model.parameters(), lr=lr, epsilon=epsilon, inner_lr=0.5, inner_iter=inner_iter,
                         base_optimizer=base_class, backend="torch", **kwargs)
    reference_base = base_class(twin.parameters(), lr=lr, **kwargs)
    reference = ReferenceAMP([{"params": list(twin.parameters()), "epsilon": epsilon, "inner_lr": 0.5}],
                             inner_iter, reference_base)
    closure = make_closure(model, optimizer, inputs, targets)
    twin_closure = make_closure(twin, reference_base, inputs, targets)

    # the clip must bind (or not) as the case says, on the first step at least
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    binds = any(0.5 * g.norm() > epsilon for g in grads)
    assert binds == (epsilon < 1)

    for _ in range(6):
        with torch.no_grad():
            expected_outputs = model(inputs)
        outputs, loss = optimizer.step(closure)
        ref_outputs, ref_loss = reference.step(twin_closure)
        # (outputs, loss) are those of the first evaluation, at the unperturbed weights
        assert torch.equal(outputs, expected_outputs)
        assert torch.equal(loss, torch.nn.functional.cross_entropy(expected_outputs, targets))
        assert not outputs.requires_grad and not loss.requires_grad
        torch.testing.assert_close(outputs, ref_outputs, **TOLERANCE)
        torch.testing.assert_close(loss, ref_loss, **TOLERANCE)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCE)


def test_per_group_hyperparameters_match_reference():
    model, inputs, targets = make_problem(seed=1)
    twin = copy.deepcopy(model)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = FusedAMP([{"params": first, "epsilon": 0.02, "inner_lr": 2.0},
                          {"params": second, "lr": 0.05}],
                         lr=0.1, epsilon=0.3, inner_lr=1.0, inner_iter=2, momentum=0.9, backend="torch")
    reference_base = torch.optim.SGD([{"params": list(twin[0].parameters())},
                                      {"params": list(twin[2].parameters()), "lr": 0.05}], lr=0.1, momentum=0.9)
    reference = ReferenceAMP([{"params": list(twin[0].parameters()), "epsilon": 0.02, "inner_lr": 2.0},
                              {"params": list(twin[2].parameters()), "epsilon": 0.3, "inner_lr": 1.0}],
                             2, reference_base)
    for _ in range(4):
        optimizer.step(make_closure(model, optimizer, inputs, targets))
        reference.step(make_closure(twin, reference_base, inputs, targets))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_path_equals_torch_path(dtype):
    """Same bits (the kernel follows the torch path's operation order, without fp contraction)."""
    pytest.importorskip("triton")
    results = []
    for backend in ("torch", "triton"):
        model, inputs, targets = make_problem(seed=2, hidden=40)
        model, inputs = model.to(dtype), inputs.to(dtype)
        optimizer = FusedAMP([{"params": list(model[0].parameters()), "epsilon": 0.05},
                              {"params": list(model[2].parameters()), "inner_lr": 0.3}],
                             lr=0.1, epsilon=0.5, inner_iter=2, momentum=0.9, backend=backend)
        for _ in range(3):
            optimizer.step(make_closure(model, optimizer, inputs, targets))
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        assert torch.equal(p, q)


@pytest.mark.parametrize("first", [True, False], ids=["first_iteration", "later_iteration"])
def test_triton_kernel_bfloat16_within_one_rounding(first):
    """bfloat16: Triton's interpreter converts float32 -> bfloat16 by truncation, not
    round-to-nearest as torch and compiled Triton do, so CPU testing allows one bf16 ulp."""
    pytest.importorskip("triton")
    from nvrm_ext.ops.amp_triton import TRITON_AMP
    from nvrm_ext.optim.amp import TORCH_AMP

    generator = torch.Generator().manual_seed(5)
    params = [torch.randn(shape, generator=generator).bfloat16() for shape in ((37,), (5, 3))]
    grads = [torch.randn(p.shape, generator=generator).bfloat16() for p in params]
    results = []
    for engine in (TORCH_AMP, TRITON_AMP):
        moved = [p.clone() for p in params]
        saved = [p.clone() + 1 for p in params]
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        engine.clip_and_perturb(moved, saved, grads, norms, [0.05, 10.0], [0.5, 1.0], first=first, tiny=1e-12)
        results.append((moved, saved))
    for p, q in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(p, q, rtol=2**-7, atol=2**-7)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=4),
       epsilon=st.floats(0.0, 10.0), inner_lr=st.floats(0.0, 10.0), seed=st.integers(0, 2**16))
def test_perturbation_is_the_clipped_ascent_step(sizes, epsilon, inner_lr, seed):
    """delta = inner_lr * grad scaled into the epsilon ball, per tensor; theta saved exactly."""
    from nvrm_ext.optim.amp import TORCH_AMP

    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=generator) for n in sizes]
    grads = [torch.randn(n, generator=generator) for n in sizes]
    theta = [p.clone() for p in params]
    saved = [torch.empty_like(p) for p in params]
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    TORCH_AMP.clip_and_perturb(params, saved, grads, norms, [epsilon] * len(sizes), [inner_lr] * len(sizes),
                               first=True, tiny=1e-12)
    for p, t, s, g in zip(params, theta, saved, grads):
        assert torch.equal(s, t)
        step = inner_lr * g.double()
        expected = step * min(1.0, epsilon / (step.norm().item() + 1e-12))
        torch.testing.assert_close((p.double() - t.double()), expected, rtol=1e-5, atol=1e-6)
        assert (p.double() - t.double()).norm() <= epsilon * (1 + 1e-5) + 1e-6


def test_restore_is_bit_exact():
    """theta comes back with the same bits even where theta + delta - delta would not
    (tiny weights, large perturbation): with lr = 0 the step must leave the weights as they were."""
    weight = torch.nn.Parameter(torch.tensor([2.0**-30, 1.0 + 2.0**-23, -3e-8, 0.25]))
    naive = (weight.detach() + 0.75) - 0.75
    assert not torch.equal(naive, weight.detach())  # the trap this test is about
    before = weight.detach().clone()
    optimizer = FusedAMP([weight], lr=0.0, epsilon=1.5, inner_lr=1.0, inner_iter=2, backend="torch")

    def closure():
        loss = (weight * torch.tensor([1.0, -1.0, 1.0, 1.0])).sum()
        loss.backward()
        return None, loss

    optimizer.step(closure)
    assert torch.equal(weight.detach(), before)


def test_step_never_reads_device_values_on_the_host(monkeypatch):
    """No .item() / bool() / float() on tensors during the AMP part of a step (each would be a
    host sync on a GPU), and nothing from torch.cuda is needed."""
    model, inputs, targets = make_problem()
    optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.05, inner_iter=2, momentum=0.9,
                         backend="torch")
    closure = make_closure(model, optimizer, inputs, targets)
    optimizer.step(closure)  # the base optimizer creates its state outside the watched step

    def forbidden(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"{name} called during FusedAMP.step")
        return raise_

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden("torch.cuda.synchronize"))
    monkeypatch.setattr(torch.cuda, "is_available", forbidden("torch.cuda.is_available"))
    optimizer.step(closure)
    monkeypatch.undo()


def test_lr_scheduler_and_shared_param_groups():
    model, inputs, targets = make_problem()
    optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step(make_closure(model, optimizer, inputs, targets))
    scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    extra = torch.nn.Parameter(torch.zeros(3))
    optimizer.add_param_group({"params": [extra], "epsilon": 0.1})
    assert optimizer.base_optimizer.param_groups[-1]["epsilon"] == 0.1
    assert optimizer.base_optimizer.param_groups[-1]["inner_lr"] == 1.0
    with pytest.raises(ValueError, match="Invalid epsilon"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "epsilon": -1.0})
    assert len(optimizer.param_groups) == 2


def test_state_dict_round_trip_resumes_identically():
    model, inputs, targets = make_problem()
    optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9)
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, inputs, targets))
    clone = copy.deepcopy(model)
    resumed = FusedAMP(clone.parameters(), lr=0.3, epsilon=0.5, momentum=0.9)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as if read from a file
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.param_groups[0]["epsilon"] == 0.05 and resumed.param_groups[0]["lr"] == 0.1
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, inputs, targets))
        resumed.step(make_closure(clone, resumed, inputs, targets))
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_parameter_without_gradient_is_untouched():
    model, inputs, targets = make_problem()
    unused = torch.nn.Parameter(torch.ones(5))
    optimizer = FusedAMP([*model.parameters(), unused], lr=0.1, epsilon=0.5, momentum=0.9)
    optimizer.step(make_closure(model, optimizer, inputs, targets))
    assert torch.equal(unused.detach(), torch.ones(5))
    assert "unperturbed" not in optimizer.state[unused]


def _vsgd_kwargs():
    return dict(variability=0.01, momentum=0.9, seed=1234, num_iters=100)


def test_with_fused_vsgd_base_tracks_plain_fused_vsgd():
    """AMP + neural variability: epsilon = 0 is exactly FusedVSGD (the noisy weights come back
    bit for bit); a tiny epsilon stays close to it."""
    def run(epsilon):
        model, inputs, targets = make_problem(seed=3)
        if epsilon is None:
            optimizer = FusedVSGD(model.parameters(), lr=0.1, **_vsgd_kwargs())
            closure = make_closure(model, optimizer, inputs, targets)
            for _ in range(4):
                optimizer.step(lambda: closure()[1])
        else:
            optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=epsilon, base_optimizer=FusedVSGD,
                                 **_vsgd_kwargs())
            closure = make_closure(model, optimizer, inputs, targets)
            for _ in range(4):
                optimizer.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    plain = run(None)
    for p, q in zip(plain, run(0.0)):
        assert torch.equal(p, q)
    for p, q in zip(plain, run(1e-6)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(plain, run(0.5)))


def test_base_optimizer_factory_is_accepted():
    model, inputs, targets = make_problem()
    optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.5,
                         base_optimizer=functools.partial(FusedVSGD, backend="torch", seed=7))
    optimizer.step(make_closure(model, optimizer, inputs, targets))
    assert optimizer.base_optimizer._backend_name == "torch"


@pytest.mark.parametrize("kwargs, message", [
    (dict(epsilon=-0.1), "Invalid epsilon"),
    (dict(epsilon=float("nan")), "Invalid epsilon"),
    (dict(inner_lr=-1.0), "Invalid inner_lr"),
    (dict(inner_iter=0), "Invalid inner_iter"),
    (dict(inner_iter=1.5), "Invalid inner_iter"),
    (dict(lr=-0.1), "Invalid learning rate"),
    (dict(backend="cuda"), "Invalid backend"),
])
def test_invalid_hyperparameters_rejected(kwargs, message):
    model, _, _ = make_problem()
    before = [p.detach().clone() for p in model.parameters()]
    arguments = dict(lr=0.1, epsilon=0.5) | kwargs
    with pytest.raises(ValueError, match=message):
        FusedAMP(model.parameters(), **arguments)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_triton_backend_refuses_what_it_cannot_run():
    pytest.importorskip("triton")
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="backend='triton' cannot run torch.float64"):
        FusedAMP([weight], lr=0.1, epsilon=0.5, backend="triton")


def test_pickling_keeps_groups_shared():
    model, inputs, targets = make_problem()
    optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.5, inner_iter=2, momentum=0.9)
    optimizer.step(make_closure(model, optimizer, inputs, targets))
    clone = copy.deepcopy(optimizer)
    assert clone.param_groups is clone.base_optimizer.param_groups
    assert clone.inner_iter == 2


def test_missing_closure_rejected_before_anything_changes():
    model, inputs, targets = make_problem()
    optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="requires a closure"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert len(optimizer.base_optimizer.state) == 0


def test_closure_returning_something_else_rejected_before_anything_changes():
    model, inputs, targets = make_problem()
    optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]

    def triple_closure():
        outputs = model(inputs)
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        loss.backward()
        return outputs, loss, targets

    with pytest.raises(TypeError, match=r"must return \(outputs, loss\).*or a bare loss.*tuple of length 3"):
        optimizer.step(triple_closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert len(optimizer.base_optimizer.state) == 0


def test_closure_returning_bare_loss_takes_the_same_steps():
    """torch.optim's (and Lightning's) closure convention: a bare loss; step returns it."""
    trajectories, returned = [], []
    for bare in (False, True):
        model, inputs, targets = make_problem()
        optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)

        def closure():
            outputs = model(inputs)
            loss = torch.nn.functional.cross_entropy(outputs, targets)
            loss.backward()
            return loss if bare else (outputs, loss)

        results = [optimizer.step(closure) for _ in range(3)]
        returned.append([r if bare else r[1] for r in results])
        trajectories.append([p.detach().clone() for p in model.parameters()])
        if bare:
            assert all(isinstance(r, torch.Tensor) and not r.requires_grad for r in results)
    assert all(torch.equal(p, q) for p, q in zip(*trajectories))
    assert all(torch.equal(a, b) for a, b in zip(*returned))


def test_perturbed_backward_then_step_is_one_step():
    """The protocol for frameworks that call step() themselves: gradients first, one base step."""
    trajectories = []
    for split in (False, True):
        model, inputs, targets = make_problem()
        optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)
        closure = make_closure(model, optimizer, inputs, targets)
        for _ in range(3):
            if split:
                optimizer.perturbed_backward(closure)
                optimizer.step()
                with pytest.raises(ValueError, match="requires a closure"):
                    optimizer.step()  # the gradients are applied once
            else:
                optimizer.step(closure)
        trajectories.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*trajectories))


def test_failing_closure_restores_weights():
    model, inputs, targets = make_problem()
    optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory at the perturbed point")
        return make_closure(model, optimizer, inputs, targets)()

    with pytest.raises(RuntimeError, match="perturbed point"):
        optimizer.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
