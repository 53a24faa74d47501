"""The public optimizer API: validation, torch.optim behaviour, state_dict, launches, backends."""
import copy

import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec
from nvrm_ext.backends import fused_backend

OPTIMIZERS = [
    (nvrm_ext.FusedVSGD, dict(lr=0.1, momentum=0.9)),
    (nvrm_ext.FusedVAdam, dict(lr=1e-2, amsgrad=True)),
]


def _params(shapes=((5, 3), (7,), (2, 2, 2)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _first_sgd_step(p, grad, *, lr, key, seed, noise_type="Gaussian", variability=0.01):
    """Independent reference of a parameter's first SGD step (a fresh momentum buffer is the
    gradient itself): p - lr * g plus the specified noise of (seed, key, step 1)."""
    noise = spec.noise(noise_type, variability, seed, key, 1, p.numel(), device=p.device)
    return p.detach() - lr * grad + noise.view(p.shape).to(p.dtype)


# ---------------------------------------------------------------------- validation
BAD_SGD = [
    (dict(lr=-0.1), "Invalid learning rate"),
    (dict(lr=0.1, variability=float("inf")), "Invalid variability"),
    (dict(lr=0.1, variability=-1.0), "Invalid variability"),
    (dict(lr=0.1, variability=float("nan")), "Invalid variability"),
    (dict(lr=0.1, num_iters=0), "Invalid num_iters"),
    (dict(lr=0.1, num_iters=2.5), "Invalid num_iters"),
    (dict(lr=0.1, noise_type="Cauchy"), "Invalid noise_type"),
    (dict(lr=0.1, momentum=-0.5), "Invalid momentum"),
    (dict(lr=0.1, weight_decay=-1e-4), "Invalid weight_decay"),
    (dict(lr=0.1, nesterov=True), "Nesterov momentum requires"),
    (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov momentum requires"),
    (dict(lr=0.1, backend="opencl"), "Invalid backend"),
    (dict(lr=0.1, seed=-1), "Invalid seed"),
    (dict(lr=0.1, seed=2**64), "Invalid seed"),
]
BAD_ADAM = [
    (dict(lr=-1e-3), "Invalid learning rate"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
    (dict(eps=-1e-8), "Invalid epsilon value"),
    (dict(variability=-0.5), "Invalid variability"),
    (dict(noise_type="gaussian"), "Invalid noise_type"),
    (dict(num_iters=0), "Invalid num_iters"),
]


@pytest.mark.parametrize("kwargs,message", BAD_SGD)
def test_vsgd_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nvrm_ext.FusedVSGD(_params(), **kwargs)


@pytest.mark.parametrize("kwargs,message", BAD_ADAM)
def test_vadam_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nvrm_ext.FusedVAdam(_params(), **kwargs)


def test_lr_is_required_somewhere():
    with pytest.raises(ValueError, match="required optimization parameter lr"):
        nvrm_ext.FusedVSGD(_params())
    opt = nvrm_ext.FusedVSGD([{"params": _params(), "lr": 0.1}])
    assert opt.param_groups[0]["lr"] == 0.1


def test_num_iters_float_like_the_original_default():
    opt = nvrm_ext.FusedVSGD(_params(), lr=0.1, num_iters=1e3)
    assert opt.param_groups[0]["num_iters"] == 1000
    assert isinstance(opt.param_groups[0]["num_iters"], int)


def test_bad_param_group_is_rejected_and_nothing_is_added():
    params = _params()
    opt = nvrm_ext.FusedVSGD(params[:1], lr=0.1)
    with pytest.raises(ValueError, match="Invalid variability"):
        opt.add_param_group({"params": params[1:], "variability": -1})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_complex_and_integer_parameters_are_rejected(dtype):
    with pytest.raises(ValueError, match="real floating-point parameters only"):
        nvrm_ext.FusedVSGD([torch.zeros(3, dtype=dtype)], lr=0.1)


def test_overlapping_parameter_is_rejected():
    overlapping = torch.zeros(8).as_strided((4, 4), (1, 1))
    with pytest.raises(ValueError, match="overlaps itself or has gaps"):
        nvrm_ext.FusedVSGD([overlapping], lr=0.1)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_sparse_gradient_is_rejected_before_anything_changes(cls, kwargs):
    params = _params()
    opt = cls(params, **kwargs, backend="torch")
    _set_grads(params, 1)
    opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict())
    _set_grads(params, 2)
    params[-1].grad = params[-1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    after_state = opt.state_dict()
    assert after_state["nvrm"] == before_state["nvrm"]
    for index, s in before_state["state"].items():
        for name, value in s.items():
            other = after_state["state"][index][name]
            assert torch.equal(other, value) if torch.is_tensor(value) else other == value


# ---------------------------------------------------------------------- torch.optim behaviour
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_parameters_without_grad_are_untouched_and_keep_their_key(backend):
    """A grad-None parameter is skipped, and the ones after it keep their position in the flat
    parameter list as noise key (keys are not counted over the parameters that step)."""
    params = _params(shapes=((5, 3), (7,), (2, 2, 2), (9,)))
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, seed=11, backend=backend)
    _set_grads(params, 0)
    params[1].grad = None
    before = [p.detach().clone() for p in params]
    opt.step()
    assert torch.equal(params[1].detach(), before[1])
    assert params[1] not in opt.state
    for key in (0, 2, 3):
        expected = _first_sgd_step(before[key], params[key].grad, lr=0.1, key=key, seed=11)
        torch.testing.assert_close(params[key].detach(), expected, rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"parameter {key}: {m}")
    with opt.denoised():
        for key in (0, 2, 3):
            torch.testing.assert_close(params[key].detach(), before[key] - 0.1 * params[key].grad,
                                       rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_closure_loss_is_returned(cls, kwargs):
    params = _params()
    opt = cls(params, **kwargs, backend="torch")

    def closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    expected = sum(float((p.detach().double() ** 2).sum()) for p in params)
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() == pytest.approx(expected, rel=1e-6)
    # the second closure runs at the perturbed weights the first step left, before the update
    expected = sum(float((p.detach().double() ** 2).sum()) for p in params)
    before = [p.detach().clone() for p in params]
    assert opt.step(closure).item() == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(p.grad, 2 * b) for p, b in zip(params, before))  # its gradients were used


def test_lr_scheduler_drives_the_update():
    """With variability tiny and lr scheduled to 0, the clean weights stop moving."""
    params = _params()
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, backend="torch")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    _set_grads(params, 0)
    opt.step()
    scheduler.step()
    with opt.denoised():
        clean = [p.detach().clone() for p in params]
    opt.step()
    with opt.denoised():
        for p, c in zip(params, clean):
            torch.testing.assert_close(p.detach(), c, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_hyperparameters_may_differ_per_group(backend):
    """Each group's lr, noise type and variability reach exactly its own parameters."""
    params = _params()
    groups = [dict(lr=0.3, variability=0.5, noise_type="Uniform"), dict(lr=0.02, noise_type="Laplace"),
              dict()]  # the defaults: lr 0.1, Gaussian, variability 1e-3
    opt = nvrm_ext.FusedVSGD([{"params": [p], **g} for p, g in zip(params, groups)], lr=0.1,
                             variability=1e-3, backend=backend, seed=0)
    _set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    opt.step()
    for key, (p, b, g) in enumerate(zip(params, before, groups)):
        expected = _first_sgd_step(b, p.grad, lr=g.get("lr", 0.1), key=key, seed=0,
                                   noise_type=g.get("noise_type", "Gaussian"), variability=g.get("variability", 1e-3))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"group {key}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_denoised_restores_clean_weights_and_puts_the_same_noise_back(backend):
    params = _params()
    opt = nvrm_ext.FusedVSGD(params, lr=0.0, variability=0.1, backend=backend, seed=8)
    before = [p.detach().clone() for p in params]
    _set_grads(params, 0)
    opt.step()
    noisy = [p.detach().clone() for p in params]
    with opt.denoised():
        for p, b in zip(params, before):  # exact up to the rounding of w + n and of (w + n) - n
            torch.testing.assert_close(p.detach(), b, rtol=3e-7, atol=1e-8)
        with pytest.raises(RuntimeError, match="do not nest"):
            with opt.denoised():
                pass
        with pytest.raises(RuntimeError, match="inside denoised"):
            opt.step()
    for p, n in zip(params, noisy):
        torch.testing.assert_close(p.detach(), n, rtol=3e-7, atol=1e-8)


# ---------------------------------------------------------------------- state
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_state_dict_round_trip_resumes_identically(cls, kwargs, backend):
    kwargs = dict(kwargs, num_iters=4)
    params_a = _params()
    opt_a = cls(params_a, **kwargs, seed=11, backend=backend)
    for step in range(3):
        _set_grads(params_a, step)
        opt_a.step()
    saved_opt = copy.deepcopy(opt_a.state_dict())
    saved_params = [p.detach().clone() for p in params_a]
    for step in range(3, 7):
        _set_grads(params_a, step)
        opt_a.step()

    params_b = [torch.nn.Parameter(p) for p in saved_params]
    opt_b = cls(params_b, **kwargs, seed=999, backend=backend)
    opt_b.load_state_dict(saved_opt)
    assert opt_b.seed == 11
    for step in range(3, 7):
        _set_grads(params_b, step)
        opt_b.step()
    for a, b in zip(params_a, params_b):
        assert torch.equal(a.detach(), b.detach())


def test_load_state_dict_of_a_plain_optimizer_is_refused():
    params = _params()
    sgd = torch.optim.SGD(params, lr=0.1)
    opt = nvrm_ext.FusedVSGD(params, lr=0.1)
    with pytest.raises(ValueError, match="not saved by an nvrm_ext optimizer"):
        opt.load_state_dict(sgd.state_dict())


@pytest.mark.parametrize("cls,kwargs,tensors_per_param", [
    (nvrm_ext.FusedVSGD, dict(lr=0.1), 0),
    (nvrm_ext.FusedVSGD, dict(lr=0.1, momentum=0.9), 1),
    (nvrm_ext.FusedVAdam, dict(lr=1e-3), 2),
    (nvrm_ext.FusedVAdam, dict(lr=1e-3, amsgrad=True), 3),
])
def test_no_noise_state(cls, kwargs, tensors_per_param):
    """Per-element state is exactly the base optimizer's: zero bytes for noise."""
    params = _params()
    opt = cls(params, **kwargs, backend="torch")
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    numel = sum(p.numel() for p in params)
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values()
                      for v in s.values() if torch.is_tensor(v))
    assert state_bytes == tensors_per_param * 4 * numel


# ---------------------------------------------------------------------- launches and backends
class _LaunchCounter:
    """Records every backend.launch call, and every call of a launch prepared with
    backend.prepare (host-mode CPU steps); with execute=False the kernel is not run (the
    interpreter needs ~0.1 s per program, too slow for 300-tensor launches)."""

    def __init__(self, backend, monkeypatch, execute=True):
        self.calls = []
        original = backend.launch

        def counted(op, dtype, ints, floats, blocks, seed, **options):
            self.calls.append((op, dtype, ints.clone(), blocks.clone()))
            if execute:
                return original(op, dtype, ints, floats, blocks, seed, **options)

        monkeypatch.setattr(backend, "launch", counted)
        if hasattr(backend, "prepare"):
            original_prepare = backend.prepare

            def prepare(op, dtype, ints, floats, blocks, seed, **options):
                prepared = original_prepare(op, dtype, ints, floats, blocks, seed, **options)

                def run():
                    self.calls.append((op, dtype, ints.clone(), blocks.clone()))  # the tables as launched
                    if execute:
                        prepared()
                return run

            monkeypatch.setattr(backend, "prepare", prepare)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_one_triton_kernel_launch_per_step(cls, kwargs, monkeypatch):
    """Counted at the Triton kernel itself: one grid launch per step, one per denoised() edge."""
    from nvrm_ext.backends import triton as triton_backend

    kernel = triton_backend._nvrm_kernel
    grids = []

    class CountingKernel:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_backend, "_nvrm_kernel", CountingKernel())
    params = [torch.nn.Parameter(torch.randn(3 + 50 * i)) for i in range(12)]
    opt = cls([{"params": params[i::5]} for i in range(5)], **kwargs, backend="triton")
    for step in range(2):
        _set_grads(params, step)
        opt.step()
    assert len(grids) == 2
    with opt.denoised():
        assert len(grids) == 3
    assert len(grids) == 3  # the noisy weights come back as held copies: no launch


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("count,groups", [(3, 1), (300, 5)])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_one_launch_per_step_covers_every_parameter(cls, kwargs, count, groups, backend, monkeypatch):
    counter = _LaunchCounter(fused_backend(backend), monkeypatch, execute=backend != "triton")
    params = [torch.nn.Parameter(torch.randn(3 + i % 7)) for i in range(count)]
    opt = cls([{"params": params[i::groups]} for i in range(groups)], **kwargs, backend=backend)
    for step in range(2):
        _set_grads(params, step)
        opt.step()
    assert len(counter.calls) == 2
    _, _, ints, blocks = counter.calls[-1]
    assert sorted(ints[:, 0].tolist()) == sorted(p.data_ptr() for p in params)
    assert sorted(ints[:, 6].tolist()) == list(range(count))  # parameter keys
    assert sorted(blocks[:, 0].tolist()) == list(range(count))  # each tiny tensor: one block


def test_one_launch_per_dtype_bucket(monkeypatch):
    counter = _LaunchCounter(fused_backend("triton"), monkeypatch)
    params = _params() + [torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))]
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, backend="triton")
    _set_grads(params[:-1], 0)
    params[-1].grad = torch.randn(5, dtype=torch.bfloat16)
    opt.step()
    assert sorted(str(call[1]) for call in counter.calls) == ["torch.bfloat16", "torch.float32"]


@pytest.mark.parametrize("fused", ["triton", "cpu"])
@pytest.mark.parametrize("noise_type", ["Uniform", "Gaussian", "Laplace"])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_fused_backends_agree_with_torch_backend(cls, kwargs, noise_type, fused):
    """Uniform noise: bit for bit. Gaussian/Laplace: within the documented noise tolerance."""
    runs = []
    for backend in ("torch", fused):
        params = _params(shapes=((33, 7), (4099,), (1,)))
        opt = cls(params, **kwargs, num_iters=3, noise_type=noise_type, variability=0.05, seed=5,
                  backend=backend)
        for step in range(5):
            _set_grads(params, step)
            opt.step()
        runs.append([p.detach() for p in params])
    for a, b in zip(*runs):
        if noise_type == "Uniform":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_channels_last_parameters_number_elements_in_memory_order():
    """Dense non-contiguous parameters work in every backend and agree with each other."""
    runs = []
    for backend in ("torch", "triton", "cpu"):
        weight = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
        p = torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
        opt = nvrm_ext.FusedVSGD([p], lr=0.1, momentum=0.9, noise_type="Uniform", seed=3, backend=backend)
        for step in range(3):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))  # contiguous
            opt.step()
        runs.append(p.detach())
    assert all(r.is_contiguous(memory_format=torch.channels_last) for r in runs)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_float64_parameters_step_in_float64_with_the_float32_noise(backend):
    """float64 steps in float64 arithmetic, in the fused CPU kernel too ('auto' picks it): the
    spec's float32 noise added to the float64 update with the table's float32 lr (a float32
    round trip of p would lose ~1e-8); the state stays float64."""
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.float64) + 1.0)
    before = p.detach().clone()
    opt = nvrm_ext.FusedVSGD([p], lr=0.1, momentum=0.9, seed=4, backend=backend)
    if backend == "auto":
        assert opt._resolve_backend(p.device, p.dtype).name == "cpu"
    p.grad = torch.full_like(p, 1.0 / 3.0)
    opt.step()
    assert p.dtype == torch.float64 and opt.state[p]["momentum_buffer"].dtype == torch.float64
    noise = spec.noise("Gaussian", 0.01, 4, 0, 1, 10).double()
    lr = torch.tensor(0.1, dtype=torch.float32).item()  # hyperparameters travel as float32
    # fused z: a few float32 ulp (~1e-7) from the reference's (docs/noise.md §8), times 0.01; a float32
    # round trip of p would be off by ~6e-8
    torch.testing.assert_close(p.detach(), (before - lr * (1.0 / 3.0)) + noise, rtol=0, atol=1e-8)


def test_explicit_cuda_backend_without_gpu_says_why():
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        nvrm_ext.FusedVSGD(_params(), lr=0.1, backend="cuda")


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_deepcopy_keeps_seed_and_trajectory(cls, kwargs):
    params = _params()
    opt = cls(params, **kwargs, seed=77, backend="torch")
    _set_grads(params, 0)
    opt.step()
    twin = copy.deepcopy({"params": params, "opt": opt})
    assert twin["opt"].seed == 77
    _set_grads(params, 1)
    _set_grads(twin["params"], 1)
    opt.step()
    twin["opt"].step()
    for a, b in zip(params, twin["params"]):
        assert torch.equal(a.detach(), b.detach())


def test_load_state_dict_of_the_other_nvrm_optimizer_is_refused():
    params = _params()
    adam = nvrm_ext.FusedVAdam(params, lr=1e-3)
    _set_grads(params, 0)
    adam.step()
    sgd = nvrm_ext.FusedVSGD(params, lr=0.1)
    with pytest.raises(ValueError, match="saved by FusedVAdam"):
        sgd.load_state_dict(adam.state_dict())


def test_load_state_dict_with_another_parameter_layout_is_refused():
    opt = nvrm_ext.FusedVSGD(_params(), lr=0.1)
    other = nvrm_ext.FusedVSGD(_params(shapes=((3,),)), lr=0.1)
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("source,target", [("torch", "cpu"), ("cpu", "triton"), ("triton", "torch")])
def test_checkpoint_resumes_on_another_backend(source, target):
    """Across backends the regenerated old noise differs by at most a few ulp (docs/noise.md §8),
    so the resumed trajectory stays within that of the original one."""

    def run(backend_after):
        params = _params()
        opt = nvrm_ext.FusedVAdam(params, lr=1e-2, variability=0.05, seed=12, backend=source)
        for step in range(3):
            _set_grads(params, step)
            opt.step()
        saved = copy.deepcopy(opt.state_dict())
        resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        resumed = nvrm_ext.FusedVAdam(resumed_params, lr=1e-2, variability=0.05, backend=backend_after)
        resumed.load_state_dict(saved)
        for step in range(3, 6):
            _set_grads(resumed_params, step)
            resumed.step()
        with resumed.denoised():
            return [p.detach().clone() for p in resumed_params]

    for a, b in zip(run(source), run(target)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_parameter_storage_replaced_between_steps_is_followed(backend):
    """`p.data = new_tensor` gives the parameter new storage; the cached launch data follows."""
    params = _params()
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, seed=1, noise_type="Uniform", backend=backend)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = nvrm_ext.FusedVSGD(twin, lr=0.1, momentum=0.9, seed=1, noise_type="Uniform", backend=backend)
    for step in range(3):
        if step == 1:
            for p in params:
                p.data = p.data.clone()  # new storage, same values
        _set_grads(params, step)
        _set_grads(twin, step)
        opt.step()
        twin_opt.step()
    for a, b in zip(params, twin):
        assert torch.equal(a.detach(), b.detach())


def test_cleared_optimizer_state_starts_afresh():
    params = _params()
    opt = nvrm_ext.FusedVAdam(params, lr=1e-2, seed=1, backend="cpu")
    _set_grads(params, 0)
    opt.step()
    with opt.denoised():
        clean = [p.detach().clone() for p in params]
    opt.state.clear()
    for p, c in zip(params, clean):
        p.data.copy_(c)
    fresh_params = [torch.nn.Parameter(c.clone()) for c in clean]
    fresh = nvrm_ext.FusedVAdam(fresh_params, lr=1e-2, seed=1, backend="cpu")
    _set_grads(params, 1)
    _set_grads(fresh_params, 1)
    opt.step()
    fresh.step()
    for a, b in zip(params, fresh_params):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_gradient_of_another_dtype_is_read_as_the_parameter_dtype(backend):
    """A float32 gradient on a bfloat16 parameter (and the reverse) is converted, not misread."""
    results = []
    for grad_dtype in (torch.bfloat16, torch.float32):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 37).to(torch.bfloat16))
        if hasattr(p, "grad_dtype"):  # torch >= 2.10 checks grad dtypes unless told not to
            p.grad_dtype = None
        opt = nvrm_ext.FusedVSGD([p], lr=0.1, seed=0, noise_type="Uniform", backend=backend)
        p.grad = torch.linspace(1, 2, 37).to(torch.bfloat16).to(grad_dtype)
        opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])

