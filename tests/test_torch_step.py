"""The 'torch' backend's compiled step programs (backends/torch_step.py) and the noise they keep.

A large tensor's step runs as one compiled program that draws the new noise, subtracts the old
one (kept from the previous step when its key matches, drawn otherwise) and applies the update;
small tensors that share their update run as one batch program over flat copies of them.
Its reference is the backend's eager path (NVRM_TORCH_COMPILE=0: nvrm_ext.noise's draws and the
per-row update, itself tested against the original algorithm in test_torch_noise.py): the same
operations, so the same weights and states, to one float32 ulp of the noise where a platform's
vectorized float64 functions take another path for some elements. With and without the kept
noise the programs must agree bit for bit: the kept noise is what the program would draw.
The `programs` fixture picks the kind: "tensor" lowers STEP_MIN_ELEMENTS so that small tensors
take per-tensor programs (the 1- and 7-element ones stay below it and take the other paths in
the same steps); "batch" lowers the batch programs' minimum so that the small tensors whose
sizes are whole quads share one (the others take the grouped eager path in the same steps).
"""
import copy
import gc
import math

import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec
from nvrm_ext.backends import torch_batch, torch_noise, torch_step

SEED = 0x5EED0F5E7
# whole quads: (300, 7) 2,100 elements, (16,), (6, 10); not: 1, 7, 4,099, (2, 3, 11, 13) 858
SHAPES = [(1,), (300, 7), (7,), (4099,), (2, 3, 11, 13), (16,), (6, 10)]
TAKEN = {"tensor": 5, "batch": 3}  # rows per step each kind of program takes


def _counting_programs(monkeypatch, kind):
    monkeypatch.delenv("NVRM_TORCH_COMPILE", raising=False)
    monkeypatch.delenv("NVRM_TORCH_NOISE_CACHE", raising=False)
    ran = {"rows": 0, "kept": 0}
    if kind == "tensor":
        monkeypatch.setattr(torch_step, "STEP_MIN_ELEMENTS", 16)
        real = torch_step.try_step

        def counting(op, row, ints_row, float_row, seed, grad_scale, cache):
            old_noise = None if cache is None else cache._entries.get(id(row[0]))
            done = real(op, row, ints_row, float_row, seed, grad_scale, cache)
            ran["rows"] += done
            ran["kept"] += done and old_noise is not None and old_noise[1][2] == int(ints_row[7])
            return done
        monkeypatch.setattr(torch_step, "try_step", counting)
    else:
        monkeypatch.setattr(torch_noise, "COMPILE_MIN_ELEMENTS", 0)
        real_batches, real_compiled = torch_batch.run_batches, torch_batch.compiled

        def counting_batches(op, rows, *args):
            rest = real_batches(op, rows, *args)
            ran["rows"] += len(rows) - len(rest)
            return rest

        def counting_compiled(config, make):
            program = real_compiled(config, make)
            if program is None:
                return None

            def counting_program(*args):
                program(*args)
                ran["kept"] += config[3] == torch_step.OLD_KEPT
            return counting_program
        monkeypatch.setattr(torch_batch, "run_batches", counting_batches)
        monkeypatch.setattr(torch_batch, "compiled", counting_compiled)
    return ran


@pytest.fixture
def step_programs(monkeypatch):
    """Per-tensor step programs for every tensor of 16 elements or more; a count of the rows they ran."""
    return _counting_programs(monkeypatch, "tensor")


@pytest.fixture(params=["tensor", "batch"])
def programs(request, monkeypatch):
    """Per-tensor or batch step programs; (kind, a count of the rows they ran)."""
    return request.param, _counting_programs(monkeypatch, request.param)


CASES = {
    "vsgd-nesterov-gaussian-float32": (nvrm_ext.FusedVSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2,
                                                               nesterov=True), "Gaussian", torch.float32),
    "vadam-amsgrad-laplace-float32": (nvrm_ext.FusedVAdam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True),
                                      "Laplace", torch.float32),
    "vsgd-momentum-gaussian-bfloat16": (nvrm_ext.FusedVSGD, dict(lr=0.05, momentum=0.9), "Gaussian",
                                        torch.bfloat16),
    "vadam-decoupled-uniform-float64": (nvrm_ext.FusedVAdam, dict(lr=1e-2, weight_decay=0.1, decoupled=True),
                                        "Uniform", torch.float64),
}


def _run(cls, kwargs, noise_type, dtype, steps=7, num_iters=3, shapes=SHAPES, edit=None, **options):
    """Weights and optimizer states after `steps` steps from fixed weights and gradients;
    `edit(step, optimizer, params)` runs before each step."""
    g = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in shapes]
    opt = cls(params, **kwargs, variability=0.05, num_iters=num_iters, noise_type=noise_type, seed=SEED,
              backend="torch", **options)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        if edit is not None:
            edit(step, opt, params)
        opt.step()
    states = [t.clone() for state in opt.state.values() for t in state.values()
              if isinstance(t, torch.Tensor) and t.dim() > 0]
    return [p.detach().clone() for p in params] + states


def _assert_same(ours, eager, exact: bool) -> None:
    for a, b in zip(ours, eager, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if exact:
            assert torch.equal(a, b)
        else:  # one ulp of the weight: the noise's z one float32 ulp apart on a few elements
            ulp = torch.nextafter(b.abs(), torch.tensor(math.inf, dtype=b.dtype)) - b.abs()
            assert ((a - b).abs() <= ulp).all(), (a - b).abs().max()


@pytest.mark.parametrize("case", list(CASES))
def test_step_programs_give_the_eager_paths_weights(programs, monkeypatch, case):
    kind, ran = programs
    cls, kwargs, noise_type, dtype = CASES[case]
    kept = _run(cls, kwargs, noise_type, dtype)
    # every step but the ends of periods (steps 3 and 6: the noise only comes off; the eager
    # path does it)
    assert ran["rows"] == TAKEN[kind] * 5 and ran["kept"] > 0
    monkeypatch.setenv("NVRM_TORCH_COMPILE", "0")
    eager = _run(cls, kwargs, noise_type, dtype)
    _assert_same(kept, eager, exact=noise_type == "Uniform")


def test_a_channels_last_parameter_is_stepped_in_memory_order(step_programs, monkeypatch):
    """The noise of element i is numbered in memory order (docs/noise.md §1): the program works on
    flat memory-order views (a tensor whose strides differ from its parameter's has none: the row
    would be left to the batched path; the optimizer hands over gradients in the parameter's layout)."""
    cls, kwargs, noise_type, dtype = CASES["vsgd-nesterov-gaussian-float32"]

    def channels_last(step, opt, params):
        if step == 0:
            params[4].data = params[4].data.contiguous(memory_format=torch.channels_last)
        params[4].grad = params[4].grad.contiguous(memory_format=torch.channels_last)
        assert torch_step.flat_in_memory_order(params[4].grad.contiguous(), params[4]) is None
    ours = _run(cls, kwargs, noise_type, dtype, edit=channels_last)
    assert step_programs["rows"] == TAKEN["tensor"] * 5
    monkeypatch.setenv("NVRM_TORCH_COMPILE", "0")
    eager = _run(cls, kwargs, noise_type, dtype, edit=channels_last)
    _assert_same(ours, eager, exact=False)


def _edits():
    def variability(step, opt, params):
        if step == 4:
            opt.param_groups[0]["variability"] = 0.2
    def noise_type(step, opt, params):
        if step == 2:
            opt.param_groups[0]["noise_type"] = "Laplace"
    def replaced(step, opt, params):  # the same parameter objects, other storage (same shape)
        if step == 3:
            for index in (1, 3, 5):  # (300, 7), the first of the batch; (4099,), (16,)
                params[index].data = params[index].data.clone()
    def first_skips(step, opt, params):  # the batch begins with another member for one step
        if step == 2:
            params[1].grad = None
    return {"variability": variability, "noise_type": noise_type, "replaced": replaced,
            "first-skips": first_skips}


@pytest.mark.parametrize("edit", list(_edits()))
def test_edited_groups_and_replaced_storage_give_the_weights_of_a_run_without_kept_noise(programs,
                                                                                       monkeypatch, edit):
    """After an edit (of a group, of a parameter's storage, of which rows a batch holds) the
    weights are those of runs that draw every noise: the kept noise, where it is used, is the
    noise the table asks to remove, and nothing else in a program or workspace carries over."""
    kind, ran = programs
    cls, kwargs, _, dtype = CASES["vsgd-nesterov-gaussian-float32"]
    ours = _run(cls, kwargs, "Gaussian", dtype, edit=_edits()[edit])
    monkeypatch.setenv("NVRM_TORCH_NOISE_CACHE", "0")
    assert ran["kept"] > 0
    drawn = _run(cls, kwargs, "Gaussian", dtype, edit=_edits()[edit])
    _assert_same(ours, drawn, exact=True)
    monkeypatch.setenv("NVRM_TORCH_COMPILE", "0")
    eager = _run(cls, kwargs, "Gaussian", dtype, edit=_edits()[edit])
    _assert_same(ours, eager, exact=False)


@pytest.mark.parametrize("source", ["resume", "another-run", "an-earlier-step"])
def test_a_loaded_checkpoint_gives_the_weights_of_a_run_without_kept_noise(programs, monkeypatch, source):
    """A state_dict loaded into a new optimizer over the same parameters in the middle of a
    period: its own (a resume: the kept noise is the one to remove), another run's (another seed)
    or an earlier one with its model's weights (a rewind). In the last two the noise the table
    asks to remove is not the kept one, which must not be used: the weights are those of a run
    that draws every noise."""
    cls, kwargs, _, dtype = CASES["vadam-amsgrad-laplace-float32"]

    def run(cache: str):
        monkeypatch.setenv("NVRM_TORCH_NOISE_CACHE", cache)
        g = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]
        make = lambda seed: cls(params, **kwargs, variability=0.05, num_iters=4, seed=seed, backend="torch")
        opt = make(SEED)
        donor = make(SEED + 1)
        earlier = None
        for step in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            if step == 1:  # a checkpoint: the model's weights and the optimizer's state
                earlier = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
            if step == 2:  # old noise of step 2 on the weights, new noise of step 3 to come
                checkpoint = {"resume": opt.state_dict, "another-run": donor.state_dict,
                              "an-earlier-step": lambda: earlier[1]}[source]()
                if source == "another-run":  # the donor's step counters must match the weights'
                    checkpoint["state"] = opt.state_dict()["state"]
                if source == "an-earlier-step":  # step 1's noise on the weights again
                    with torch.no_grad():
                        for p, saved in zip(params, earlier[0]):
                            p.copy_(saved)
                opt = make(SEED)
                opt.load_state_dict(checkpoint)
            opt.step()
        return [p.detach().clone() for p in params]
    kept = run("1")
    assert programs[1]["kept"] > 0
    _assert_same(kept, run("0"), exact=True)


def test_the_kept_noise_is_the_specifications_and_goes_with_its_parameter(step_programs):
    """After one step with zero gradients the weights are w + noise and the kept noise is that noise
    (nvrm_ext.noise, to the ulp); it stays while its parameter is skipped (a gradient of None: the
    weights keep that noise), is forgotten by a row that leaves the programs (here: the end of a
    period, where the batched path takes the noise off) and is freed with its parameter."""
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(4099,), (300, 7)]]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, variability=0.1, num_iters=2, seed=SEED, backend="torch")
    opt.step()
    cache = torch_step.PREVIOUS_NOISE
    for key, p in enumerate(params):
        expected = spec.noise("Gaussian", 0.1, SEED, key, 1, p.numel())
        kept = cache._entries[id(p)][2]
        assert kept.dtype == torch.float32 and kept.numel() == p.numel()
        ulp = torch.nextafter(expected.abs(), torch.tensor(math.inf)) - expected.abs()
        assert ((kept - expected).abs() <= ulp).all() and torch.equal(p.detach().view(-1), kept)
    params[1].grad = None
    opt.step()  # the end of the period for params[0]: its noise comes off
    assert id(params[0]) not in cache._entries and id(params[1]) in cache._entries
    assert torch.equal(params[0].detach(), torch.zeros_like(params[0]))
    ident = id(params[1])
    del opt, params, p
    gc.collect()
    assert ident not in cache._entries


def test_a_scaled_gradient_is_unscaled_in_the_program(programs, monkeypatch):
    """GradScaler's fused protocol (capturable=True): the program divides the gradient by the
    scale and writes it back, as the eager path does."""
    kind, ran = programs
    cls, kwargs, noise_type, dtype = CASES["vsgd-momentum-gaussian-bfloat16"]

    def scaled(step, opt, params):
        opt.grad_scale = torch.tensor(1024.0)
        opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0)  # step 2 is skipped
        for p in params:
            p.grad.mul_(1024)
    ours = _run(cls, kwargs, noise_type, dtype, edit=scaled, capturable=True)
    assert ran["rows"] == TAKEN[kind] * 4  # 7 steps: one skipped, two ends of periods
    monkeypatch.setenv("NVRM_TORCH_COMPILE", "0")
    eager = _run(cls, kwargs, noise_type, dtype, edit=scaled, capturable=True)
    _assert_same(ours, eager, exact=False)


def test_batch_programs_split_by_group_coefficients_and_step_counts(monkeypatch):
    """Two groups (other lr) and a parameter that skips a step (its Adam bias correction then
    differs from its group's others): rows with other coefficients never share a batch program's
    one float row, so the weights are the eager path's."""
    ran = _counting_programs(monkeypatch, "batch")

    def run():
        g = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]
        opt = nvrm_ext.FusedVAdam([{"params": params[:4]}, {"params": params[4:], "lr": 3e-3}], lr=1e-2,
                                  variability=0.05, num_iters=4, seed=SEED, backend="torch")
        for step in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            if step == 1:
                params[5].grad = None
            opt.step()
        return [p.detach().clone() for p in params]
    ours = run()
    assert ran["rows"] > 0
    monkeypatch.setenv("NVRM_TORCH_COMPILE", "0")
    _assert_same(ours, run(), exact=False)


def test_zeros_keep_their_sign_in_the_programs(programs, monkeypatch):
    """inductor compiles with -fno-signed-zeros; torch.equal does not tell -0.0 from +0.0. With
    gradients of signed zeros the momentum buffers are all zeros, and their bits (signs included)
    must be the eager path's."""
    kind, ran = programs

    def run():
        g = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]
        opt = nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, variability=0.01, seed=SEED, backend="torch")
        for _ in range(3):
            for p in params:
                p.grad = torch.tensor([-0.0, 0.0]).repeat(p.numel()).narrow(0, 0, p.numel()).view(p.shape)
            opt.step()
        return [t.view(torch.int32).clone() for t in
                [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]]
    ours = run()
    assert ran["rows"] == TAKEN[kind] * 3
    monkeypatch.setenv("NVRM_TORCH_COMPILE", "0")
    eager = run()
    assert all(torch.equal(a, b) for a, b in zip(ours, eager))
    assert any((t == torch.tensor(-0.0).view(torch.int32)).any() for t in ours)  # -0.0 is there to lose


def test_a_step_interrupted_part_way_is_refused_at_the_next_step(monkeypatch):
    """A KeyboardInterrupt after the large tensor's program has stepped it but before the small
    ones ran (Ctrl-C in a notebook): the weights no longer agree with the optimizer's counters,
    so the next step must raise a clear error and change nothing, not remove a noise that is
    not there; after reset_noise() the run goes on."""
    monkeypatch.delenv("NVRM_TORCH_COMPILE", raising=False)
    params = [torch.nn.Parameter(torch.randn(torch_step.STEP_MIN_ELEMENTS)), torch.nn.Parameter(torch.randn(8))]
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, variability=0.05, seed=SEED, backend="torch")
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    before = [p.detach().clone() for p in params]

    def interrupted(*args):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(torch_batch, "run_batches", interrupted)
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    assert not torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])  # half a step
    after = [p.detach().clone() for p in params]
    with pytest.raises(nvrm_ext.WeightsChangedError, match="interrupted part way"):
        opt.step()
    assert all(torch.equal(p, a) for p, a in zip(params, after))
    opt.reset_noise()
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
