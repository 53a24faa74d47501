"""The noise engine: a torch.optim.Optimizer that owns the seed, the per-parameter noise counters,
the weight records, the noisy copies and the launches that move the noise.

An NVRM step perturbs the weights with fresh noise after the update and removes the previous
noise, so the gradient is taken at w + b while the optimizer tracks the clean w. Here the noise
is a function (docs/noise.md), not a buffer: per parameter we keep only the base optimizer's
state plus O(1) bookkeeping -- which step's noise is on the weights, of which type and scale --
and one launch per (device, dtype) bucket regenerates the old noise, applies the update and adds
the new noise. The update is the subclass's (its UpdateRule): FusedVSGD / FusedVAdam fuse SGD /
Adam into that launch; NVRM's NoiseSwap has none (tables.OP_NOISE) and runs after any inner
optimizer's step. This module is the step; checkpoint.py, denoise.py and records.py hold the
rest of the engine, launch/ the launch tables and launches (docs/architecture.md).
"""
from __future__ import annotations

import itertools
import operator

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required

from .. import _compiler
from . import weights
from ..backends import select, tables as T
from ..backends.select import NVRM_BACKENDS
from . import relative, validation as V
from .checkpoint import CheckpointMixin
from .denoise import DenoiseMixin
from .keys import SEED_KEY
from .params import _capture_underway, _capturing, _global_offset, _is_dense, _local, _number, _refuse_capture
from .records import WeightRecordsMixin, WeightsChangedError
from .seed import broadcast_seed, draw_seed, is_seed
from .launch.bucket import BlockTables, BucketWork, launch
from .launch.capturable import launch_capturable
from .launch.plan import UpdateRule, _BucketPlan
from .launch.steady import _StepLayout, steady_work

BACKENDS = NVRM_BACKENDS
_PARAMS = operator.itemgetter("params")
_ROW_PARAM = operator.itemgetter(2)  # the param of a (key, group, param, grad) row


class NoiseEngine(CheckpointMixin, DenoiseMixin, WeightRecordsMixin, Optimizer):
    """Base class of FusedVSGD, FusedVAdam and NVRM's NoiseSwap (not used directly).

    Subclasses set `_op` (tables.OP_SGD / OP_ADAM / OP_NOISE) and implement `_validate_group`
    and the three functions of their UpdateRule (launch/plan.py): `_state_signature(group)` (which state tensors a group needs),
    `_state_tensors(group, p, state)` (create them; the I_STATE0..2 tensors and whether a fresh
    buffer needs FLAG_MOMENTUM_INIT) and `_group_row(group)` (static flags and float64 columns;
    the step-dependent columns are resolved from the counters, tables.resolve_rows).
    """

    _op: int
    # True where another optimizer's update runs between check_weights_before_update() and the
    # step (NVRM): the step then trusts the weights, which that update changed on purpose.
    _checks_weights_first = False

    def __init__(self, params, defaults: dict, *, seed: int | None, backend: str, denoise: bool,
                 capturable: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(BACKENDS)})")
        if seed is None:
            seed = draw_seed()
        if not is_seed(seed):
            raise ValueError(f"Invalid seed: {seed!r} (expected an integer in [0, 2**64))")
        self._backend_name = backend
        self._seed = broadcast_seed(int(seed))  # copied into every group as SEED_KEY
        self._denoise = bool(denoise)
        if not isinstance(capturable, bool):
            raise ValueError(f"Invalid capturable: {capturable!r} (expected True or False)")
        self._capturable = capturable
        self._block_tables = BlockTables()
        self._plans: dict = {}
        self._retired_plans: list = []  # replaced plans a captured CUDA graph may still replay
        self._held = None  # while the noise is removed: [(param, noisy copy, compensation copy | None)]
        self._held_noise: list = []  # the noise on each held copy (step, type code, scale), as _held
        self._removal_id = 0  # which entry into the removed state made _held (remove_noise or a load)
        self._records: dict = {}  # param -> weights record (see _record_weights)
        self._loaded: list = []  # what the last load says is on the weights, until checked (weights.check_loaded)
        self._layout = None  # the last full step's participants (_StepLayout), for _steady_work
        self._spreads_before_update = None  # relative groups under NVRM: see check_weights_before_update
        self._work_before_update = None  # the steady work check_weights_before_update found
        self._group_watch = V.GroupWatch()  # re-validates the param groups when an entry changes
        self._hyperparameters = tuple(defaults)  # what a group must hold (torch adds keys of its own)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ hyperparameters
    def add_param_group(self, param_group: dict) -> None:
        """Validate the group (with defaults filled in) before it is added, so nothing is lost."""
        probe = dict(param_group)
        for name, default in self.defaults.items():
            if default is required and name not in probe:
                raise ValueError(f"parameter group didn't specify a value of required optimization parameter {name}")
            probe.setdefault(name, default)
        probe.pop("params", None)
        self._validate_group(probe)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise ValueError(
                    f"{type(self).__name__} supports real floating-point parameters only, "
                    f"got a parameter of dtype {p.dtype}")
            if isinstance(p, torch.Tensor):
                V.check_parameter(f"{type(self).__name__}: a parameter", _local(p), _is_dense)
            if isinstance(p, torch.Tensor):
                _global_offset(p)  # raises for shardings the noise cannot follow
        self._check_backends(p for p in params if isinstance(p, torch.Tensor))
        seed = self._sync_seed() if self.param_groups else self._seed  # the groups may have been loaded
        if param_group.get(SEED_KEY, seed) != seed:
            raise ValueError(f"parameter group has {SEED_KEY}={param_group[SEED_KEY]!r}, but this optimizer's "
                             f"seed is {seed}; all groups share one seed")
        super().add_param_group({**param_group, "params": params, SEED_KEY: seed})
        self.param_groups[-1]["num_iters"] = probe["num_iters"]  # normalized: 1e3 -> 1000

    def _validate_group(self, group: dict) -> None:
        """Every hyperparameter the kernels read, checked wherever a group enters: construction,
        add_param_group, an edit between steps (step() re-validates changed groups) and a load."""
        group.setdefault("relative", False)  # groups saved before relative variability existed
        V.check_group_keys(group, self._hyperparameters)
        V.check_flag("relative", group["relative"])
        lr = group["lr"]
        V.check_lr(lr, read_tensor=not (isinstance(lr, torch.Tensor) and _capturing(lr.device)))
        V.check_number("Invalid variability", group["variability"])
        group["num_iters"] = V.check_num_iters(group["num_iters"])
        V.check_noise_type(group["noise_type"])
        V.check_number("Invalid weight_decay value", group["weight_decay"])


    @property
    def capturable(self) -> bool:
        """Whether the per-parameter counters live on the device (see the class docstring)."""
        return self._capturable

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # torch.amp.GradScaler then hands step() `grad_scale` and `found_inf` (attributes) and
        # skips nothing itself; only live counters can skip a step without the host knowing.
        return self._capturable


    def _flat_params(self) -> list:
        """The parameters in state_dict index order (flattened in C: a steady step lists them)."""
        return list(itertools.chain.from_iterable(map(_PARAMS, self.param_groups)))

    def _host_lr(self, group: dict) -> float:
        """The lr a table row carries. A tensor lr is read on the host (a device sync) except
        in capturable mode, where its rows are refreshed on the device instead (0.0 here)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return 0.0 if self._capturable else lr.item()
        return float(lr)

    # ------------------------------------------------------------------ backends
    def _resolve_backend(self, device: torch.device, dtype: torch.dtype):
        """The backend object for one bucket (backends.select); raises if the explicit choice
        cannot run there."""
        return select.nvrm_backend(self._backend_name, device, dtype)

    def _check_backends(self, params) -> None:
        for device, dtype in T.by_bucket(params):
            self._resolve_backend(device, dtype)

    # ------------------------------------------------------------------ the step
    def _participants(self):
        """(key, group, param, grad) for every parameter with a gradient, validated first."""
        out = []
        key = 0
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    if g.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                           f"(parameter {key}, shape {tuple(p.shape)})")
                    if g.shape != p.shape:
                        raise RuntimeError(f"gradient of parameter {key} has shape {tuple(g.shape)}, "
                                           f"the parameter {tuple(p.shape)}")
                    out.append((key, group, p, g))
                key += 1
        return out

    def step(self, closure=None):
        """One step for every parameter with a gradient: remove the old noise, apply the base
        update at the perturbed weights, add fresh noise. Returns the closure's loss."""
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure=None):
        """step() without the hooks torch wraps around it (NVRM calls its engine's step here: the
        hooks of the NVRM step the user called are the ones that run)."""
        if self._held is not None:
            raise RuntimeError(f"{type(self).__name__}.step() while the noise is removed (remove_noise(), or "
                               "inside denoised()): the forward pass must see the noisy weights; call "
                               "restore_noise() (or leave the denoised() block) first")
        if not self._capturable and _capture_underway():  # the message only then: a step's host time counts
            _refuse_capture(f"{type(self).__name__}.step() with capturable=False: its step counters "
                            "live on the host, so every replay would re-apply the captured step's "
                            "noise; construct the optimizer with capturable=True")
        # GradScaler's fused protocol sets these on the instance (and deletes them after the step):
        # a dict lookup, not a getattr that raises AttributeError at every other step
        grad_scale = self.__dict__.get("grad_scale")
        found_inf = self.__dict__.get("found_inf")
        if (grad_scale is not None or found_inf is not None) and not self._capturable:
            raise RuntimeError(
                f"{type(self).__name__}: grad_scale / found_inf need capturable=True (the step "
                "counters must live on the device to skip a step there); without it, GradScaler "
                "unscales and skips steps itself")
        for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if value is not None and not (isinstance(value, torch.Tensor) and value.numel() == 1):
                raise TypeError(f"{name} must be a one-element tensor, got {value!r}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_all(grad_scale, found_inf)
        return loss

    @_compiler.disable
    def _step_all(self, grad_scale=None, found_inf=None) -> None:
        """The step proper. Opaque to torch.compile: host-side table building and one launch
        per bucket, nothing for the compiler to fuse, so a compiled training step breaks its
        graph once here instead of tracing (and breaking) through every line.

        Every bucket is checked and its tables built before any is launched: an invalid value in
        one bucket must not leave another stepped."""
        self._group_watch.validate(self.param_groups, self._validate_group)
        work, self._work_before_update = self._work_before_update, None
        if work is None:
            work = self._steady_work()
        if work is None:  # the state or the layout changed (a load, a cleared state, ...)
            weights.reconcile(self)
            work = self._prepare_work()
            if work is None:
                return
        for bucket, _, plan, _, _ in work:  # all before any launch: an error changes nothing
            # (weights_unchanged() also reads the version counters record_weights builds on)
            if not _capturing(bucket[0]) and not plan.weights_unchanged() and not self._checks_weights_first:
                self._check_weights(plan.params, plan.states, plan.param_tensors)
        spreads, self._spreads_before_update = self._spreads_before_update, None
        tables = [plan.tables(grads, grad_pointers, spreads) for _, _, plan, grads, grad_pointers in work]
        for (bucket, _, plan, _, _), (ints, _) in zip(work, tables):
            if plan.live is None:
                plan.ready_host_launch(bucket, ints, self._seed)
        for (bucket, backend, plan, grads, _), (ints, floats) in zip(work, tables):
            if plan.live is None:
                plan.host_launch(bucket, ints, floats, self._seed)
            else:
                launch_capturable(plan, backend, bucket, grads, ints, floats, self._seed, grad_scale, found_inf,
                                  owner=type(self).__name__)
            if not _capturing(bucket[0]):  # a replay cannot bump them: see bump_versions
                plan.bump_versions()
                plan.record_weights()
        if self._loaded:
            weights.forget_stepped(self)

    @_compiler.disable
    def check_weights_before_update(self) -> None:
        """What a step checks before it changes anything -- the param groups, the seed, a load's
        samples, weights rewritten since our last operation -- for a caller (NVRM) that runs
        another optimizer's update on the weights before this optimizer's step."""
        if self._held is not None:
            raise RuntimeError(f"{type(self).__name__}.step() while the noise is removed (remove_noise(), or "
                               "inside denoised()): the forward pass must see the noisy weights; call "
                               "restore_noise() (or leave the denoised() block) first")
        self._group_watch.validate(self.param_groups, self._validate_group)
        self._sync_seed()
        # The update in between changes values only, not what the steady path compares: the step
        # takes this work as it is. Without it the step rebuilds launch data: check what it will read.
        self._work_before_update = self._steady_work()
        if self._work_before_update is None:
            weights.reconcile(self)
            self._checked_members()
        elif self._loaded:
            weights.reconcile(self)
        for plan in self._plans.values():
            if plan.params and not _capturing(plan.params[0].device) and not plan.weights_unchanged():
                self._check_weights(plan.params, plan.states, plan.param_tensors)
        self._spreads_before_update = (relative.measure_live_before_update(self, self._work_before_update)
                                       if self._capturable else relative.measure_before_update(self.param_groups,
                                                                                               self.state))

    def _checked_members(self) -> tuple:
        """The participants by (device, dtype) bucket and each bucket's backend, every value a
        (re)built plan would take checked (raises before anything changes)."""
        members = T.by_bucket(self._participants(), _ROW_PARAM)
        resolved = {bucket: self._resolve_backend(*bucket) for bucket in members}
        self._sync_seed()
        self._check_rows([row for bucket, rows in members.items() if self._plan_stale(bucket, rows, resolved[bucket])
                          for row in rows])
        return members, resolved

    def _prepare_work(self):
        """The full path of a step: validate every gradient, bucket the parameters by (device,
        dtype) and (re)build their plans. Returns [BucketWork], or None
        for a step that only creates the state (_is_state_init_step); remembers the layout so
        that the next steps can take _steady_work."""
        members, resolved = self._checked_members()
        state_only = self._is_state_init_step(members)
        work = [BucketWork(bucket, resolved[bucket], self._bucket_plan(bucket, bucket_members, resolved[bucket]),
                           [g for _, _, _, g in bucket_members], None)
                for bucket, bucket_members in members.items()]  # creates missing state
        if state_only:
            self._layout = None
            return None
        self._layout = _StepLayout(self.state, self.param_groups, self._flat_params(), [[key for key, _, _, _ in rows] for rows in members.values()], work)
        return work


    def _steady_work(self):
        """The work of a step laid out like the last full one (launch/steady.py), or None."""
        return steady_work(self._layout, self.state, self.param_groups, self._flat_params, self._seed)

    def _launch(self, backend, op: int, bucket, rows, ints: np.ndarray, floats: np.ndarray,
                blocks=None, *, commit_rows: int = 0, samples=None) -> None:
        """One launch over the rows of one bucket with this optimizer's seed (launch/plan.py)."""
        launch(backend, op, bucket, rows, ints, floats, self._seed, blocks, self._block_tables,
               commit_rows=commit_rows, samples=samples)

    def _is_state_init_step(self, members: dict) -> bool:
        """torch.distributed.checkpoint's _init_optim_state (get_/set_optimizer_state_dict on a
        fresh optimizer) calls step() with all-zero gradients and every lr set to 0 only to
        create the state. Such a first step must not perturb the weights: it only creates the
        state. The gradients are read (a sync) only when the state is empty and every lr is 0."""
        if any(self.state.values()) or not members:
            return False
        for group in self.param_groups:
            lr = group.get("lr", 1.0)  # an optimizer without an lr (NVRM's inner one) never has such a step
            if isinstance(lr, torch.Tensor):
                if _capturing(lr.device):
                    return False
                lr = lr.item()
            if lr != 0:
                return False
        return not any(bool(torch.any(_local(g) != 0)) for bucket_members in members.values()
                       for _, _, _, g in bucket_members)


    def _bucket_plan(self, bucket, members, backend) -> "_BucketPlan":
        """The cached launch data of a bucket, rebuilt when anything it holds an address of or
        a reference to changes: the parameters (or their storage: `p.data = other`), their
        state dicts (a cleared optimizer.state, load_state_dict) or their groups' state needs."""
        plan = self._plans.get(bucket)
        if self._plan_stale(bucket, members, backend):
            if _capturing(bucket[0]):
                raise RuntimeError(
                    f"{type(self).__name__}: the launch data must be rebuilt (first step, or the "
                    "parameters, their state or their groups changed) while a CUDA graph is being "
                    "captured; run one step() eagerly after such changes, then capture")
            if plan is not None and plan.live is not None and plan._graph_owned:
                self._retired_plans.append(plan)  # a captured graph still reads and writes it
                select.warn_once("nvrm_ext: the launch data of a CUDA-graph-captured step was rebuilt (the "
                           "parameters, their state or their groups changed); graphs captured before "
                           "still update the old copy: capture them again")
            if plan is not None:  # a reset state got its noise back before (weights.refill_cleared)
                plan.spill_weights_record(self._records)
            plan = self._plans[bucket] = _BucketPlan(
                UpdateRule(self._op, self._state_signature, self._state_tensors, self._group_row), members,
                backend, states=self.state, denoise=self._denoise, capturable=self._capturable,
                block_tables=self._block_tables, owner=type(self).__name__)
            plan.signature = self._plan_signature(members)  # with the state dicts it created
        return plan

    def _plan_stale(self, bucket, members, backend) -> bool:
        plan = self._plans.get(bucket)
        return plan is None or plan.signature != self._plan_signature(members) or plan.backend is not backend

    def _check_rows(self, members) -> None:
        """Before launch data is (re)built from these (key, group, param, grad) rows: every
        parameter, counter and state tensor as a launch will read it (validation.py), and no
        parameter that carries this optimizer's noise in another dtype, shape or memory order
        than the noise was put on with (that noise follows the old layout: removing it in the
        new one would corrupt the weights). Raises before anything changes."""
        name = type(self).__name__
        before = self._planned_layouts()
        for key, _, p, _ in members:
            where = f"{name}: parameter {key}"
            local = _local(p)
            V.check_parameter(where, local, _is_dense)
            state = self.state.get(p)
            if not state:
                continue
            # capturable counters on a GPU are not read (a sync per value); on the CPU they are
            V.check_counters(f"{where}'s state", state, read=not self._capturable or local.device.type == "cpu")
            if "noise_step" in state and not {"noise_type", "noise_scale"} <= set(state) \
                    and _number(state["noise_step"]):
                raise ValueError(f"{where}'s state says noise step {state['noise_step']!r} is on the weights "
                                 "but lacks its noise_type or noise_scale")
            self._check_layout(before, key, p, state)
            V.check_state_tensors(where, local, {k: _local(v) for k, v in state.items() if k in V.STATE_TENSOR_KEYS})

    def _planned_layouts(self) -> dict:
        """id(param) -> (its state dict, dtype, shape, strides) when the current plans were built."""
        before = {}
        for plan in self._plans.values():
            before.update(zip(map(id, plan.params), zip(plan.states, *zip(*plan.layouts))))
        return before

    def _check_layout(self, before: dict, key: int, p, state: dict) -> None:
        """Raise if `p` carries noise in another layout than its plan had (see _check_rows)."""
        old, local = before.get(id(p)), _local(p)
        if old is not None and old[0] is state and old[1:] != (local.dtype, tuple(local.shape), local.stride()) \
                and _number(state.get("noise_step", 0)):
            self._raise_layout_changed(key, old[1:], local)

    def _raise_layout_changed(self, key: int, old: tuple, now: torch.Tensor) -> None:
        changes = [f"its {what} from {a} to {b}" for what, a, b in zip(
            ("dtype", "shape", "strides"), old, (now.dtype, tuple(now.shape), now.stride())) if a != b]
        raise WeightsChangedError(
            f"{type(self).__name__}: parameter {key} changed {' and '.join(changes)} (p.data = ...) while it "
            "carried the optimizer's noise, which was put on in the old layout (the noise follows the "
            "elements' memory order), so it cannot be removed in the new one; nothing was changed. Give the "
            "parameter back its layout (e.g. p.data = p.data.contiguous() or p.data.to(dtype)) and step, or "
            "call optimizer.reset_noise() to take the weights as they are (the current noise stays on them) "
            "-- state tensors of another dtype or shape must then be converted or dropped (del optimizer.state[p])")


    def _plan_signature(self, members) -> tuple:
        """What a plan is built from: per row its key, group (a parameter moved to another
        group takes that group's hyperparameters), parameter, storage and its layout, state dict
        (and whether that dict is empty: cleared in place) and the state tensors in it (one
        replaced in the dict, say a momentum reset, must be the one the kernel writes)."""
        state = self.state
        groups = {id(group): group for _, group, _, _ in members}
        tensors = [_local(p) for _, _, p, _ in members]
        return (tuple((key, id(group), id(p), t.data_ptr(), t.nbytes, t.dtype, t.shape, t.stride(), id(state.get(p)),
                       bool(state.get(p)), tuple(id(state.get(p, {}).get(k)) for k in V.STATE_TENSOR_KEYS))
                      for (key, group, p, _), t in zip(members, tensors)),
                tuple((gid, self._state_signature(group)) for gid, group in groups.items()))


NeuralVariableOptimizer = NoiseEngine  # its former name
