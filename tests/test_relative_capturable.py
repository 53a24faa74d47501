"""relative=True with capturable=True (docs/noise.md §5.1): the spread is measured on the device at
every step and kept only where the live step counter starts a period, so a step reads nothing
back. The reference for every test is the host-mode optimizer (capturable=False) on the same
backend, whose relative path test_relative.py checks against plain torch: a capturable run must
be *bitwise* the same trajectory, with the same spreads in its state and its state_dict."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import nvrm_ext
from test_capturable import _NoHostSync

SEED = 41
NUM_ITERS = 3
STEPS = 8  # periods start at steps 1, 4 and 7


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.LayerNorm(10),
                                torch.nn.Linear(10, 3))
    with torch.no_grad():  # constant gain, zero bias: zero spread in the first period
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    return model.to(dtype)


def _loss(model, step):
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step)).to(dtype)
    return model(x).float().pow(2).mean()


class _CapturableAdam(torch.optim.Adam):
    """torch's capturable Adam needs a GPU; on the CPU an Adam whose groups say capturable stands
    in for it (NVRM reads only the flag: its counters then live on the device), stepping as
    torch's non-capturable Adam does (the same update)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group["capturable"] = True

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["capturable"] = False
        try:
            return super().step(closure)
        finally:
            for group in self.param_groups:
                group["capturable"] = True


_CapturableAdam.__name__ = "Adam"  # what NVRM's state_dict records of it: a checkpoint moves between modes


class _CapturableSGD(torch.optim.SGD):
    """As _CapturableAdam, for SGD (which has no capturable path of its own to switch off)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group["capturable"] = True


def _fused_vsgd(params, backend, capturable):
    return nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, variability=0.4, num_iters=NUM_ITERS, relative=True,
                              seed=SEED, backend=backend, capturable=capturable)


def _fused_vadam(params, backend, capturable):
    return nvrm_ext.FusedVAdam(params, lr=0.01, amsgrad=True, weight_decay=0.05, decoupled=True,
                               noise_type="Laplace", variability=0.3, num_iters=NUM_ITERS, relative=True, seed=SEED,
                               backend=backend, capturable=capturable)


def _nvrm_adam(params, backend, capturable):
    inner = _CapturableAdam if capturable else torch.optim.Adam
    return nvrm_ext.NVRM(inner(params, lr=0.01), variability=0.4, num_iters=NUM_ITERS, relative=True, seed=SEED,
                         backend=backend)


def _nvrm_sgd(params, backend, capturable):
    inner = _CapturableSGD if capturable else torch.optim.SGD
    return nvrm_ext.NVRM(inner(params, lr=0.1, momentum=0.9), variability=0.4, num_iters=NUM_ITERS, relative=True,
                         seed=SEED, backend=backend)


def _psgd(params, backend, capturable):
    return nvrm_ext.FusedVSGD(params, lr=0.1, variability=0.2, num_iters=NUM_ITERS, relative=True, denoise=False,
                              seed=SEED, backend=backend, capturable=capturable)


FACTORIES = {"FusedVSGD": _fused_vsgd, "FusedVAdam": _fused_vadam, "NVRM(Adam)": _nvrm_adam, "PSGD": _psgd}


def _engine(opt):
    return getattr(opt, "_engine", opt)  # NVRM keeps the noise state in its engine


def _run(make, backend, capturable, steps=STEPS, dtype=torch.float32, before_step=None):
    model = _model(dtype)
    opt = make(model.parameters(), backend, capturable)
    assert _engine(opt).capturable == capturable
    for step in range(1, steps + 1):
        if before_step is not None:
            before_step(opt, model, step)
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    return model, opt


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _spreads(opt, model):
    values = [_engine(opt).state[p].get("weight_std") for p in model.parameters()]
    return [v.item() if isinstance(v, torch.Tensor) else v for v in values]


def _assert_same_runs(host, live):
    (host_model, host_opt), (live_model, live_opt) = host, live
    assert _same(_params(host_model), _params(live_model))
    assert _spreads(host_opt, host_model) == _spreads(live_opt, live_model)
    for p, q in zip(host_model.parameters(), live_model.parameters()):
        s, t = _engine(host_opt).state[p], _engine(live_opt).state[q]
        assert isinstance(t["weight_std"], torch.Tensor)  # a view of the device spreads
        assert t["noise_scale"].item() == np.float32(s["noise_scale"])  # the scale the noise was added with
    with host_opt.denoised(), live_opt.denoised():  # the removal agrees too
        assert _same(_params(host_model), _params(live_model))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_capturable_relative_run_is_bitwise_the_host_mode_run(name, backend):
    """Across three period boundaries, with tensors of zero spread in the first period."""
    host = _run(FACTORIES[name], backend, capturable=False)
    live = _run(FACTORIES[name], backend, capturable=True)
    _assert_same_runs(host, live)
    model, opt = _run(FACTORIES[name], backend, capturable=True, steps=2)
    assert _spreads(opt, model)[2:4] == [0.0, 0.0]  # the constant gain and zero bias: no noise in period 1
    assert [_engine(opt).state[p]["noise_scale"].item() for p in list(model.parameters())[2:4]] == [0.0, 0.0]


@pytest.mark.parametrize("name", ["FusedVSGD", "NVRM(Adam)"])
def test_triton_capturable_relative_run_is_bitwise_the_host_mode_run(name):
    steps = NUM_ITERS + 1  # the interpreter is slow; still crosses a period boundary
    _assert_same_runs(_run(FACTORIES[name], "triton", False, steps), _run(FACTORIES[name], "triton", True, steps))


@pytest.mark.parametrize("name,dtype", [("FusedVAdam", torch.bfloat16), ("FusedVAdam", torch.float16),
                                        ("FusedVSGD", torch.float16), ("NVRM(Adam)", torch.bfloat16)])
def test_16_bit_parameters(name, dtype):
    """(torch's own Adam in float16 divides by an eps that float16 rounds to 0: not NVRM's case.)"""
    host = _run(FACTORIES[name], "cpu", False, dtype=dtype)
    live = _run(FACTORIES[name], "cpu", True, dtype=dtype)
    _assert_same_runs(host, live)
    for p, q in zip(host[0].parameters(), live[0].parameters()):  # the compensation buffers too
        assert torch.equal(_engine(host[1]).state[p]["compensation"], _engine(live[1]).state[q]["compensation"])


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("source,target", [(True, True), (True, False), (False, True)])
def test_state_dict_round_trip_mid_period(name, source, target):
    """Saved mid-period (the spread of the period's first step must carry on), in the host-mode
    format (weight_std a float), loaded into either mode: the trajectory of the run that never
    stopped, bit for bit."""
    make = FACTORIES[name]
    reference, reference_opt = _run(make, "cpu", False)
    model, opt = _run(make, "cpu", source, steps=5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    key = "nvrm_weight_std" if name.startswith("NVRM") else "weight_std"
    _, host_at_5 = _run(make, "cpu", False, steps=5)
    expected = host_at_5.state_dict()["state"]
    for index, state in saved["optimizer"]["state"].items():
        assert type(state[key]) is float and state[key] == expected[index][key]
    if name.startswith("NVRM"):  # torch's load takes the groups' capturable flag: the target's
        for group in saved["optimizer"]["param_groups"]:
            group["capturable"] = target
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed.parameters(), "cpu", target)
    opt2.load_state_dict(saved["optimizer"])
    for step in range(6, STEPS + 1):
        opt2.zero_grad()
        _loss(resumed, step).backward()
        opt2.step()
    assert _same(_params(reference), _params(resumed))
    assert _spreads(reference_opt, reference) == _spreads(opt2, resumed)


@pytest.mark.parametrize("name", ["FusedVSGD", "NVRM(Adam)"])
def test_an_invalid_loaded_spread_is_refused_with_nothing_loaded(name):
    _, opt = _run(FACTORIES[name], "cpu", True, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    key = "nvrm_weight_std" if name.startswith("NVRM") else "weight_std"
    for bad in (-1.0, float("nan"), torch.tensor([0.1, 0.2])):
        saved["state"][1][key] = bad
        fresh = FACTORIES[name](_model().parameters(), "cpu", True)
        with pytest.raises(ValueError, match="weight_std"):
            fresh.load_state_dict(saved)
        assert len(_engine(fresh).state) == 0


def _edit_spreads(opt, model, step):
    """Before step 2: parameter 0's spread edited (kept to the period's end), parameter 1's
    deleted (measured again at that step, from the weights as they are then)."""
    if step == 2:
        state = _engine(opt).state
        params = list(model.parameters())
        state[params[0]]["weight_std"] = 0.5
        del state[params[1]]["weight_std"]


@pytest.mark.parametrize("name", ["FusedVSGD", "NVRM(Adam)"])
def test_spreads_edited_or_deleted_mid_period_are_taken_as_in_host_mode(name):
    host = _run(FACTORIES[name], "cpu", False, before_step=_edit_spreads)
    live = _run(FACTORIES[name], "cpu", True, before_step=_edit_spreads)
    _assert_same_runs(host, live)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1", True, torch.tensor([0.1, 0.2]),
                                 torch.tensor(-2.0, dtype=torch.float64)])
@pytest.mark.parametrize("name", ["FusedVSGD", "NVRM(Adam)"])
def test_an_invalid_edited_spread_is_refused_before_anything_changes(name, bad):
    model, opt = _run(FACTORIES[name], "cpu", True, steps=1)
    engine = _engine(opt)
    params = list(model.parameters())
    engine.state[params[0]]["weight_std"] = bad
    _loss(model, 2).backward()
    before = _params(model)
    inner_before = opt.optimizer.state[params[1]]["exp_avg"].clone() if name.startswith("NVRM") else None
    with pytest.raises(ValueError, match="parameter 0's state: invalid weight_std"):
        opt.step()
    assert _same(before, _params(model))
    if inner_before is not None:  # the inner optimizer did not step either
        assert opt.optimizer.state[params[1]]["exp_avg"].equal(inner_before)
    assert engine.state[params[1]]["step"].item() == 1
    engine.state[params[0]]["weight_std"] = 0.5  # a valid edit is taken at the next step
    opt.step()
    assert engine.state[params[0]]["weight_std"].item() == 0.5
    assert engine.state[params[0]]["noise_scale"].item() == np.float32(0.4 * 0.5)


def test_a_group_switched_to_relative_mid_period_measures_at_its_next_step():
    def switch(opt, model, step):
        if step == 2:
            opt.param_groups[0]["relative"] = False
        if step == 3:
            opt.param_groups[0]["relative"] = True
            opt.param_groups[0]["variability"] = 0.2

    make = lambda params, backend, capturable: nvrm_ext.FusedVSGD(
        [{"params": list(params)[:2], "relative": False}, {"params": []}], lr=0.1, variability=0.4,
        num_iters=NUM_ITERS, seed=SEED, backend=backend, capturable=capturable)

    def make_all(params, backend, capturable):
        params = list(params)
        opt = make(params[:2], backend, capturable)
        opt.add_param_group({"params": params[2:], "relative": True})
        return opt

    host = _run(make_all, "cpu", False, before_step=switch)
    live = _run(make_all, "cpu", True, before_step=switch)
    assert _same(_params(host[0]), _params(live[0]))
    assert _spreads(host[1], host[0]) == _spreads(live[1], live[0])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_skipped_steps_at_a_period_start_change_nothing(backend):
    """found_inf at the first step and at a period's first step (4): the trajectory of a run that
    never saw those calls (the spread measured then is the one the next step measures)."""
    model_ref, opt_ref = _run(_fused_vadam, backend, False)
    model = _model()
    opt = _fused_vadam(model.parameters(), backend, True)
    step = 1
    for call in range(STEPS + 3):
        opt.zero_grad()
        _loss(model, step).backward()
        if call in (0, 4, 5):  # before steps 1 and 4 (twice)
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
            opt.step()
            del opt.grad_scale, opt.found_inf
            continue
        opt.step()
        step += 1
    assert _same(_params(model_ref), _params(model))
    assert _spreads(opt_ref, model_ref) == _spreads(opt, model)


@pytest.mark.parametrize("name", ["FusedVSGD", "FusedVAdam", "NVRM(SGD)"])
def test_a_relative_capturable_step_reads_nothing_back(name):
    """After the first step, across period boundaries: no device value read on the host (each
    would be a sync on a GPU, and is forbidden inside a CUDA graph capture)."""
    make = {**FACTORIES, "NVRM(SGD)": _nvrm_sgd}[name]
    model = _model()
    opt = make(model.parameters(), "cpu", True)
    grads = []
    for step in range(1, STEPS + 1):
        opt.zero_grad(set_to_none=False)
        _loss(model, step).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model = _model()
    opt = make(model.parameters(), "cpu", True)
    for step, step_grads in enumerate(grads, 1):
        for p, g in zip(model.parameters(), step_grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        if step == 1:
            opt.step()
            continue
        with _NoHostSync():
            opt.step()
    reference = _model()
    ref_opt = make(reference.parameters(), "cpu", False)
    for step_grads in grads:
        for p, g in zip(reference.parameters(), step_grads):
            p.grad = g.clone()
        ref_opt.step()
    assert _same(_params(reference), _params(model))
    assert _spreads(ref_opt, reference) == _spreads(opt, model)


def test_the_device_program_measures_the_host_path_bits():
    """SpreadProgram.measure_on_device (capturable) against relative.spreads (host mode), for
    sizes around the summation chunk, several dtypes and layouts, and tiny tensors."""
    from nvrm_ext.optim.relative import CHUNK, SpreadProgram, spreads

    g = torch.Generator().manual_seed(3)
    tensors = [0.1 * torch.randn(n, generator=g) + 0.5 for n in (1, 2, 999, 999, CHUNK, CHUNK + 1, 3 * CHUNK + 7)]
    tensors += [torch.randn(40, 30, generator=g).t(), torch.randn(40, 30, generator=g).t(), torch.full((50,), 0.3),
                torch.tensor(0.7)]
    program = SpreadProgram(tensors, tensors)
    on_device = program.measure_on_device(tensors, tensors, torch.device("cpu"))
    assert on_device.dtype == torch.float64 and on_device.tolist() == spreads(tensors, tensors)
    assert on_device[0] == 0 and on_device[-1] == 0


def test_a_relative_change_inside_a_capture_is_refused_and_an_lr_change_is_not(monkeypatch):
    """Inside a CUDA graph capture (pretended: the plan's check says so) the relative rows' device
    data cannot be rebuilt: a new variability is refused before anything changes; an lr change
    leaves that data as it is and steps as in host mode."""
    from nvrm_ext.optim.launch import plan as plan_module

    def run(capturable, pretend):
        model = _model()
        opt = _fused_vsgd(model.parameters(), "cpu", capturable)
        for step in range(1, STEPS + 1):
            if step == 3:
                opt.param_groups[0]["lr"] = 0.05
            opt.zero_grad()
            _loss(model, step).backward()
            if step >= 3 and pretend:
                monkeypatch.setattr(plan_module, "_capturing", lambda device: True)
            opt.step()
            monkeypatch.setattr(plan_module, "_capturing", lambda device: False)
        return model, opt

    _assert_same_runs(run(False, False), run(True, True))
    model, opt = run(True, False)
    opt.param_groups[0]["variability"] = 0.2
    opt.zero_grad()
    _loss(model, 9).backward()
    before = _params(model)
    monkeypatch.setattr(plan_module, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
        opt.step()
    assert _same(before, _params(model))
    assert opt.state[next(model.parameters())]["step"].item() == STEPS
    monkeypatch.setattr(plan_module, "_capturing", lambda device: False)
    opt.step()  # eagerly: rebuilt, and the new variability taken
    p = next(model.parameters())
    assert opt.state[p]["noise_scale"].item() == np.float32(0.2 * opt.state[p]["weight_std"].item())


# ------------------------------------------------------------------ GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["FusedVSGD", "FusedVAdam", "NVRM(Adam)"])
def test_cuda_graph_replays_measure_at_each_period_start(name, backend):
    """The whole-network capture recipe of the PyTorch CUDA-graph docs with relative groups:
    replays must follow the eager capturable trajectory bit for bit (each replay measures the
    spreads and keeps them at a period's first step). The capture itself fails on a sync."""
    def make(params):
        if name == "NVRM(Adam)":  # torch's capturable Adam: its counters on the GPU too
            return nvrm_ext.NVRM(torch.optim.Adam(params, lr=0.01, capturable=True), variability=0.4,
                                 num_iters=NUM_ITERS, relative=True, seed=SEED, backend=backend)
        return FACTORIES[name](params, backend, True)

    data = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randn(8, 6, device="cuda", generator=data) for _ in range(11)]

    def loss_of(model, x):
        return model(x).pow(2).mean()

    eager = _model().cuda()
    eager_opt = make(eager.parameters())
    for x in batches:
        eager_opt.zero_grad(set_to_none=True)
        loss_of(eager, x).backward()
        eager_opt.step()

    graphed = _model().cuda()
    opt = make(graphed.parameters())
    static_x = batches[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in batches[:3]:  # warm-up, eager
            opt.zero_grad(set_to_none=True)
            loss_of(graphed, x).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_of(graphed, static_x).backward()
        opt.step()
    for x in batches[3:]:  # periods start at steps 4, 7 and 10
        static_x.copy_(x)
        graph.replay()
    torch.cuda.synchronize()
    assert _same(_params(eager), _params(graphed))
    assert _spreads(eager_opt, eager) == _spreads(opt, graphed)
    assert _engine(opt).state[next(graphed.parameters())]["step"].item() == len(batches)
