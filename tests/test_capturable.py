"""capturable=True: the step counters live on the device, so a step needs nothing from the host.

That is what makes two things possible: capturing optimizer.step() in a CUDA graph, and
GradScaler's fused protocol (grad_scale / found_inf read on the device, an inf step skipped
there). The reference for every test here is the host-mode optimizer (capturable=False), whose
counters live in `optimizer.state` and which GradScaler drives through its standard path; a
capturable run must be *bitwise* the same trajectory on the same backend.

CPU covers the host-side logic and every kernel's resolve / commit / skip (cpu library, Triton
interpreter, torch reference). Graph capture itself needs a GPU (the `cuda` tests at the end).
"""
import copy

import numpy as np
import pytest
import torch

import nvrm_ext
from nvrm_ext.backends import tables as T

BACKENDS = ["cpu", "torch", "triton"]

CONFIGS = {
    "sgd-momentum-dampening": (nvrm_ext.FusedVSGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3,
                                                         num_iters=4)),
    "sgd-nesterov-laplace": (nvrm_ext.FusedVSGD, dict(lr=0.05, momentum=0.9, nesterov=True, num_iters=3,
                                                       noise_type="Laplace")),
    "adam-decoupled": (nvrm_ext.FusedVAdam, dict(lr=1e-2, weight_decay=1e-2, decoupled=True, num_iters=5)),
    "adam-amsgrad-l2-uniform": (nvrm_ext.FusedVAdam, dict(lr=1e-2, weight_decay=1e-3, amsgrad=True, num_iters=5,
                                                          noise_type="Uniform")),
    "psgd": (nvrm_ext.FusedVSGD, dict(lr=0.1, momentum=0.5, num_iters=4, denoise=False)),
}


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in ((33,), (5, 7), (600,))]


def _grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]


def _optimizer(cls, kwargs, params, backend, capturable):
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": kwargs["lr"] / 2, "variability": 0.02}]
    return cls(groups, seed=5, backend=backend, capturable=capturable, **kwargs)


def _run(cls, kwargs, backend, capturable, *, steps=7, skipped=(), dtype=torch.float32):
    """`steps` effective steps; the calls listed in `skipped` carry found_inf=1 (and a gradient
    scale) and must change nothing. The second group's variability changes after step 3."""
    params = _params(dtype)
    grads = _grads(params, steps)
    opt = _optimizer(cls, kwargs, params, backend, capturable)
    done = 0
    for call in range(steps + len(skipped)):
        for p, g in zip(params, grads[done]):
            p.grad = g.clone()
        if call in skipped:
            opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
            opt.step()
            del opt.grad_scale, opt.found_inf
            continue
        if done == 3:
            opt.param_groups[1]["variability"] = 0.03
        opt.step()
        done += 1
    return params, opt


def _same(a, b):
    return all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_capturable_run_is_bitwise_the_host_mode_run(config, backend):
    cls, kwargs = CONFIGS[config]
    host, host_opt = _run(cls, kwargs, backend, capturable=False)
    live, live_opt = _run(cls, kwargs, backend, capturable=True)
    assert _same(host, live)
    for p_host, p_live in zip(host, live):
        s_host, s_live = host_opt.state[p_host], live_opt.state[p_live]
        for key in ("step", "noise_step", "noise_type"):
            assert isinstance(s_live[key], torch.Tensor)  # a view of the device counters
            assert s_live[key].item() == s_host[key], key
        assert s_live["noise_scale"].item() == np.float32(s_host["noise_scale"])
    with host_opt.denoised(), live_opt.denoised():  # the noise bookkeeping agrees too
        assert _same(host, live)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["sgd-momentum-dampening", "adam-amsgrad-l2-uniform"])
def test_steps_with_found_inf_change_nothing(config, backend):
    """Skipped calls (the first one included: a fresh momentum buffer must stay fresh) leave the
    trajectory exactly that of a run that never saw them."""
    cls, kwargs = CONFIGS[config]
    reference, _ = _run(cls, kwargs, backend, capturable=False)
    skipping, _ = _run(cls, kwargs, backend, capturable=True, skipped=(0, 3, 4, 8))
    assert _same(reference, skipping)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_leaves_parameters_gradients_state_and_counters_untouched(backend):
    cls, kwargs = CONFIGS["adam-decoupled"]
    params, opt = _run(cls, kwargs, backend, capturable=True, steps=3)
    for p, g in zip(params, _grads(params, 1, seed=9)[0]):
        p.grad = g
    before = copy.deepcopy(([p.detach() for p in params], [p.grad for p in params],
                            [{k: v.clone() for k, v in opt.state[p].items()} for p in params]))
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    opt.step()
    assert _same(before[0], [p.detach() for p in params])
    assert _same(before[1], [p.grad for p in params])  # not unscaled either
    for saved, p in zip(before[2], params):
        assert all(torch.equal(saved[k], opt.state[p][k]) for k in saved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_divides_the_gradients_and_leaves_them_unscaled(backend, dtype):
    """As torch's fused optimizers: the update sees grad / grad_scale, and p.grad holds it after."""
    cls, kwargs = CONFIGS["sgd-momentum-dampening"]
    scale = 1024.0
    params_scaled, params_plain = _params(dtype), _params(dtype)
    grads = _grads(params_plain, 4)
    scaled = _optimizer(cls, kwargs, params_scaled, backend, capturable=True)
    plain = _optimizer(cls, kwargs, params_plain, backend, capturable=False)
    for step_grads in grads:
        for p, q, g in zip(params_scaled, params_plain, step_grads):
            p.grad = (g.float() * scale).to(dtype)
            q.grad = g.clone()
        scaled.grad_scale, scaled.found_inf = torch.tensor(scale), torch.tensor(0.0)
        scaled.step()
        plain.step()
        assert _same([p.grad for p in params_scaled], step_grads)
    assert _same(params_scaled, params_plain)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_grad_scale_reaches_gradients_of_another_dtype(backend):
    """A float32 gradient of a bfloat16 parameter is read through a conversion buffer; it is
    still left unscaled after the step (in the parameter's precision), and untouched when skipped."""
    params = _params(torch.bfloat16)
    for p in params:
        if hasattr(p, "grad_dtype"):  # torch >= 2.10 checks gradient dtypes unless told not to
            p.grad_dtype = None
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, seed=1, backend=backend, capturable=True)
    for found_inf in (1.0, 0.0):
        for p in params:
            p.grad = torch.full(p.shape, 12.0, dtype=torch.float32)
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(found_inf)
        opt.step()
        expected = 12.0 if found_inf else 3.0
        assert all(p.grad.dtype == torch.float32 and bool((p.grad == expected).all()) for p in params)
    assert opt.state[params[0]]["step"].item() == 1


def _gradscaler_run(backend, capturable, steps=8, inf_at=(2, 5)):
    """A small model trained with torch.amp.GradScaler('cpu'), gradients poisoned with inf at
    `inf_at`: the host-mode optimizer goes through GradScaler's standard path (unscale_, a
    host check, skip), the capturable one through the fused protocol."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = nvrm_ext.FusedVAdam(model.parameters(), lr=1e-2, num_iters=4, seed=3, backend=backend,
                              capturable=capturable)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    data = torch.Generator().manual_seed(1)
    scales = []
    for step in range(steps):
        x, y = torch.randn(32, 6, generator=data), torch.randint(0, 3, (32,), generator=data)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if step in inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        opt.zero_grad()
    return model, opt, scales


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradscaler_fused_protocol_matches_its_standard_path(backend, monkeypatch):
    seen = []
    original_step = nvrm_ext.FusedVAdam.step

    def spy(self, *args, **kwargs):
        seen.append((getattr(self, "grad_scale", None) is not None, getattr(self, "found_inf", None) is not None))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(nvrm_ext.FusedVAdam, "step", spy)
    host_model, host_opt, host_scales = _gradscaler_run(backend, capturable=False)
    assert not any(scale or inf for scale, inf in seen)  # standard path: GradScaler unscaled and skipped
    seen.clear()
    live_model, live_opt, live_scales = _gradscaler_run(backend, capturable=True)
    assert len(seen) == 8 and all(scale and inf for scale, inf in seen)  # every call, inf ones too
    assert host_scales == live_scales
    assert _same(list(host_model.parameters()), list(live_model.parameters()))
    p = next(live_model.parameters())
    assert live_opt.state[p]["step"].item() == host_opt.state[next(host_model.parameters())]["step"] == 6


def test_gradscaler_after_unscale_passes_found_inf_only():
    """scaler.unscale_(opt) before step (gradient clipping): the gradients are already unscaled,
    GradScaler hands over found_inf alone, and the step is still skipped on inf."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = nvrm_ext.FusedVSGD(model.parameters(), lr=0.1, seed=1, backend="cpu", capturable=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for poisoned in (False, True):
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        if poisoned:
            model.weight.grad[0, 0] = float("nan")
        scaler.unscale_(opt)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        changed = not _same(before, list(model.parameters()))
        assert changed is not poisoned
        opt.zero_grad()
    assert opt.state[model.weight]["step"].item() == 1


class _NoHostSync:
    """Makes every way of reading a tensor's value on the host raise."""

    NAMES = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __enter__(self):
        def forbidden(*args, **kwargs):
            raise AssertionError("a tensor was read on the host during a capturable step")
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name in self.NAMES:
            setattr(torch.Tensor, name, forbidden)

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_capturable_step_reads_nothing_back_and_uploads_nothing(backend):
    """After the first step: no device value read on the host (each would be a sync on a GPU,
    and is forbidden inside a graph capture), and no table upload while nothing changed."""
    cls, kwargs = CONFIGS["adam-decoupled"]
    params = _params()
    opt = _optimizer(cls, kwargs, params, backend, capturable=True)
    opt.param_groups[0]["lr"] = torch.tensor(0.01)  # a tensor lr is refreshed on the device
    grads = _grads(params, 3)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()
    plan = next(iter(opt._plans.values()))
    uploaded = plan._uploaded
    for step_grads in grads[1:]:
        for p, g in zip(params, step_grads):
            p.grad.copy_(g)  # same storage: the tables do not change
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
        with _NoHostSync():
            opt.step()
    assert plan._uploaded is uploaded
    assert opt.state[params[0]]["step"].item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_changed_in_place_reaches_the_kernel(backend):
    """An lr tensor is copied into the device tables at every step (so a replayed graph sees
    an LR scheduler's fill_); it must drive the update exactly like the same float lr."""
    cls, kwargs = CONFIGS["adam-decoupled"]
    lrs = [0.01, 0.003, 0.003, 0.02]
    params_tensor, params_float = _params(), _params()
    grads = _grads(params_float, len(lrs))
    with_tensor = cls(params_tensor, **{**kwargs, "lr": torch.tensor(lrs[0])}, seed=5, backend=backend,
                      capturable=True)
    with_float = cls(params_float, **{**kwargs, "lr": lrs[0]}, seed=5, backend=backend)
    for lr, step_grads in zip(lrs, grads):
        with_tensor.param_groups[0]["lr"].fill_(lr)
        with_float.param_groups[0]["lr"] = float(np.float32(lr))
        for p, q, g in zip(params_tensor, params_float, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        with_tensor.step()
        with_float.step()
    assert _same(params_tensor, params_float)


def test_lr_scheduler_with_a_tensor_lr_fills_it_in_place():
    params = _params()
    opt = nvrm_ext.FusedVSGD(params, lr=torch.tensor(0.1), seed=1, backend="cpu", capturable=True)
    lr = opt.param_groups[0]["lr"]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == np.float32(0.05)


def _host_and_capturable_runs(config, backend, steps, before_step):
    """[(params, optimizer)] of a host-mode and a capturable run; before_step(opt, params, k,
    grads) sets up step k (gradients included)."""
    cls, kwargs = CONFIGS[config]
    runs = []
    for capturable in (False, True):
        params = _params()
        opt = _optimizer(cls, kwargs, params, backend, capturable)
        for k, step_grads in enumerate(_grads(params, steps)):
            before_step(opt, params, k, step_grads)
            opt.step()
        runs.append((params, opt))
    return runs


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float_hyperparameters_changed_between_steps_are_uploaded(backend):
    def before_step(opt, params, k, step_grads):
        opt.param_groups[0]["lr"] = 0.1 / (k + 1)
        opt.param_groups[1]["momentum"] = 0.5 + 0.1 * k
        for p, g in zip(params, step_grads):
            p.grad = g  # fresh gradient storage every step, as after zero_grad(set_to_none=True)

    (host, _), (live, _) = _host_and_capturable_runs("sgd-momentum-dampening", backend, 4, before_step)
    assert _same(host, live)


@pytest.mark.parametrize("source,target", [(True, False), (False, True), (True, True)])
def test_checkpoints_move_between_host_and_capturable_mode(source, target):
    cls, kwargs = CONFIGS["sgd-momentum-dampening"]
    reference, _ = _run(cls, kwargs, "cpu", capturable=False, steps=6)

    params = _params()
    grads = _grads(params, 6)
    first = _optimizer(cls, kwargs, params, "cpu", capturable=source)
    for k in range(3):
        for p, g in zip(params, grads[k]):
            p.grad = g.clone()
        first.step()
    saved = first.state_dict()
    for state in saved["state"].values():  # plain numbers, whatever the mode
        assert all(not isinstance(state[key], torch.Tensor) for key in ("step", "noise_step", "noise_type",
                                                                         "noise_scale"))
        assert "momentum_fresh" not in state
    second = _optimizer(cls, kwargs, params, "cpu", capturable=target)
    second.load_state_dict(copy.deepcopy(saved))
    for k in range(3, 6):
        if k == 3:
            second.param_groups[1]["variability"] = 0.03
        for p, g in zip(params, grads[k]):
            p.grad = g.clone()
        second.step()
    assert _same(reference, params)


def test_checkpoint_after_a_skipped_first_step_keeps_the_momentum_buffer_fresh():
    cls, kwargs = CONFIGS["sgd-momentum-dampening"]
    params = _params()
    opt = _optimizer(cls, kwargs, params, "cpu", capturable=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    state = opt.state_dict()["state"][0]
    assert state["step"] == 0 and "momentum_buffer" not in state


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_counters_survive_a_rebuild_of_the_launch_data(backend):
    """A parameter that first gets a gradient at step 3 rebuilds the bucket's launch data; the
    counters already on the device are carried over, not reset."""
    def before_step(opt, params, k, step_grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = g if (i != 1 or k >= 3) else None

    (host, _), (live, live_opt) = _host_and_capturable_runs("adam-decoupled", backend, 6, before_step)
    assert _same(host, live)
    assert live_opt.state[live[1]]["step"].item() == 3


def test_deepcopy_of_a_capturable_optimizer_continues_identically():
    """The copy's counters are its own: stepping one does not advance the other."""
    cls, kwargs = CONFIGS["adam-decoupled"]
    params = _params()
    opt = _optimizer(cls, kwargs, params, "cpu", capturable=True)
    grads = _grads(params, 3)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    twin = copy.deepcopy({"params": params, "opt": opt})
    assert twin["opt"].capturable
    for step_grads in grads[1:]:
        for p, q, g in zip(params, twin["params"], step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin["opt"].step()
    assert _same(params, twin["params"])
    assert opt.state[params[0]]["step"].item() == twin["opt"].state[twin["params"][0]]["step"].item() == 3


def test_grad_scale_and_found_inf_need_capturable():
    params = _params()
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, backend="cpu")
    assert opt._step_supports_amp_scaling is False
    for p in params:
        p.grad = torch.ones_like(p)
    opt.found_inf = torch.tensor(0.0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="need capturable=True"):
        opt.step()
    assert _same(before, params) and len(opt.state) == 0


def test_bad_grad_scale_and_capturable_values_are_rejected():
    params = _params()
    with pytest.raises(ValueError, match="Invalid capturable"):
        nvrm_ext.FusedVAdam(params, capturable="yes")
    opt = nvrm_ext.FusedVAdam(params, backend="cpu", capturable=True)
    assert opt._step_supports_amp_scaling is True and opt.capturable
    for p in params:
        p.grad = torch.ones_like(p)
    opt.grad_scale = 2.0
    with pytest.raises(TypeError, match="grad_scale must be a one-element tensor"):
        opt.step()
    assert len(opt.state) == 0


def test_commit_rows_is_checked_by_the_compiled_library():
    from nvrm_ext.backends.compiled import compiled_backend

    ints = torch.zeros((1, T.INT_COLUMNS), dtype=torch.int64)
    floats = torch.zeros((1, T.FLOAT_COLUMNS), dtype=torch.float32)
    blocks = torch.zeros((0, 2), dtype=torch.int64)
    with pytest.raises(ValueError, match="commit_rows 2 outside"):
        compiled_backend("cpu").launch(T.OP_SGD, torch.float32, ints, floats, blocks, 0, commit_rows=2)


def test_power_is_exact_binary_exponentiation():
    """The bias corrections' beta**t: the same multiplications in every implementation."""
    beta = np.array([0.9, 0.999, 0.5, 0.0, 1.0])
    for t in (1, 2, 3, 10, 1000, 2**31 + 5):
        expected = []
        for b in beta:
            result, x, e = 1.0, float(b), t
            while e:
                if e & 1:
                    result *= x
                x *= x
                e >>= 1
            expected.append(result)
        assert T.power(beta, np.full(len(beta), t)).tolist() == expected
        for b, result in zip(beta, expected):  # one base and one exponent for every row
            assert T.power(np.full(3, b), np.full(3, t)).tolist() == [result] * 3
    assert T.power(np.array([0.5]), np.array([3]))[0] == 0.125


# ------------------------------------------------------------------ GPU only
def _cuda_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)).cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cls", [nvrm_ext.FusedVSGD, nvrm_ext.FusedVAdam])
def test_cuda_graph_replay_equals_eager_steps(cls, backend):
    """The whole-network capture recipe of the PyTorch CUDA-graph docs; replays must follow the
    eager trajectory bit for bit (same kernels, same counters)."""
    kwargs = dict(lr=1e-2, num_iters=5, momentum=0.9) if cls is nvrm_ext.FusedVSGD else dict(lr=1e-3, num_iters=5)
    data = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(32, 64, device="cuda", generator=data),
                torch.randint(0, 10, (32,), device="cuda", generator=data)) for _ in range(12)]

    def loss_of(model, x, y):
        return torch.nn.functional.cross_entropy(model(x), y)

    eager = _cuda_model()
    eager_opt = cls(eager.parameters(), seed=7, backend=backend, capturable=True, **kwargs)
    for x, y in batches:
        eager_opt.zero_grad(set_to_none=True)
        loss_of(eager, x, y).backward()
        eager_opt.step()

    graphed = _cuda_model()
    opt = cls(graphed.parameters(), seed=7, backend=backend, capturable=True, **kwargs)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:  # warm-up, eager
            opt.zero_grad(set_to_none=True)
            loss_of(graphed, x, y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_of(graphed, static_x, static_y).backward()
        opt.step()
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    assert _same(eager.parameters(), graphed.parameters())
    assert opt.state[graphed[0].weight]["step"].item() == 12


@pytest.mark.cuda
def test_gradscaler_fused_protocol_on_cuda_matches_standard_path():
    runs = []
    for capturable in (False, True):
        model = _cuda_model()
        opt = nvrm_ext.FusedVAdam(model.parameters(), lr=1e-3, seed=2, backend="cuda", capturable=capturable)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12, growth_interval=2)
        data = torch.Generator(device="cuda").manual_seed(3)
        for step in range(8):
            x = torch.randn(16, 64, device="cuda", generator=data)
            y = torch.randint(0, 10, (16,), device="cuda", generator=data)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if step in (1, 4):
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs.append(model)
    assert _same(runs[0].parameters(), runs[1].parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("capturable", [False, True])
def test_checkpoint_saved_on_gpu_resumes_on_cpu(capturable, tmp_path):
    """Save on the GPU, load on the CPU: the cpu backend continues with the same noise (the
    fused backends agree bit for bit), so the trajectories match within float32 rounding of
    the GPU's own arithmetic (exactly, in fact, as the element math is shared)."""
    cls, kwargs = CONFIGS["adam-decoupled"]
    cpu_params = _params()
    gpu_params = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_params]
    grads = _grads(cpu_params, 6)
    gpu_opt = _optimizer(cls, kwargs, gpu_params, "cuda", capturable)
    for step_grads in grads[:3]:
        for p, g in zip(gpu_params, step_grads):
            p.grad = g.cuda()
        gpu_opt.step()
    torch.save({"params": [p.detach() for p in gpu_params], "optimizer": gpu_opt.state_dict()}, tmp_path / "ckpt.pt")

    checkpoint = torch.load(tmp_path / "ckpt.pt", map_location="cpu")
    params = [torch.nn.Parameter(t) for t in checkpoint["params"]]
    cpu_opt = _optimizer(cls, kwargs, params, "cpu", capturable=False)
    cpu_opt.load_state_dict(checkpoint["optimizer"])
    for step_grads in grads[3:]:
        for p, q, g in zip(params, gpu_params, step_grads):
            p.grad, q.grad = g.clone(), g.cuda()
        cpu_opt.step()
        gpu_opt.step()
    assert _same(params, [p.cpu() for p in gpu_params])
