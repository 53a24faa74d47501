"""Launch tables that would make a kernel read or write out of bounds, divide by zero or put
non-finite noise on the weights are refused before anything changes.

The fused kernels trust their tables: a row index, a block start, a null address or a
num_iters of 0 that reaches them is a segfault, heap corruption or SIGFPE, not a Python error.
The CPU library checks every row on every launch (csrc/api.cpp invalid_tables), the Triton
backend checks host tables in Python (tables.check_table_contents): each case here corrupts one
column of otherwise valid tables and asserts a ValueError naming it, with every tensor the
launch could touch bit for bit unchanged. tests run under .ci/sanitize.sh too, where a check that
let an access through would be reported by AddressSanitizer even if it did not crash.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nvrm_ext
from nvrm_ext.backends import compiled
from nvrm_ext.backends import tables as T
from nvrm_ext.backends.triton import TRITON

CPU = compiled.compiled_backend("cpu")
SEED = 12345
NUMELS = (10, 5)


class Launch:
    """An SGD launch with momentum over two float32 tensors, resolved from live counters (as a
    host-mode CPU step or a capturable step runs): valid until a test corrupts it."""

    def __init__(self, backend):
        self.backend = backend
        torch.manual_seed(0)
        self.params = [torch.randn(n) for n in NUMELS]
        self.grads = [torch.randn(n) for n in NUMELS]
        self.buffers = [torch.randn(n) for n in NUMELS]
        floats = [0.0] * T.FLOAT_COLUMNS
        floats[T.F_LR], floats[T.F_MOMENTUM], floats[T.F_MOMENTUM_COEF] = 0.1, 0.9, 1.0
        floats[T.F_OLD_SCALE] = floats[T.F_NEW_SCALE] = 0.01
        flags = T.FLAG_MOMENTUM | (2 << T.FLAG_NEW_TYPE_SHIFT) | (2 << T.FLAG_OLD_TYPE_SHIFT)
        plans = [T.TensorPlan(p, g, (b,), key, 0, 1, flags, tuple(floats))
                 for key, (p, g, b) in enumerate(zip(self.params, self.grads, self.buffers))]
        ints, self.floats = T.build_rows(plans)
        self.ints = ints
        self.live = torch.zeros(len(plans), T.LIVE_COLUMNS, dtype=torch.float64)
        self.live[:, T.L_STEP] = 4
        self.live[:, T.L_NOISE_STEP] = 4
        self.live[:, T.L_NOISE_TYPE] = 2
        self.live[:, T.L_NOISE_SCALE] = 0.01
        ints[:, T.I_LIVE] = self.live.data_ptr() + np.arange(len(plans)) * T.LIVE_COLUMNS * 8
        ints[:, T.I_NUM_ITERS] = 3
        self.blocks = T.build_block_table(list(NUMELS), [0, 0], backend.block_size)

    def tensors(self) -> list[torch.Tensor]:
        return self.params + self.grads + self.buffers + [self.live]

    def run(self, commit_rows: int | None = None, op: int = T.OP_SGD) -> None:
        self.backend.launch(op, torch.float32, torch.from_numpy(self.ints), torch.from_numpy(self.floats),
                            torch.from_numpy(self.blocks), SEED,
                            commit_rows=len(self.ints) if commit_rows is None else commit_rows)


def set_int(column, value, row=1):
    def corrupt(launch):
        launch.ints[row, column] = value(launch) if callable(value) else value
    return corrupt


def set_flags(value, row=1):
    return set_int(T.I_FLAGS, lambda launch: launch.ints[row, T.I_FLAGS] | value, row)


def set_block(column, value, block=-1):
    def corrupt(launch):
        launch.blocks[block, column] = value
    return corrupt


def set_live(column, value, row=1):
    def corrupt(launch):
        launch.live[row, column] = value
    return corrupt


def without_live(launch):
    """The host-resolved form of the rows (old step and type from the table)."""
    launch.ints[:, T.I_LIVE] = 0
    launch.ints[:, T.I_OLD_STEP] = 4


def both(*corruptions):
    def corrupt(launch):
        for c in corruptions:
            c(launch)
    return corrupt


# (id, corruption, message): checked by both backends.
TABLE_CASES = [
    ("num_iters_zero", set_int(T.I_NUM_ITERS, 0), "table row 1: num_iters must be at least 1"),
    ("num_iters_negative", set_int(T.I_NUM_ITERS, -1, row=0), "table row 0: num_iters must be at least 1"),
    ("new_noise_type_3", set_flags(3 << T.FLAG_NEW_TYPE_SHIFT), "table row 1: noise type codes"),
    ("old_noise_type_3", both(without_live, set_flags(3 << T.FLAG_OLD_TYPE_SHIFT)), "table row 1: noise type codes"),
    ("negative_numel", set_int(T.I_NUMEL, -5), "table row 1: numel .*out of range"),
    ("huge_numel", set_int(T.I_NUMEL, 1 << 62), "table row 1: numel .*out of range"),
    ("negative_offset", set_int(T.I_OFFSET, -8), "table row 1: offset .*out of range"),
    ("null_param", set_int(T.I_PARAM, 0), "table row 1: null parameter address"),
    ("null_grad", set_int(T.I_GRAD, 0), "table row 1: null gradient address"),
    ("null_momentum_buffer", set_int(T.I_STATE0, 0, row=0), "table row 0: null first state address"),
    ("misaligned_param", set_int(T.I_PARAM, lambda launch: launch.ints[1, T.I_PARAM] + 1),
     "table row 1: misaligned parameter address"),
    ("infinite_new_scale", lambda launch: launch.floats.__setitem__((1, T.F_NEW_SCALE), np.inf),
     "table row 1: the new noise scale is not finite"),
    ("nan_old_scale", both(without_live, lambda launch: launch.floats.__setitem__((0, T.F_OLD_SCALE), np.nan)),
     "table row 0: the old noise scale is not finite"),
    ("block_row_past_the_table", set_block(T.B_ROW, 2), r"block 1: table row 2 outside \[0, 2\)"),
    ("block_row_negative", set_block(T.B_ROW, -1, block=0), r"block 0: table row -1 outside \[0, 2\)"),
    ("block_start_past_the_tensor", set_block(T.B_START, 8), r"block 1: start 8 is not a quad inside \[0, 5\)"),
    ("block_start_mid_quad", set_block(T.B_START, 2), r"block 1: start 2 is not a quad inside \[0, 5\)"),
    ("block_start_before_the_tensor", set_block(T.B_START, -4), r"block 1: start -4 is not a quad"),
    ("block_start_at_the_tensor_end", both(set_int(T.I_OFFSET, 3), set_block(T.B_START, 8)),
     r"block 1: start 8 is not a quad inside \[3, 8\)"),
]

# The live counters are read by the CPU library (host memory); the Triton backend's tables may
# be on a GPU, where the optimizer checks the counters when it writes them.
LIVE_CASES = [
    ("live_step_nan", set_live(T.L_STEP, float("nan")), "table row 1: step counter is not a count"),
    ("live_step_negative", set_live(T.L_STEP, -2.0), "table row 1: step counter is not a count"),
    ("live_step_huge", set_live(T.L_STEP, 2.0**70), "table row 1: step counter is not a count"),
    ("live_step_fraction", set_live(T.L_STEP, 1.5), "table row 1: step counter is not a count"),
    ("live_noise_step_inf", set_live(T.L_NOISE_STEP, float("inf")), "table row 1: noise step counter"),
    ("live_noise_type_5", set_live(T.L_NOISE_TYPE, 5.0, row=0), "table row 0: noise type counter is not 0, 1 or 2"),
    ("live_noise_scale_nan", set_live(T.L_NOISE_SCALE, float("nan")), "table row 1: noise scale counter"),
    ("live_misaligned", set_int(T.I_LIVE, lambda launch: launch.ints[1, T.I_LIVE] + 4),
     "table row 1: misaligned live counters"),
]

BACKENDS = [pytest.param(CPU, id="cpu"), pytest.param(TRITON, id="triton")]


def assert_refused(launch: Launch, message: str, **run) -> None:
    before = [t.clone() for t in launch.tensors()]
    with pytest.raises(ValueError, match=message):
        launch.run(**run)
    for got, want in zip(launch.tensors(), before):  # bit for bit (a corrupted counter may be NaN)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_tables_launch(backend):
    """The control: the uncorrupted tables run, change the weights and advance the counters."""
    launch = Launch(backend)
    before = [p.clone() for p in launch.params]
    launch.run()
    assert all(not torch.equal(p, b) for p, b in zip(launch.params, before))
    assert launch.live[:, T.L_STEP].tolist() == [5.0, 5.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,corrupt,message", TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_corrupted_table_is_refused_with_nothing_changed(backend, name, corrupt, message):
    launch = Launch(backend)
    corrupt(launch)
    assert_refused(launch, message)


@pytest.mark.parametrize("name,corrupt,message", LIVE_CASES, ids=[c[0] for c in LIVE_CASES])
def test_corrupted_live_counters_are_refused_by_the_cpu_library(name, corrupt, message):
    launch = Launch(CPU)
    corrupt(launch)
    assert_refused(launch, message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_launch_arguments_are_refused(backend):
    launch = Launch(backend)
    assert_refused(launch, "unknown op 7", op=7)
    assert_refused(launch, r"commit_rows 3 outside \[0, 2\]", commit_rows=3)
    with pytest.raises(ValueError, match=r"ints table must have shape \[N, 14\]"):
        backend.launch(T.OP_SGD, torch.float32, torch.from_numpy(launch.ints[:, :5].copy()),
                       torch.from_numpy(launch.floats), torch.from_numpy(launch.blocks), SEED)
    with pytest.raises(ValueError, match="floats table must be torch.float32"):
        backend.launch(T.OP_SGD, torch.float32, torch.from_numpy(launch.ints),
                       torch.from_numpy(launch.floats).double(), torch.from_numpy(launch.blocks), SEED)
    with pytest.raises(ValueError, match="ints and floats tables disagree"):
        backend.launch(T.OP_SGD, torch.float32, torch.from_numpy(launch.ints),
                       torch.from_numpy(launch.floats[:1].copy()), torch.from_numpy(launch.blocks), SEED)


def test_prepared_launch_checks_the_columns_rewritten_between_calls():
    """A host-mode CPU step prepares its launch once and rewrites num_iters, the flags and the
    counters in place: each call checks them again."""
    launch = Launch(CPU)
    ints, floats, blocks = (torch.from_numpy(a) for a in (launch.ints, launch.floats, launch.blocks))
    prepared = CPU.prepare(T.OP_SGD, torch.float32, ints, floats, blocks, SEED, commit_rows=2)
    launch.ints[0, T.I_NUM_ITERS] = 0
    before = [t.clone() for t in launch.tensors()]
    with pytest.raises(ValueError, match="table row 0: num_iters must be at least 1, got 0"):
        prepared()
    assert all(torch.equal(got, want) for got, want in zip(launch.tensors(), before))
    launch.ints[0, T.I_NUM_ITERS] = 3
    launch.live[1, T.L_NOISE_TYPE] = 3.0
    with pytest.raises(ValueError, match="table row 1: noise type counter"):
        prepared()
    launch.live[1, T.L_NOISE_TYPE] = 2.0
    prepared()
    assert launch.live[:, T.L_STEP].tolist() == [5.0, 5.0]


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_num_iters_zero_edited_mid_run_changes_nothing(backend):
    """num_iters = 0 written into a param group between steps (len() of an empty loader) was a
    SIGFPE in the CPU kernel (and no noise at all, silently, on the torch backend): now a
    ValueError, the weights and state as they were, and the run goes on once the group is
    corrected."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(37))
    opt = nvrm_ext.FusedVSGD([p], lr=0.1, momentum=0.9, variability=0.05, num_iters=4, seed=1, backend=backend)
    p.grad = torch.randn(37)
    opt.step()
    weights, state = p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    opt.param_groups[0]["num_iters"] = 0
    with pytest.raises(ValueError):
        opt.step()
    assert torch.equal(p.detach(), weights)
    for key, value in state.items():
        assert torch.equal(opt.state[p][key], value) if torch.is_tensor(value) else opt.state[p][key] == value
    opt.param_groups[0]["num_iters"] = 4
    opt.step()
    assert not torch.equal(p.detach(), weights)
