"""What every neural-variable optimizer shares.

An NVRM step perturbs the weights with fresh noise after the update and removes the previous
noise, so the gradient is taken at w + b while the optimizer tracks the clean w. Here the noise
is a function (docs/noise.md), not a buffer: per parameter we keep only the base optimizer's
state plus O(1) bookkeeping -- which step's noise is on the weights, of which type and scale --
and one launch per (device, dtype) bucket regenerates the old noise, applies the update and adds
the new noise.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import numbers
import operator
import struct
import warnings

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required

from .. import _compiler, noise as spec
from . import weights
from ..backends import tables as T
from ..backends.torch_ref import TORCH
from . import relative
from . import validation as V

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
STATE_DICT_KEY = "nvrm"
SEED_KEY = "nvrm_seed"          # param_groups entry: where every checkpoint path keeps groups
NOISY_PARAM_KEY = "noisy_param"  # per-parameter state, only in a state_dict taken while the noise is removed
NOISY_COMPENSATION_KEY = "noisy_compensation"
NOISY_STEP_KEY = "noisy_noise_step"  # the noise step the held copies carry (noise_step itself says 0)
NOISY_KEYS = (NOISY_PARAM_KEY, NOISY_COMPENSATION_KEY, NOISY_STEP_KEY)
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the fused kernels store
_MAX_CACHED_LAYOUTS = 32  # block tables kept per optimizer (one per bucket in steady state)
# C-level getters for the per-tensor scans of a steady step (a Python-level loop costs several times more)
_GRAD = operator.attrgetter("grad")
_PARAMS = operator.itemgetter("params")
_VERSION = operator.attrgetter("_version")
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_STRIDE = torch.Tensor.stride
_DATA_PTR = torch.Tensor.data_ptr
_increment_versions = torch._C._increment_version  # torch.autograd.graph.increment_version's C call: a list in one go
_HOST_COUNTER_KEYS = T.LIVE_STATE_KEYS[:T.L_FRESH]  # what optimizer.state holds in host mode
_exhaust = collections.deque(maxlen=0).extend  # runs an iterator to its end in C
_REMOVALS = itertools.count(1)  # numbers every entry into the removed state (NeuralVariableOptimizer._removal_id)
_DOUBLES = struct.Struct(f"{T.FLOAT_COLUMNS}d")  # a group's float row, compared bit for bit
_DOUBLE = struct.Struct("d")


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill its storage span exactly once."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in reversed(spec.memory_order_permutation(t)):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


class WeightsChangedError(RuntimeError):
    """The parameters were changed outside the optimizer (model.load_state_dict, copy_, ...)
    while it believed its noise was on them: removing or regenerating that noise would corrupt
    them, so nothing was changed."""


def _fp32(values) -> tuple:
    """Round host-computed (float64) constants to float32 once, as the kernels will see them."""
    return tuple(np.asarray(values, dtype=np.float32).tolist())


def _is_seed(value) -> bool:
    """Whether `value` is a valid 64-bit noise seed (an integer in [0, 2**64), not a bool)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and 0 <= value < 2**64


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def draw_seed() -> int:
    """A 64-bit seed from torch's default generator, so torch.manual_seed governs it."""
    hi, lo = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return (hi << 32) | lo


def broadcast_seed(seed: int) -> int:
    """Rank 0's seed on every rank when a process group is initialised: data-parallel replicas
    must draw the same noise or they drift apart."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return seed
    backend = str(dist.get_backend())
    on_gpu = "nccl" in backend and "gloo" not in backend
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    words = torch.tensor([seed >> 32, seed & 0xFFFFFFFF], dtype=torch.int64, device=device)
    dist.broadcast(words, src=0)
    hi, lo = words.tolist()
    return (hi << 32) | lo


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return ()
    return DTensor


_DTENSOR = None


def _is_dtensor(t) -> bool:
    global _DTENSOR
    if _DTENSOR is None:
        _DTENSOR = _dtensor_type()
    return isinstance(t, _DTENSOR)


def _local(t):
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise (None stays None)."""
    return t.to_local() if _is_dtensor(t) else t


_COMPENSATED_DTYPES = (torch.float16, torch.bfloat16)


def _compensation(p, state):
    """The compensation buffer of a 16-bit parameter (created on first use), else None.

    Adding and subtracting noise in an 8- or 11-bit mantissa would round the clean weights
    away (w + n - n != w); the buffer keeps what each rounding dropped, so the weight is
    param + compensation, exact to about twice the storage precision (2 bytes per parameter).
    """
    if p.dtype not in _COMPENSATED_DTYPES:
        return None
    if "compensation" not in state:
        state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state["compensation"]


def _global_offset(p) -> int:
    """Global index of the first local element: noise follows the global element index, so a
    sharded run draws exactly the unsharded run's noise. Supports shards along dim 0
    (FSDP2's layout) and replication."""
    if not _is_dtensor(p):
        return 0
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(pl, Shard) and pl.dim != 0 for pl in p.placements):
        raise ValueError(f"DTensor parameters sharded along a dimension other than 0 are not "
                         f"supported (placements {p.placements}); FSDP2's default is Shard(0)")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) * math.prod(p.shape[1:]) if p.dim() else 0


class NeuralVariableOptimizer(Optimizer):
    """Base class of FusedVSGD and FusedVAdam (not used directly).

    Subclasses set `_op` (tables.OP_SGD / OP_ADAM) and implement `_validate_group` and the
    hooks of `_BucketPlan`: `_state_signature(group)` (which state tensors a group needs),
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
        if not _is_seed(seed):
            raise ValueError(f"Invalid seed: {seed!r} (expected an integer in [0, 2**64))")
        self._backend_name = backend
        self._seed = broadcast_seed(int(seed))  # copied into every group as SEED_KEY
        self._denoise = bool(denoise)
        if not isinstance(capturable, bool):
            raise ValueError(f"Invalid capturable: {capturable!r} (expected True or False)")
        self._capturable = capturable
        self._block_tables: dict = {}
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

    # ------------------------------------------------------------------ seed and state_dict
    def __getstate__(self):
        # torch's Optimizer pickles only defaults, state and param_groups; keep the seed too
        state = super().__getstate__()
        state.update(_seed=self._seed, _backend_name=self._backend_name, _denoise=self._denoise,
                     _hyperparameters=self._hyperparameters,
                     _capturable=self._capturable, _held=self._held, _removal_id=self._removal_id,
                     _held_noise=self._held_noise)
        return state

    def __setstate__(self, state):
        # load_state_dict passes only state and param_groups: keep the mode this optimizer has
        state.setdefault("_capturable", getattr(self, "_capturable", False))
        state.setdefault("_held", None)
        state.setdefault("_held_noise", getattr(self, "_held_noise", []))
        state.setdefault("_removal_id", 0)
        state.setdefault("_hyperparameters", getattr(self, "_hyperparameters", None) or tuple(
            name for name in state.get("defaults", {}) if name not in ("differentiable", "foreach", "fused", "maximize")))
        super().__setstate__(state)
        for group in self.param_groups:  # pickles of format 1 kept the seed only as an attribute
            group.setdefault(SEED_KEY, self._seed)
        self._block_tables = {}
        # load_state_dict comes here too: plans a captured CUDA graph still replays stay alive
        self._retired_plans = getattr(self, "_retired_plans", []) + [
            plan for plan in getattr(self, "_plans", {}).values()
            if plan.live is not None and plan._graph_owned]
        self._plans = {}
        self._records = {}
        self._loaded = []  # load_state_dict sets it after this
        self._layout = None
        self._group_watch = V.GroupWatch()
        self._spreads_before_update = None
        self._work_before_update = None

    @property
    def seed(self) -> int:
        """The 64-bit seed of the noise (part of the optimizer state, kept in every param group)."""
        return self._sync_seed()

    def _sync_seed(self) -> int:
        """The seed as the param groups say. They are the source of truth because some checkpoint
        paths restore only the groups and the per-parameter state (ZeroRedundancyOptimizer's load
        syncs the groups into the local optimizer without calling load_state_dict)."""
        seeds = {group.setdefault(SEED_KEY, self._seed) for group in self.param_groups}
        if len(seeds) != 1:
            raise ValueError(f"{type(self).__name__}: the param groups disagree on the noise seed "
                             f"({SEED_KEY} = {sorted(seeds)}); all groups must share one seed")
        seed = seeds.pop()
        if not _is_seed(seed):
            raise ValueError(f"{type(self).__name__}: invalid {SEED_KEY} {seed!r} in the param groups "
                             "(expected an integer in [0, 2**64))")
        if seed != self._seed:
            self._refuse_seed_change(int(seed))
        self._seed = int(seed)
        return self._seed

    def _refuse_seed_change(self, seed: int) -> None:
        """A new seed in the param groups is accepted with new per-parameter state (a loader
        that replaced the state dicts, as ZeroRedundancyOptimizer's does) or with no noise on the
        weights (reset_noise()). Noise that the state this optimizer tracks still carries was
        drawn with the old seed and could not be removed with the new one: refuse, changing
        nothing (the groups keep the new value until it is corrected)."""
        tracked = [s for plan in self._plans.values() for s in plan.states]
        if self._layout is not None:
            tracked += self._layout.state_values
        tracked_ids = {id(s) for s in tracked}
        if any(id(s) in tracked_ids and _number(s.get("noise_step", 0)) for s in self.state.values()):
            raise ValueError(
                f"{type(self).__name__}: the param groups' {SEED_KEY} changed from {self._seed} to {seed} while "
                f"the parameters carry noise drawn with {self._seed}, which only that seed can remove; set "
                f"{SEED_KEY} back to {self._seed}, or call reset_noise() first if the weights are clean "
                "(load_state_dict brings a seed together with its state)")

    @property
    def noise_removed(self) -> bool:
        """True between remove_noise() and restore_noise() (or inside denoised()): the
        parameters hold the clean weights and the optimizer holds the noisy ones."""
        return self._held is not None

    @property
    def removal_token(self) -> int:
        """Which entry into the removed state (remove_noise(), or a load of a state saved while
        removed) the held noisy copies come from; 0 before any."""
        return self._removal_id

    @property
    def capturable(self) -> bool:
        """Whether the per-parameter counters live on the device (see the class docstring)."""
        return self._capturable

    @property
    def carries_noise(self) -> bool:
        """Whether some parameter holds noise now: stepped since it was last clean, and the
        noise not removed. Reads the counters (a sync where they live on a device)."""
        return self._held is None and any(_number(state.get("noise_step", 0)) for state in self.state.values())

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # torch.amp.GradScaler then hands step() `grad_scale` and `found_inf` (attributes) and
        # skips nothing itself; only live counters can skip a step without the host knowing.
        return self._capturable

    def state_dict(self) -> dict:
        """torch's state_dict plus the seed (in every param group as SEED_KEY and in the
        top-level STATE_DICT_KEY entry). Taken while the noise is removed, it describes the clean
        weights the parameters hold then (noise_step 0, the clean compensation buffers), so a
        loader that keeps only the standard entries (ZeroRedundancyOptimizer's own load,
        torch.distributed.checkpoint) resumes from the clean weights with fresh noise: not the
        same trajectory, never wrong weights. As extras (NOISY_KEYS) it holds each noisy
        parameter's exact noisy copy and its noise step, which our load_state_dict() turns back
        into the removed state, so that path resumes bit for bit from a clean model file.
        Otherwise each parameter with noise on it gets its weight samples (weights.SAMPLES_KEY),
        from which a load tells a noisy model file from a clean or a foreign one."""
        seed = self._sync_seed()
        weights.reconcile(self, resolve=False)  # a cleared state still knows its noise
        sd = super().state_dict()
        rows = None
        if self._capturable:  # live counters -> plain numbers, the host-mode format
            rows = self._live_rows()
            sd["state"] = {index: _host_counters(state, rows.get(id(state)))
                           for index, state in sd["state"].items()}
        if self._held is not None:
            index_of = {id(p): index for index, p in enumerate(self._flat_params())}
            for p, noisy, compensation in self._held:
                index = index_of[id(p)]
                state = sd["state"][index] = dict(sd["state"][index])  # not the live state
                state[NOISY_STEP_KEY] = state["noise_step"]
                state["noise_step"] = 0  # what the (clean) parameters carry now
                state[NOISY_PARAM_KEY] = noisy
                if compensation is not None:
                    state[NOISY_COMPENSATION_KEY] = compensation
        else:
            self._add_weight_samples(sd["state"], rows)
        sd[STATE_DICT_KEY] = {"seed": seed, "format": 2, "optimizer": type(self).__name__}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters, per-parameter state *and the seed*, so a resumed run
        continues the identical noise sequence. The seed comes from the top-level
        STATE_DICT_KEY entry or, where a checkpoint path kept only state and param_groups
        (torch.distributed.checkpoint), from the groups' SEED_KEY. A state_dict taken while the
        noise was removed leaves this optimizer in that state: restore_noise() then writes the
        saved noisy weights into the parameters (a plain state_dict discards noisy copies this
        optimizer held). Weight records are dropped: the loaded state describes the weights,
        checked against the weight samples it was saved with at the first noise operation
        (weights.check_loaded), when the model file has been loaded too, in either order."""
        seed = self._seed_of(state_dict)
        self._check_loadable(state_dict)
        states, held, samples = {}, {}, {}
        for index, s in state_dict.get("state", {}).items():
            if weights.SAMPLES_KEY in s:
                samples[index] = s[weights.SAMPLES_KEY]
            if NOISY_PARAM_KEY in s:
                s = dict(s)
                held[index] = (s.pop(NOISY_PARAM_KEY), s.pop(NOISY_COMPENSATION_KEY, None))
                s["noise_step"] = s.pop(NOISY_STEP_KEY, s["noise_step"])  # on the held copies
                s.pop(weights.SAMPLES_KEY, None)
            else:
                s = {k: v for k, v in s.items() if k not in NOISY_KEYS and k != weights.SAMPLES_KEY}
            states[index] = s
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        param_of = dict(zip(saved_ids, self._flat_params()))
        weights.check_samples_fit(samples, param_of, type(self).__name__)
        rest = {k: v for k, v in state_dict.items() if k != STATE_DICT_KEY}
        rest["state"] = states
        super().load_state_dict(rest)
        for group in self.param_groups:
            group[SEED_KEY] = seed
        self._seed = seed  # the new state dicts make the launch data rebuild
        self._forget_weights()
        self._loaded = weights.loaded_noise(self, param_of, samples, set(held))
        self._held = None
        if held:
            self._held, self._held_noise = [], []
            self._removal_id = next(_REMOVALS)
            for index, (noisy, compensation) in held.items():
                p = param_of[index]
                cast = {"device": p.device, "dtype": p.dtype}
                self._held.append((p, noisy.to(**cast), None if compensation is None else compensation.to(**cast)))
                s = states[index]
                self._held_noise.append((int(_number(s["noise_step"])), int(_number(s.get("noise_type", 0))),
                                         float(_number(s.get("noise_scale", 0.0)))))
        for p in self._flat_params():  # e.g. saved from a channels_last model: the kernels index state like p
            state = self.state.get(p)
            for key in V.STATE_TENSOR_KEYS if state else ():
                t = state.get(key)
                if isinstance(t, torch.Tensor) and not _is_dtensor(t) and t.stride() != p.stride():
                    state[key] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(t)

    def _add_weight_samples(self, states: dict, rows=None) -> None:
        """Give each noisy parameter's entry its weight samples (weights.SAMPLES_KEY): a loader
        can then tell the noisy weights from the clean ones and from others (weights.py).
        Loaded samples not checked yet are passed on as loaded. `rows`: _live_rows(), if read."""
        pending = {id(entry.state): entry for entry in self._loaded if not entry.checked}
        noisy = []
        for key, p, state, noise in self._noisy_parameters(rows):
            entry = pending.get(id(state))
            if entry is not None:  # the weights may not be loaded yet: pass the loaded samples on
                if entry.samples is not None:
                    states[key] = {**states[key], weights.SAMPLES_KEY: entry.samples}
            else:
                noisy.append((key, p, state, noise))
        for key, samples in weights.state_dict_samples(self, noisy).items():
            states[key] = {**states[key], weights.SAMPLES_KEY: samples}

    def _check_loadable(self, state_dict: dict) -> None:
        """Refuse, before anything is changed, a state_dict whose groups or per-parameter state
        the kernels could not use: torch's load would cast and assign first, and a malformed
        checkpoint must not reach a kernel (validation.py)."""
        name = f"{type(self).__name__}.load_state_dict"
        saved_groups, states = state_dict.get("param_groups"), state_dict.get("state", {})
        if not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups):
            raise ValueError(f"{name}: 'param_groups' must be a list of dicts with a 'params' list")
        if not isinstance(states, dict):
            raise ValueError(f"{name}: 'state' must be a dict, got a {type(states).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                                 "of optimizer's group")
            try:
                self._validate_group({k: v for k, v in saved.items() if k != "params"})
            except (ValueError, TypeError) as error:
                raise type(error)(f"{name}: param group {index}: {error}; nothing was loaded") from None
        param_of = dict(zip((i for g in saved_groups for i in g["params"]), self._flat_params()))
        for index, state in states.items():
            if index not in param_of:
                raise ValueError(f"{name}: state of parameter {index!r}, which no param group lists; "
                                 "nothing was loaded")
            V.check_loaded_state(f"{name}: state of parameter {index}", param_of[index], state)

    def _seed_of(self, state_dict: dict) -> int:
        """The seed a state_dict carries (validated), or a clear error."""
        name = type(self).__name__
        extra = state_dict.get(STATE_DICT_KEY)
        group_seeds = {group[SEED_KEY] for group in state_dict.get("param_groups", ()) if SEED_KEY in group}
        if extra is None and not group_seeds:
            raise ValueError(
                f"{name}.load_state_dict: this state_dict carries no noise seed (neither a "
                f"'{STATE_DICT_KEY}' entry nor '{SEED_KEY}' in its param_groups), so the noise on the "
                "weights could not be regenerated; it was not saved by an nvrm_ext optimizer, or a "
                "checkpoint path dropped both")
        if extra is not None:
            saved_by = extra.get("optimizer", name)
            if saved_by != name:
                raise ValueError(f"{name}.load_state_dict: this state_dict was saved by {saved_by}; its "
                                 f"per-parameter state does not fit {name}")
            group_seeds.add(extra["seed"])
        if len(group_seeds) != 1:
            raise ValueError(f"{name}.load_state_dict: the state_dict disagrees on the noise seed "
                             f"({sorted(group_seeds)}); nothing was loaded")
        seed = group_seeds.pop()
        if not _is_seed(seed):
            raise ValueError(f"{name}.load_state_dict: invalid seed {seed!r}; nothing was loaded")
        return int(seed)

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
        """The backend object for one bucket: TORCH or a FusedBackend; raises if the explicit
        choice cannot run there."""
        from ..backends import fused_backend

        name = self._backend_name
        if name == "torch":
            return TORCH
        if name == "auto":
            candidates = ("cuda", "triton") if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
            reasons = []
            for candidate in candidates:
                try:
                    backend = fused_backend(candidate)
                except ImportError as error:
                    reasons.append(f"{candidate}: {error}")
                    continue
                reason = backend.unavailable_reason(device, dtype)
                if reason is None:
                    if reasons:  # a faster backend could not run here: say why, and the fix
                        _warn_once(f"nvrm_ext: backend='auto' uses '{candidate}' for {dtype} parameters "
                                   f"on {device}, not {'; '.join(reasons)}")
                    return backend
                reasons.append(f"{candidate}: {reason}")
            if reasons and dtype in _FUSED_DTYPES:
                _warn_once(f"nvrm_ext: no fused backend for {dtype} parameters on {device.type} "
                           f"({'; '.join(reasons)}); using the much slower 'torch' backend")
            return TORCH
        try:
            backend = fused_backend(name)
        except ImportError as error:
            raise RuntimeError(f"backend={name!r} is not available: {error}") from error
        reason = backend.unavailable_reason(device, dtype)
        if reason is not None:
            raise RuntimeError(f"backend={name!r} cannot run {dtype} parameters on {device}: {reason}")
        return backend

    def _check_backends(self, params) -> None:
        for device, dtype in {(p.device, p.dtype) for p in params}:
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
                plan.ready_host_launch(bucket, ints)
        for (bucket, backend, plan, grads, _), (ints, floats) in zip(work, tables):
            if plan.live is None:
                plan.host_launch(bucket, ints, floats)
            else:
                self._launch_live(backend, bucket, plan, grads, ints, floats, grad_scale, found_inf)
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
        self._spreads_before_update = relative.measure_before_update(self.param_groups, self.state)

    def _checked_members(self) -> tuple:
        """The participants by (device, dtype) bucket and each bucket's backend, every value a
        (re)built plan would take checked (raises before anything changes)."""
        members: dict = {}
        for key, group, p, g in self._participants():
            members.setdefault((p.device, p.dtype), []).append((key, group, p, g))
        resolved = {bucket: self._resolve_backend(*bucket) for bucket in members}
        self._sync_seed()
        self._check_rows([row for bucket, rows in members.items() if self._plan_stale(bucket, rows, resolved[bucket])
                          for row in rows])
        return members, resolved

    def _prepare_work(self):
        """The full path of a step: validate every gradient, bucket the parameters by (device,
        dtype) and (re)build their plans. Returns [(bucket, backend, plan, grads, None)], or None
        for a step that only creates the state (_is_state_init_step); remembers the layout so
        that the next steps can take _steady_work."""
        members, resolved = self._checked_members()
        state_only = self._is_state_init_step(members)
        work = [(bucket, resolved[bucket], self._bucket_plan(bucket, bucket_members, resolved[bucket]),
                 [g for _, _, _, g in bucket_members], None)
                for bucket, bucket_members in members.items()]  # creates missing state
        if state_only:
            self._layout = None
            return None
        self._layout = _StepLayout(self, [[key for key, _, _, _ in rows] for rows in members.values()], work)
        return work

    def _steady_work(self):
        """The work of a step laid out like the last full one -- the same groups, the same
        parameters with gradients, in the same buckets and plans -- found with a few C-level
        scans instead of the full path's per-tensor validation (issue 11: a step's host time
        must not exceed torch's fused step). The buckets keep the backends the full path
        resolved (what can run where does not change within a process). Returns [(bucket,
        backend, plan, grads, grad addresses)], or None: then _prepare_work validates (raising
        its errors) and rebuilds."""
        layout = self._layout
        state = self.state
        if (layout is None or state is not layout.state or len(state) != len(layout.state_keys)
                or not all(map(operator.is_, state, layout.state_keys))
                or not all(map(operator.is_, state.values(), layout.state_values))):
            return None
        groups = self.param_groups
        if (len(groups) != len(layout.groups) or not all(map(operator.is_, groups, layout.groups))
                or [len(group["params"]) for group in groups] != layout.lengths):
            return None
        params = self._flat_params()
        if not all(map(operator.is_, params, layout.params)):
            return None
        grads = list(map(_GRAD, params))
        if layout.absent and any(grads[i] is not None for i in layout.absent):
            return None
        work = []
        for bucket, backend, plan, pick in layout.buckets:
            if not (plan.refs_see_cleared_states or all(plan.states)):  # a dict cleared in place: rebuild
                return None
            bucket_grads = grads if pick is None else pick(grads)
            grad_pointers = plan.steady_grad_pointers(bucket_grads)
            if grad_pointers is None:
                return None
            work.append((bucket, backend, plan, bucket_grads, grad_pointers))
        seed = self._seed  # the groups' (_sync_seed); any other value takes the full path
        if not all(group.get(SEED_KEY) == seed for group in groups):
            return None
        return work

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

    def _launch_live(self, backend, bucket, plan: "_BucketPlan", grads, ints, floats, grad_scale, found_inf):
        """Capturable mode: bring the persistent device tables up to date, then one launch that
        resolves, updates and commits (the commit is a second small kernel on CUDA / Triton);
        nothing is read back to the host."""
        device, dtype = bucket
        if backend is TORCH and _capturing(device):
            raise RuntimeError(f"{type(self).__name__}: the 'torch' backend reads the counters on the host "
                               "and cannot be captured in a CUDA graph; use backend='cuda' or 'triton'")
        plan.upload(ints, floats)
        plan.refresh_tensor_lrs()
        scale, skip = (None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)
                       for t in (grad_scale, found_inf))
        if backend is TORCH:
            TORCH.run(self._op, plan.rows(), plan.device_ints, plan.device_floats, self._seed,
                      live=plan.live, grad_scale=scale, found_inf=skip)
        else:
            backend.launch(self._op, dtype, plan.device_ints, plan.device_floats, plan.blocks, self._seed,
                           commit_rows=len(plan.params), grad_scale=scale, found_inf=skip, samples=plan.samples)
        if scale is not None:
            plan.write_back_converted(grads, skip)
            if backend is not TORCH and not _capturing(device):  # it unscaled them in place
                _increment_versions(plan._grads)
        plan.release_grads()

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
                _warn_once("nvrm_ext: the launch data of a CUDA-graph-captured step was rebuilt (the "
                           "parameters, their state or their groups changed); graphs captured before "
                           "still update the old copy: capture them again")
            if plan is not None:  # a reset state got its noise back before (weights.refill_cleared)
                plan.spill_weights_record(self._records)
            plan = self._plans[bucket] = _BucketPlan(self, members, backend)
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

    def _still_on_weights(self, on_weights: dict, params) -> dict:
        """The entries of `on_weights` (id(param) -> the noise a replaced plan left on it) whose
        parameter still holds what that plan left: the recorded storage and sample. A parameter
        rewritten since (say, clean weights copied in through p.data) carries none of that noise."""
        kept, tensors, recorded = [], [], []
        for p in params:
            record = self._records.get(id(p))
            if id(p) not in on_weights or record is None or record[0][2] != _local(p).data_ptr():
                continue
            _, taken, first, count = record
            kept.append(p)
            tensors.append(_local(p))
            recorded.append(taken[first:first + count])
        differ = _samples_differ(tensors, recorded) if kept else []
        return {id(p): on_weights[id(p)] for p, changed in zip(kept, differ) if not changed}

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

    def _launch(self, backend, op: int, bucket, rows, ints: np.ndarray, floats: np.ndarray,
                blocks=None, *, commit_rows: int = 0, samples=None) -> None:
        """One launch over the rows of one bucket. `rows`: what the torch backend reads per row,
        or a function that makes them (the fused backends never need them); `blocks`: the block
        table, where the caller keeps it; `commit_rows`, `samples`: see CompiledBackend.launch
        (fused backends only)."""
        if len(ints) == 0:
            return
        if backend is TORCH:
            TORCH.run(op, rows() if callable(rows) else rows, ints, floats, self._seed)
            return
        device, dtype = bucket
        if blocks is None:
            blocks = self._block_table(backend, device, ints)
        backend.launch(op, dtype, T.to_device(ints, device), T.to_device(floats, device), blocks, self._seed,
                       commit_rows=commit_rows, samples=samples)

    def _block_table(self, backend, device: torch.device, ints: np.ndarray) -> torch.Tensor:
        """The block table of these rows' sizes and offsets on `device`, cached per layout."""
        numels = tuple(ints[:, T.I_NUMEL].tolist())
        offsets = tuple(ints[:, T.I_OFFSET].tolist())
        layout = (device, backend.name, numels, offsets)
        blocks = self._block_tables.get(layout)
        if blocks is None:
            if len(self._block_tables) >= _MAX_CACHED_LAYOUTS:  # layouts that keep changing
                self._block_tables.clear()
            array = T.build_block_table(numels, offsets, backend.block_size)
            blocks = self._block_tables[layout] = T.to_device(array, device)
        return blocks

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def denoised(self):
        """Inside the block the parameters hold the clean weights; on exit the noisy weights
        come back bit for bit (exact copies are held meanwhile: one copy of the perturbed
        parameters, and of their 16-bit compensation buffers). Built on remove_noise() /
        restore_noise(). Blocks do not nest, and a block is refused while the noise is already
        removed: on exit it would have to choose between two owners of the noisy copies."""
        _refuse_capture(f"{type(self).__name__}.denoised(): it reads the noise bookkeeping on the host; "
                        "use it outside the captured region")
        if self._held is not None:
            raise RuntimeError(f"{type(self).__name__}: denoised() blocks do not nest, and denoised() is refused "
                               "while the noise is removed (remove_noise()); the weights are clean already, "
                               "and restore_noise() puts the noise back")
        self.remove_noise()
        try:
            yield self
        finally:
            self.restore_noise()

    @torch.no_grad()
    def remove_noise(self) -> None:
        """Put the clean weights into the parameters and hold exact copies of the noisy ones
        until restore_noise(); for callbacks whose evaluation does not fit one `with` block.
        No-op if the noise is already removed. step() is refused until restore_noise()."""
        if self._held is not None:
            return
        _refuse_capture(f"{type(self).__name__}.remove_noise(): it reads the noise bookkeeping on the host; "
                        "call it outside the captured region")
        self._sync_seed()
        weights.reconcile(self)
        noisy = self._noisy_parameters()
        before = self._planned_layouts()
        for key, p, state, _ in noisy:
            self._check_layout(before, key, p, state)
        self._check_weights([p for _, p, _, _ in noisy], [s for _, _, s, _ in noisy])
        held = [(p, p.detach().clone(),
                 None if state.get("compensation") is None else state["compensation"].clone())
                for _, p, state, _ in noisy]
        try:
            self._noise_launch(noisy)
        except BaseException:  # a launch refused (say, in a later bucket): put back what earlier ones changed
            for (p, copy, compensation), (_, _, state, _) in zip(held, noisy):
                _local(p).copy_(_local(copy))
                if compensation is not None:
                    _local(state["compensation"]).copy_(_local(compensation))
            raise
        self._removal_id = next(_REMOVALS)
        self._held_noise = [noise for _, _, _, noise in noisy]
        self._held = held

    @torch.no_grad()
    def restore_noise(self) -> None:
        """Write the held noisy weights (and compensation buffers) back into the parameters,
        bit for bit, whatever the parameters hold now. No-op if the noise is not removed."""
        if self._held is None:
            return
        for p, noisy, compensation in self._held:  # all first: a copy_ would broadcast a wrong shape
            for copy in (noisy, compensation):
                if copy is not None and (copy.shape != p.shape or copy.dtype != p.dtype or copy.device != p.device):
                    raise RuntimeError(
                        f"{type(self).__name__}.restore_noise(): a parameter is now {p.dtype} {tuple(p.shape)} on "
                        f"{p.device}, its held noisy copy {copy.dtype} {tuple(copy.shape)} on {copy.device} "
                        "(p.data was replaced since remove_noise()); nothing was changed: give it back its "
                        "layout, or call reset_noise() to drop the noisy copies and keep the weights as they are")
        weights.refill_held(self)  # a state cleared meanwhile: the copies still carry their noise
        held, self._held = self._held, None
        states = []
        for p, noisy, compensation in held:
            state = self.state[p]
            _local(p).copy_(_local(noisy))
            if compensation is not None:
                _local(_compensation(p, state)).copy_(_local(compensation))
            states.append(state)
        self._record_weights([p for p, _, _ in held], states)

    @torch.no_grad()
    def reset_noise(self) -> None:
        """Declare the parameters clean as they are now (e.g. after model.load_state_dict of a
        clean or best checkpoint): every parameter's noise record is dropped (noise_step 0;
        held noisy copies are discarded if the noise is removed) and the next step perturbs
        them afresh. The base optimizer's state (momentum, moments, steps) is kept."""
        _refuse_capture(f"{type(self).__name__}.reset_noise(): call it outside the captured region")
        self._held = None
        self._loaded = []
        self._forget_weights()
        for plan in self._plans.values():
            plan._committed = None  # its copy of the counters says noise; the dicts now say none
        for state in self.state.values():
            noise_step = state.get("noise_step")
            if isinstance(noise_step, torch.Tensor):
                noise_step.fill_(0)  # a view of the live counters (capturable): no sync
            elif noise_step is not None:
                state["noise_step"] = 0
            compensation = state.get("compensation")
            if compensation is not None:  # the weights as they are now are the clean weights
                compensation.zero_()

    @torch.no_grad()
    def clean_state_dict(self, module: torch.nn.Module) -> dict:
        """`module.state_dict()` holding clean copies of the parameters this optimizer
        perturbed; the live (perturbed) parameters are not touched. The copies are made by the
        same launch as denoised(), so they are bit-identical to what denoised() shows."""
        _refuse_capture(f"{type(self).__name__}.clean_state_dict(): it reads the noise bookkeeping on "
                        "the host; call it outside the captured region")
        self._sync_seed()
        state_dict = module.state_dict(keep_vars=True)
        if self._held is not None:  # the parameters are clean now; they will not stay so
            held = {id(p) for p, _, _ in self._held}
            return {name: t.detach().clone() if id(t) in held else t.detach() for name, t in state_dict.items()}
        weights.reconcile(self)
        noisy = {id(p): (key, p, state, noise) for key, p, state, noise in self._noisy_parameters()}
        before = self._planned_layouts()
        for key, p, state, _ in noisy.values():
            self._check_layout(before, key, p, state)
        self._check_weights([p for _, p, _, _ in noisy.values()], [s for _, _, s, _ in noisy.values()])
        copies = []
        for name, tensor in state_dict.items():
            if id(tensor) in noisy:
                key, _, state, noise = noisy[id(tensor)]
                tensor = tensor.detach().clone()
                if "compensation" in state:  # the launch rewrites it: work on a copy
                    state = {**state, "compensation": state["compensation"].clone()}
                copies.append((key, tensor, state, noise))
            state_dict[name] = tensor.detach()
        self._noise_launch(copies)
        return state_dict

    def _live_rows(self) -> dict:
        """Capturable mode: id(state) -> that state's live counters as numbers (LIVE_STATE_KEYS
        order), one device-to-host copy per bucket instead of one read per counter; empty in
        host mode."""
        rows = {}
        for plan in self._plans.values():
            if plan.live is not None:
                rows.update(zip(map(id, plan.states), plan.live.cpu().tolist()))
        return rows

    def _noisy_parameters(self, rows=None):
        """(key, param, state, (noise step, type code, scale)) of every parameter that has noise
        on it now; in capturable mode read with one copy per bucket (_live_rows, unless `rows`
        holds them already)."""
        rows = self._live_rows() if rows is None else rows
        noisy = []
        key = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    where = f"{type(self).__name__}: parameter {key}"
                    V.check_counters(f"{where}'s state", state, read=False)  # edited since the last step?
                    V.check_state_tensors(where, _local(p), {k: _local(v) for k, v in state.items()
                                                             if k == "compensation"})
                    row = rows.get(id(state))
                    noise = ((int(row[T.L_NOISE_STEP]), int(row[T.L_NOISE_TYPE]), row[T.L_NOISE_SCALE])
                             if row is not None and isinstance(state.get("noise_step"), torch.Tensor) else
                             (int(_number(state.get("noise_step", 0))), int(_number(state.get("noise_type", 0))),
                              _number(state.get("noise_scale", 0.0))))
                    if noise[0]:
                        noisy.append((key, p, state, noise))
                key += 1
        return noisy

    @_compiler.disable
    def _noise_launch(self, noisy) -> None:
        """Subtract the noise on the given (key, param, state, (noise step, type code, scale)):
        one OP_NOISE launch per bucket."""
        buckets: dict = {}
        for key, p, state, (s, code, scale) in noisy:
            plan = T.TensorPlan(
                param=_local(p), grad=None, states=(), key=key, offset=_global_offset(p),
                compensation=_local(state.get("compensation")), old_step=s, new_step=0,
                flags=(code << T.FLAG_OLD_TYPE_SHIFT) | (code << T.FLAG_NEW_TYPE_SHIFT),
                floats=_fp32([0.0] * T.F_OLD_SCALE + [scale] * 2))
            buckets.setdefault((p.device, p.dtype), []).append(plan)
        for bucket, plans in buckets.items():
            ints, floats = T.build_rows(plans)
            rows = [(plan.param, None, (), plan.compensation) for plan in plans]
            backend = self._resolve_backend(*bucket)
            self._launch(backend, T.OP_NOISE, bucket, rows, ints, floats)
            if backend is not TORCH:  # written through raw addresses (see _BucketPlan.bump_versions)
                _increment_versions([t for param, _, _, comp in rows for t in (param, comp) if t is not None])

    # ------------------------------------------------------------------ weights changed outside
    # A step records its bucket's parameters in the plan (_BucketPlan.record_weights: the version
    # counters and one gather of samples, cheap enough for every step); everything else works
    # on per-parameter records in self._records, into which plan records are spilled first.
    def _spill_records(self) -> None:
        for plan in self._plans.values():
            plan.spill_weights_record(self._records)

    def _forget_weights(self) -> None:
        """Drop every record: the state now describes the weights (a load, reset_noise())."""
        self._records.clear()
        for plan in self._plans.values():
            plan.weights_record = None

    def _record_weights(self, params, states, tensors=None) -> None:
        """Remember how our last operation left each parameter: its state dict (id), version
        counter, storage address and a few of its values (taken on the device, no sync)."""
        self._spill_records()
        tensors = [_local(p) for p in params] if tensors is None else tensors
        views = [T.sample_view(t) for t in tensors]
        by_bucket: dict = {}
        for row, t in enumerate(tensors):
            by_bucket.setdefault((t.device, t.dtype), []).append(row)
        records = self._records
        for rows in by_bucket.values():
            samples = torch.cat([views[row] for row in rows]) if len(rows) > 1 else views[rows[0]].clone()
            start = 0
            for row in rows:
                t, count = tensors[row], views[row].numel()
                records[id(params[row])] = (_record_key(states[row], t), samples, start, count)
                start += count

    def _check_weights(self, params, states, tensors=None) -> None:
        """Raise WeightsChangedError, before anything changes, if a parameter that carries our
        noise was rewritten since our last operation on it.

        A parameter whose state dict is not the one recorded (load_state_dict, or
        ZeroRedundancyOptimizer's own load, replaced it) or that has no record is trusted here:
        the state describes the weights as loaded (and weights.check_loaded has compared them
        with the samples saved with it, where there are any). Otherwise a changed version counter or storage
        address makes us compare the recorded sample (one device sync, only then): equal values
        (a copy of the same weights, a broadcast) are accepted. In-place writes through `p.data`
        (`p.data.copy_(...)`) do not advance the version counter and are not seen; a new storage
        (`p.data = other`) is."""
        self._spill_records()
        tensors = [_local(p) for p in params] if tensors is None else tensors
        records = self._records
        current = [_record_key(s, t) for s, t in zip(states, tensors)]
        recorded = [records.get(id(p), _NO_RECORD)[0] for p in params]
        if current == recorded:
            return
        renew = [i for i, (now, then) in enumerate(zip(current, recorded))
                 if now != then and (then is None or then[0] != now[0])]  # no record, or a new state: trust it
        suspects = [i for i, (now, then) in enumerate(zip(current, recorded))
                    if now != then and then is not None and then[0] == now[0]]
        if suspects:
            samples = []
            for i in suspects:
                _, taken, first, count = records[id(params[i])]
                samples.append(taken[first:first + count])
            differ = _samples_differ([tensors[i] for i in suspects], samples)
            for i, changed in zip(suspects, differ):
                if changed and _number(states[i].get("noise_step", 0)):
                    self._raise_weights_changed(params[i])
            renew += suspects  # the same values (a broadcast, a copy), or no noise on them
        if renew:
            self._record_weights([params[i] for i in renew], [states[i] for i in renew], [tensors[i] for i in renew])

    def _raise_weights_changed(self, p) -> None:
        key = next(k for k, q in enumerate(self._flat_params()) if q is p)
        raise WeightsChangedError(
            f"{type(self).__name__}: parameter {key} (shape {tuple(p.shape)}) was changed outside the "
            "optimizer (model.load_state_dict, copy_, ...) while it carried the optimizer's noise; "
            "removing or regenerating that noise now would corrupt it, so nothing was changed. If the "
            "parameters now hold clean weights (e.g. a clean or best checkpoint), call "
            "optimizer.reset_noise(); if they are noisy weights saved with an optimizer state, load that "
            "state with optimizer.load_state_dict(...)")


def _record_key(state: dict, t: torch.Tensor) -> tuple:
    """What a weight record compares first: the state dict, version counter and address."""
    return id(state), t._version, t.data_ptr()


def _samples_differ(tensors, recorded) -> list:
    """Per tensor, whether its sample now differs bitwise from the recorded one; one
    device-to-host read per (device, dtype) for all of them."""
    out = [True] * len(tensors)
    buckets: dict = {}
    for i, (t, r) in enumerate(zip(tensors, recorded)):
        if t.dtype == r.dtype and t.numel() and min(T.SAMPLE_SIZE, t.numel()) == r.numel():
            buckets.setdefault((t.device, t.dtype), []).append(i)
        elif not t.numel() and not r.numel():
            out[i] = False
    for (device, _), rows in buckets.items():
        now = torch.cat([T.sample_view(tensors[i]) for i in rows])
        then = torch.cat([recorded[i].to(device) for i in rows])
        flags = (_bits(now) != _bits(then)).tolist()
        position = 0
        for i in rows:
            count = recorded[i].numel()
            out[i] = any(flags[position:position + count])
            position += count
    return out


def _capture_underway() -> bool:
    """Whether a CUDA graph is being captured on the current stream (the check of torch.optim's
    _cuda_graph_capture_health_check)."""
    return (torch.backends.cuda.is_built() and torch.cuda.is_available() and not _compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


def _refuse_capture(why: str) -> None:
    """Raise before anything changes if a CUDA graph is being captured on the current stream."""
    if _capture_underway():
        raise RuntimeError(f"CUDA graph capture of {why}")


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `device`."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _number(value):
    """A bookkeeping value as a Python number (a live counter view is read from the device)."""
    return value.item() if isinstance(value, torch.Tensor) else value


_NO_RECORD = (None, None, 0, 0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so that NaN == NaN and -0 != +0 when comparing)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


def _pinned_like(*tensors) -> tuple:
    """Page-locked host buffers shaped like `tensors` (for copies captured in a CUDA graph)."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)


def _host_counters(state: dict, row=None) -> dict:
    """A copy of one parameter's state with live counters as plain numbers (the host-mode
    checkpoint format, loadable with or without capturable). `row`: its live counters already
    copied to the host, else each is read on its own."""
    out = dict(state)
    for column, (key, kind) in enumerate(zip(T.LIVE_STATE_KEYS, (int, int, int, float, bool))):
        if key in out:
            out[key] = kind(row[column] if row is not None else _number(out[key]))
    if out.pop("momentum_fresh", False):
        out.pop("momentum_buffer", None)  # never used yet: the next step initialises it
    return out


class _StepLayout:
    """Who took part in the last full step: the groups and parameters (by identity), which
    parameters had no gradient, and each bucket's plan with the positions of its rows among the
    parameters. _steady_work compares a step with it; the plans vouch for the rest
    (_BucketPlan.steady_grad_pointers)."""

    def __init__(self, opt: NeuralVariableOptimizer, bucket_rows: list, work: list):
        self.state = opt.state
        # which state dict each parameter has (the plans hold the dicts), read without hashing a tensor
        self.state_keys = list(opt.state)
        self.state_values = list(opt.state.values())
        self.groups = list(opt.param_groups)
        self.lengths = [len(group["params"]) for group in self.groups]
        self.params = opt._flat_params()  # a row's key is its position here
        present = {key for rows in bucket_rows for key in rows}
        self.absent = [key for key in range(len(self.params)) if key not in present]
        everything = list(range(len(self.params)))
        self.buckets = [(bucket, backend, plan, None if rows == everything else _picker(rows))
                        for rows, (bucket, backend, plan, _, _) in zip(bucket_rows, work)]


def _picker(rows: list):
    """A function taking the items at positions `rows` out of a list, in C (itemgetter)."""
    getter = operator.itemgetter(*rows)
    return (lambda items: (getter(items),)) if len(rows) == 1 else getter


class _BucketPlan:
    """Launch data of one (device, dtype) bucket, built once while its parameters and their
    state tensors stay the same. Per step only a few columns change -- gradient addresses,
    step counters, flags, hyperparameters -- and they are written with numpy into tables kept
    for the plan's life, so the host cost of a step is about a microsecond per tensor
    (bench/test_host_overhead.py).

    Host mode: the counters live in `optimizer.state`; each step reads them (a float64 mirror,
    reused while the dicts hold what the last step wrote), resolves them into the tables
    (tables.resolve_rows; on the CPU the kernel does it from the mirror) and commits them
    after the launch. Capturable mode: they live in `self.live` on the device (the state holds
    views of it), the tables stay on the device and the kernel resolves and commits the
    counters itself, so a step needs nothing from the host and can be captured in a CUDA graph.
    Either way the launch also copies a few elements of every parameter (tables.SAMPLE_SIZE),
    which the weight records keep (record_weights).
    """

    def __init__(self, opt: NeuralVariableOptimizer, members, backend):
        self.signature = None
        self.backend = backend
        self.params = [p for _, _, p, _ in members]
        self.states = []
        group_ids: dict = {}
        group_of, momentum_init, plans = [], [], []
        for key, group, p, _ in members:
            state = opt.state[p]
            for extra in NOISY_KEYS:  # put in by a loader other than ours (ZeRO): its noise_step says 0
                state.pop(extra, None)
            if len(state) == 0:
                state["step"] = 0
                state["noise_step"] = 0
                state["noise_type"] = spec.noise_type_code(group["noise_type"])
                state["noise_scale"] = float(group["variability"])
            tensors, fresh_buffer = opt._state_tensors(group, p, state)
            compensation = _compensation(p, state)
            self.states.append(state)
            group_of.append(group_ids.setdefault(id(group), len(group_ids)))
            momentum_init.append(fresh_buffer)
            plans.append(T.TensorPlan(param=_local(p), grad=None, states=tuple(_local(t) for t in tensors),
                                      key=key, old_step=0, new_step=0, flags=0,
                                      floats=(0.0,) * T.FLOAT_COLUMNS, offset=_global_offset(p),
                                      compensation=_local(compensation)))
        self.opt = opt
        self.groups = [None] * len(group_ids)
        for _, group, _, _ in members:
            self.groups[group_ids[id(group)]] = group
        self.group_of = np.asarray(group_of, dtype=np.int64)
        self.momentum_init = np.asarray(momentum_init, dtype=bool)
        self.static_ints, _ = T.build_rows(plans)
        self.row_tensors = [(plan.param, plan.states, plan.compensation) for plan in plans]
        self.param_tensors = [plan.param for plan in plans]  # the local tensors (DTensor shards)
        self.layouts = [(t.dtype, tuple(t.shape), t.stride()) for t in self.param_tensors]
        # the storages the rows point at, alive as long as the plan: no other tensor can be allocated
        # at a row's address while the plan may still launch on it (steady_grad_pointers)
        self._kept_storages = [t.detach() for t in self.param_tensors]
        # the state tensors the rows point at, per key any row has: replaced ones make the plan stale.
        # (getter, key, tensors): an itemgetter where every row has the key, else None (dict.get)
        self._state_refs = [
            (operator.itemgetter(key) if all(key in state for state in self.states) else None, key,
             [state.get(key) for state in self.states])
            for key in V.STATE_TENSOR_KEYS if any(key in state for state in self.states)]
        # a key every row has: a dict cleared in place fails its scan (KeyError), no emptiness scan needed
        self.refs_see_cleared_states = any(getter is not None for getter, _, _ in self._state_refs)
        device, dtype = plans[0].param.device, plans[0].param.dtype
        # weight samples after each step (tables.SAMPLE_SIZE): a fused launch copies them into
        # self.samples itself (kept for the plan's life, so a captured graph's replays refresh
        # them too); the torch backend gathers views. Row r's sample starts at _sample_starts[r].
        counts = [min(T.SAMPLE_SIZE, t.numel()) for t in self.param_tensors]
        if backend is TORCH:
            self.samples = None
            self._sample_views = [T.sample_view(t) for t in self.param_tensors]
            self._sample_starts = np.cumsum([0] + counts[:-1]).tolist()
        else:
            self.samples = torch.zeros((len(plans), T.SAMPLE_SIZE), dtype=dtype, device=device)
            self._flat_samples = self.samples.view(-1)
            self._sample_views = None
            self._sample_starts = list(range(0, len(plans) * T.SAMPLE_SIZE, T.SAMPLE_SIZE))
        self._sample_counts = counts
        self.weights_record = None  # (version counters, flat samples) after our last step
        # the parameters a fused launch writes through raw addresses, for bump_versions (the
        # torch backend's in-place ops bump their own counters)
        self._written = [] if backend is TORCH else list(self.param_tensors)
        # whether bump_versions advances each parameter's counter by exactly one (views and
        # detached aliases share a counter): found at the first record_weights, None until then
        self._bumps_once = None
        # Host mode on the CPU (the compiled library, or Triton's interpreter): host memory is
        # the kernel's memory, so the kernel resolves and commits the counters itself (as in
        # capturable mode) from the plan's float64 mirror of the state dicts (_counters);
        # elsewhere tables.resolve_rows / commit_rows do it here.
        self._kernel_resolves = not opt._capturable and backend is not TORCH and device.type == "cpu"
        self._live_offsets = np.arange(len(plans), dtype=np.int64) * (T.LIVE_COLUMNS * np.dtype(np.float64).itemsize)
        self._versions_read = None  # the counters weights_unchanged() read during this step
        self._converted = [None] * len(plans)  # gradients in another dtype or layout, converted
        self._grads = None
        self._pending = None
        self.host_blocks = None  # host mode: the block table of the fused launch (sizes are fixed)
        self.state_signatures = [opt._state_signature(group) for group in self.groups]
        # what steady_grad_pointers compares: the parameters' dtype, shapes, strides, addresses;
        # None for DTensor parameters, whose local shards take the full path at every step
        # (lists compared whole: types and dtypes are singletons, so equal lists compare by identity)
        self._steady_meta = None if any(map(_is_dtensor, self.params)) else (
            [torch.Tensor] * len(plans), [dtype] * len(plans), list(map(_SHAPE, self.param_tensors)),
            list(map(_STRIDE, self.param_tensors)), self.static_ints[:, T.I_PARAM].tolist())
        self._static_alignment = T.alignment_flags(self.static_ints)  # the gradient address (0) aside
        self._group_key = None     # the groups' hyperparameters behind self._group_tables
        # (ints, floats, (row scales, the types and scales the state dicts get)) before the per-step columns
        self._group_tables = None
        self._relative = None      # relative.RelativeScales of the rows whose group has relative=True
        self._committed = None     # host mode: (counter columns written by commit(), their array)
        self._host_tables = None   # host mode: (the group tables they were made from, ints, floats)
        self._bound_live = None    # host mode on the CPU: the counter mirror whose rows I_LIVE points to
        self._tabled_pointers = None  # host mode on the CPU: the gradient addresses in the host tables
        self._prepared = None      # host mode on the CPU: (the host tables, seed, their prepared launch)
        self._fresh = bool(self.momentum_init.any())  # some momentum buffer not used yet
        self.live = None
        if opt._capturable:
            self._init_live(plans[0].param.device)

    def noise_on_weights(self) -> dict:
        """id(param) -> (noise step, type code, scale, 16-bit compensation buffer | None) of the
        noise this plan's last step left on its parameters, from its own copy of the counters
        (the state dicts may have been cleared since); empty when it has none."""
        if self.live is not None:
            rows = self.live.cpu().tolist()
        elif self._committed is not None:
            rows = self._committed[1].tolist()
        else:
            return {}
        return {id(p): (int(row[T.L_NOISE_STEP]), int(row[T.L_NOISE_TYPE]), row[T.L_NOISE_SCALE], compensation)
                for p, row, (_, _, compensation) in zip(self.params, rows, self.row_tensors) if row[T.L_NOISE_STEP]}

    # ------------------------------------------------------------------ capturable mode
    def _init_live(self, device: torch.device) -> None:
        """Move the counters to the device: `self.live` [T, LIVE_COLUMNS] float64, the state
        entries become views of it, and the tables get persistent device copies."""
        n = len(self.params)
        host = np.zeros((n, T.LIVE_COLUMNS), dtype=np.float64)
        carried = []  # (row, column, tensor): counters already on the device (an earlier plan)
        for row, (state, fresh) in enumerate(zip(self.states, self.momentum_init)):
            if "momentum_buffer" in state:
                state.setdefault("momentum_fresh", bool(fresh))
            for column, key in enumerate(T.LIVE_STATE_KEYS):
                value = state.get(key, 0)
                if isinstance(value, torch.Tensor):
                    carried.append((row, column, value))
                else:
                    host[row, column] = value
        self.live = torch.tensor(host, dtype=torch.float64, device=device)
        if carried:
            rows, columns, values = zip(*carried)
            index = (torch.tensor(rows, device=device), torch.tensor(columns, device=device))
            self.live.index_put_(index, torch.stack([v.to(device, torch.float64) for v in values]))
        for row, state in enumerate(self.states):
            for column, key in enumerate(T.LIVE_STATE_KEYS):
                if key in state:
                    state[key] = self.live[row, column]
        self.static_ints[:, T.I_LIVE] = (self.live.data_ptr()
                                         + np.arange(n, dtype=np.int64) * T.LIVE_COLUMNS * self.live.element_size())
        self.device_ints = torch.zeros((n, T.INT_COLUMNS), dtype=torch.int64, device=device)
        self.device_floats = torch.zeros((n, T.FLOAT_COLUMNS), dtype=torch.float32, device=device)
        self.blocks = None
        if self.backend is not TORCH:
            numels = self.static_ints[:, T.I_NUMEL].tolist()
            offsets = self.static_ints[:, T.I_OFFSET].tolist()
            self.blocks = T.to_device(T.build_block_table(numels, offsets, self.backend.block_size), device)
        self._group_rows = [torch.as_tensor(np.flatnonzero(self.group_of == g), device=device)
                            for g in range(len(self.groups))]
        self._uploaded = None     # the host tables last copied to the device
        self._spare_staging = None if device.type == "cpu" else _pinned_like(
            torch.from_numpy(self.static_ints), torch.from_numpy(np.zeros((n, T.FLOAT_COLUMNS), np.float32)))
        self._graph_staging = []  # pinned copies captured in CUDA graphs: kept for their replays
        # the storages a captured graph writes, kept even if a parameter gets another (p.data = ...)
        self._param_storages = [param.detach() for param, _, _ in self.row_tensors]
        self._graph_owned = False  # a captured upload may have run since: upload on every eager step

    def upload(self, ints: np.ndarray, floats: np.ndarray) -> None:
        """Copy changed host tables into the persistent device tables (same addresses, so
        captured graphs keep reading them). Inside a capture the copy becomes part of the
        graph -- from pinned buffers allocated beforehand and kept as long as the optimizer --
        so each replay restores the tables it was captured with (e.g. the addresses of
        gradients allocated in the graph's pool); eager steps then always upload."""
        device = self.live.device
        capturing = _capturing(device)
        if (not capturing and not self._graph_owned and self._uploaded is not None
                and np.array_equal(ints, self._uploaded[0]) and np.array_equal(floats, self._uploaded[1])):
            return
        host_ints, host_floats = torch.from_numpy(ints), torch.from_numpy(floats)
        if device.type == "cpu":
            self.device_ints.copy_(host_ints)
            self.device_floats.copy_(host_floats)
        elif capturing:
            if self._spare_staging is None:
                raise RuntimeError("nvrm_ext: no spare pinned buffer for a table upload inside this CUDA "
                                   "graph capture (one step() per capture); run one step() eagerly "
                                   "before each capture")
            staging, self._spare_staging = self._spare_staging, None
            staging[0].copy_(host_ints)  # host to pinned host: no device work
            staging[1].copy_(host_floats)
            self.device_ints.copy_(staging[0], non_blocking=True)
            self.device_floats.copy_(staging[1], non_blocking=True)
            self._graph_staging.append(staging)
        else:
            self.device_ints.copy_(host_ints.pin_memory(), non_blocking=True)
            self.device_floats.copy_(host_floats.pin_memory(), non_blocking=True)
            if self._spare_staging is None:
                self._spare_staging = _pinned_like(host_ints, host_floats)
        self._graph_owned = self._graph_owned or capturing
        self._uploaded = None if capturing else (ints, floats)

    def refresh_tensor_lrs(self) -> None:
        """Groups whose lr is a tensor: copy it into their rows on the device, so a graph
        replay (or an LR scheduler's in-place fill_) sees the current value."""
        for group, rows in zip(self.groups, self._group_rows):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                self.device_floats[rows, T.F_LR] = lr.to(self.live.device, torch.float32)

    def write_back_converted(self, grads, found_inf) -> None:
        """Gradients the kernel read through a conversion buffer (another dtype or layout than
        the parameter): give them the unscaled values it wrote there, unless the step was skipped."""
        for g, buffer in zip(grads, self._grads):
            g = _local(g)
            if g.data_ptr() != buffer.data_ptr():
                unscaled = buffer.to(g.dtype)
                g.copy_(unscaled if found_inf is None else torch.where(found_inf != 0, g, unscaled))

    def release_grads(self) -> None:
        self._grads = None

    def weights_unchanged(self) -> bool:
        """No parameter's version counter moved since our last step (state dicts and storage
        addresses are fixed for the plan's life by its signature). Keeps the counters read
        for record_weights."""
        self._versions_read = list(map(_VERSION, self.param_tensors))
        return self.weights_record is not None and self._versions_read == self.weights_record[0]

    def bump_versions(self) -> None:
        """Advance the version counters of the parameters a fused launch wrote, as an in-place
        torch op would: autograd then refuses a backward through weights a step() changed after
        the forward pass, and another owner of these parameters sees the change. One C call
        (about 0.07 us per tensor). The state buffers and compensation, which autograd never
        sees unless a user feeds them to a forward pass, are left as they are: bumping them too
        would double or triple that cost at every step. Not inside a CUDA graph capture: a
        replay runs the kernels only, so replays leave the counters as they are."""
        if self._written:
            _increment_versions(self._written)

    def record_weights(self) -> None:
        """Remember how our step left the weights: version counters (after bump_versions) and
        samples. The counters of a fused launch are the ones weights_unchanged() read, plus
        the one bump each, and it copied the samples itself; the torch backend's in-place ops
        advanced the counters, and its samples are gathered here."""
        versions = None
        if self.samples is not None and self._versions_read is not None and self._bumps_once is not False:
            versions = list(map(operator.add, self._versions_read, itertools.repeat(1)))
            if self._bumps_once is None:  # the first time: see whether that is what the counters say
                self._bumps_once = versions == list(map(_VERSION, self.param_tensors))
                if not self._bumps_once:
                    versions = None
        if versions is None:
            versions = list(map(_VERSION, self.param_tensors))
        self._versions_read = None
        samples = torch.cat(self._sample_views) if self.samples is None else self._flat_samples
        self.weights_record = (versions, samples)

    def spill_weights_record(self, records: dict) -> None:
        """Move the plan's record into per-parameter records (NeuralVariableOptimizer._check_weights)."""
        if self.weights_record is None:
            return
        versions, samples = self.weights_record
        for p, state, start, count, version, address in zip(
                self.params, self.states, self._sample_starts, self._sample_counts, versions,
                self.static_ints[:, T.I_PARAM].tolist()):
            records[id(p)] = ((id(state), version, address), samples, start, count)
        self.weights_record = None

    # ------------------------------------------------------------------ every step
    def rows(self) -> list:
        """(param, grad, states, compensation) per row, as the torch backend reads them (after tables())."""
        return [(param, grad, states, comp) for (param, states, comp), grad in zip(self.row_tensors, self._grads)]

    def _local_grads(self, grads) -> list:
        """The gradients as the kernels read them: in the parameter's dtype and memory order."""
        out = []
        for row, ((param, _, _), g) in enumerate(zip(self.row_tensors, grads)):
            g = _local(g)
            if g.dtype != param.dtype or g.stride() != param.stride():
                buffer = self._converted[row]
                if buffer is None:
                    buffer = self._converted[row] = torch.empty_like(param)
                g = buffer.copy_(g)
            out.append(g)
        return out

    def steady_grad_pointers(self, grads) -> list | None:
        """The gradients' addresses if this plan fits the step as it is: every gradient a plain
        tensor with exactly the dtype, shape and strides its parameter had when the plan was
        built (read in place, nothing to convert), every parameter still at its address, every
        group with the state needs the plan was built for -- with _steady_work's check of the
        state dicts, what the full path's validation and plan signature check, compared as
        whole lists. None otherwise (the full path then raises its errors, converts or rebuilds).

        A parameter at the same address is taken as the storage the plan was built for: the
        plan keeps every parameter's storage alive (_kept_storages), so no other allocation can
        take that address, and `p.data = x` with `x` a view at p's own address (`p.data[:3]`,
        other strides) leaves the kernel inside that storage, updating it as before -- the
        gradient must keep the old layout to pass the check above; a gradient of the new
        layout takes the full path, which refuses or rebuilds (_check_rows). (The torch backend
        reads the parameters as they are now: there the layouts are compared.) And the state
        tensors must be the ones the rows point at (a momentum buffer replaced in the dict)."""
        if self._steady_meta is None:
            return None
        types, dtypes, shapes, strides, addresses = self._steady_meta
        try:
            if (list(map(type, grads)) != types or list(map(_DTYPE, grads)) != dtypes
                    or list(map(_SHAPE, grads)) != shapes or list(map(_STRIDE, grads)) != strides):
                return None
        except RuntimeError:  # sparse gradients have no strides
            return None
        params = self.param_tensors
        if (list(map(_DATA_PTR, params)) != addresses
                or [self.opt._state_signature(group) for group in self.groups] != self.state_signatures):
            return None
        if self.backend is TORCH and (list(map(_SHAPE, params)) != shapes or list(map(_STRIDE, params)) != strides
                                      or list(map(_DTYPE, params)) != dtypes):
            return None  # its torch ops read the parameters as they are now, not the storage the plan kept
        states = self.states
        try:
            for getter, key, tensors in self._state_refs:
                now = map(getter, states) if getter is not None else map(dict.get, states, itertools.repeat(key))
                if not all(map(operator.is_, now, tensors)):
                    return None
        except KeyError:  # a state tensor deleted from its dict
            return None
        return list(map(_DATA_PTR, grads))

    def tables(self, grads, grad_pointers=None, spreads=None):
        """The int64 and float32 tables of this step (host numpy). Host mode: resolved from
        the counters in `optimizer.state` (by the kernel itself on the CPU), in two arrays kept
        for the plan's life and rewritten in place (a host-mode launch reads or copies them
        before it returns); capturable mode: fresh arrays, which upload() compares with the
        last ones, and the kernel resolves the counters. `grad_pointers`: the gradients'
        addresses where steady_grad_pointers vouched for them; otherwise gradients in another
        dtype or layout than their parameter are converted. `spreads`: relative rows' spreads
        measured before another optimizer's update (relative.measure_before_update)."""
        if grad_pointers is None:
            self._grads = self._local_grads(grads)
            grad_pointers = [t.data_ptr() for t in self._grads]
        else:
            self._grads = grads
        group_ints, group_floats, new_scales = self._group_columns()
        if self.live is None:
            if self._host_tables is None or self._host_tables[0] is not group_ints:
                self._host_tables = (group_ints, group_ints.copy(), group_floats.copy())
                self._bound_live = None
                self._tabled_pointers = None
            _, ints, floats = self._host_tables
        else:
            ints, floats = group_ints.copy(), group_floats.copy()
        # Where the kernel resolves the counters, nothing but this writes the host tables' gradient
        # and flag columns: with the same addresses as at the last step (the same gradient tensors)
        # they hold them already. Elsewhere resolve_rows rewrites the flags; capturable tables are new.
        if not (self._kernel_resolves and grad_pointers == self._tabled_pointers):
            addresses = np.asarray(grad_pointers, dtype=np.int64)
            ints[:, T.I_GRAD] = addresses
            if self.backend.uses_alignment_flag:  # tables.alignment_flags(ints): only the gradients' addresses change
                ints[:, T.I_FLAGS] = group_ints[:, T.I_FLAGS] | np.where(addresses % 16 == 0, self._static_alignment, 0)
            self._tabled_pointers = grad_pointers if self._kernel_resolves else None
        if self.live is None:
            held, live = self._counters()
            if self._relative is not None:  # this step's scales of the relative rows (relative.py)
                rows = self._relative.rows
                scales = self._relative.scales(ints, live, spreads)
                floats[rows, T.F_NEW_SCALE] = scales
                row_scales = new_scales[0].copy()
                row_scales[rows] = scales
                new_scales = (row_scales, new_scales[1], row_scales.tolist())
            if self._kernel_resolves:
                if live is not self._bound_live:  # a new mirror (the state dicts were changed)
                    ints[:, T.I_LIVE] = live.ctypes.data + self._live_offsets
                    self._bound_live = live
            else:
                T.resolve_rows(self.opt._op, ints, floats, live)
            self._pending = (ints, floats, live, new_scales, held)
        return ints, floats

    def ready_host_launch(self, bucket, ints: np.ndarray) -> None:
        """Host mode: what can still fail before this step's launch (the block table; on the
        CPU the launch prepared once per table set and seed, CompiledBackend.prepare, which
        checks its arguments), done for every bucket before any launches."""
        opt, backend = self.opt, self.backend
        if backend is not TORCH and self.host_blocks is None:
            self.host_blocks = opt._block_table(backend, bucket[0], ints)
        if self._kernel_resolves and backend.name == "cpu":
            prepared = self._prepared
            if prepared is None or prepared[0] is not self._host_tables or prepared[1] != opt._seed:
                _, ints, floats = self._host_tables
                self._prepared = (self._host_tables, opt._seed, backend.prepare(
                    opt._op, bucket[1], torch.from_numpy(ints), torch.from_numpy(floats), self.host_blocks,
                    opt._seed, commit_rows=len(ints), samples=self.samples))

    def host_launch(self, bucket, ints: np.ndarray, floats: np.ndarray) -> None:
        """Host mode: the launch of this step's tables (from tables(), readied by
        ready_host_launch()), then commit(). On the CPU the prepared launch is one library call:
        the tables stay at their addresses."""
        opt, backend = self.opt, self.backend
        if self._kernel_resolves and backend.name == "cpu":
            self._prepared[2]()
        else:
            opt._launch(backend, opt._op, bucket, self.rows, ints, floats, self.host_blocks,
                        commit_rows=len(ints) if self._kernel_resolves else 0, samples=self.samples)
        self.commit()

    def _group_columns(self) -> tuple:
        """The static columns with the rows' hyperparameters filled in -- flags, num_iters, the
        float row, the new noise scale -- from each group's values, and the rows' new noise
        types and scales as the state dicts will hold them. Spread over the rows only when a
        group's values change (compared bit for bit), not at every step."""
        opt = self.opt
        key = [opt._denoise]
        rows = []
        for group in self.groups:
            flags, row = opt._group_row(group)
            variability = group["variability"]
            rows.append(row)
            # variability 0: every step is a num_iters-th step (no new noise; old noise removed)
            key.append((flags, group["num_iters"] if variability else 1, group["noise_type"],
                        _DOUBLES.pack(*row), _DOUBLE.pack(variability), bool(group.get("relative", False))))
        if key != self._group_key:
            g = self.group_of
            ints = self.static_ints.copy()
            ints[:, T.I_NUM_ITERS] = np.asarray([k[1] for k in key[1:]], dtype=np.int64)[g]
            new_types = np.asarray([spec.noise_type_code(k[2]) for k in key[1:]], dtype=np.int64)[g]
            ints[:, T.I_FLAGS] = (np.asarray([k[0] for k in key[1:]], dtype=np.int64)[g]
                                  | (new_types << T.FLAG_NEW_TYPE_SHIFT)
                                  | (0 if opt._denoise else T.FLAG_KEEP_NOISE))  # | alignment, per step
            floats = np.asarray(rows, dtype=np.float64)[g].astype(np.float32)  # rounded once
            row_scales = np.asarray([float(group["variability"]) for group in self.groups], dtype=np.float64)[g]
            floats[:, T.F_NEW_SCALE] = row_scales
            self._group_key = key
            self._group_tables = (ints, floats, (row_scales, new_types.tolist(), row_scales.tolist()))
            relative_rows = np.flatnonzero(np.asarray([k[5] for k in key[1:]], dtype=bool)[g] & (row_scales != 0))
            self._relative = None
            if len(relative_rows):
                if self.live is not None:
                    raise ValueError(f"{type(opt).__name__}: relative=True is not supported with capturable "
                                     "counters yet (the spread would be measured on the device at every "
                                     "step); use capturable=False for relative groups")
                self._relative = relative.RelativeScales(relative_rows, row_scales[relative_rows], self.params,
                                                         self.param_tensors, self.states, type(opt).__name__,
                                                         self.static_ints[:, T.I_KEY])
        return self._group_tables

    def _counters(self) -> tuple:
        """Host mode: the rows' counters as float64 [T, LIVE_COLUMNS] from the state dicts.
        When the dicts hold what the last commit() wrote (nobody changed them since), its array
        is reused instead of converting every value again, and those columns are returned too
        (commit() then rewrites only the keys whose values change); else None and a new array."""
        states = self.states
        try:
            columns = [list(map(operator.itemgetter(key), states)) for key in _HOST_COUNTER_KEYS]
        except KeyError as error:
            columns = None
            missing = error
        try:
            same = columns is not None and self._committed is not None and columns == self._committed[0]
        except RuntimeError:  # a tensor edited into a counter compares elementwise: checked below
            same = False
        if same:
            return columns, self._committed[1]  # its L_FRESH column is 0, as momentum_init after commit()
        name = type(self.opt).__name__
        for key, state in zip(self.static_ints[:, T.I_KEY].tolist(), states):  # edited or new: check them
            where = f"{name}: parameter {key}'s state"
            if columns is None and not set(_HOST_COUNTER_KEYS) <= set(state):
                raise ValueError(f"{where} lacks {missing}; drop the state (del optimizer.state[p]) to start "
                                 "the parameter afresh, or load a complete one")
            V.check_counters(where, state)
        n = len(states)
        live = np.empty((n, T.LIVE_COLUMNS), dtype=np.float64)
        for column, values in enumerate(columns):
            live[:, column] = np.fromiter(values, np.float64, n)
        live[:, T.L_FRESH] = self.momentum_init
        return None, live

    def commit(self) -> None:
        """Host mode: record the launched step in the per-parameter state. The noise type and
        scale each row now carries are its group's (from _group_columns); the steps come from
        the committed counters."""
        ints, floats, live, (new_scales, new_types, scale_values), held = self._pending
        if not self._kernel_resolves:  # else the launch committed them into `live`
            T.commit_rows(ints, floats, live)
        live[:, T.L_NOISE_SCALE] = new_scales  # as the state holds it (the kernels: the float32 value)
        columns = live[:, :T.L_NOISE_TYPE].astype(np.int64).T.tolist() + [new_types, scale_values]
        for key, values, before in zip(_HOST_COUNTER_KEYS, columns, held or [None] * len(columns)):
            if values != before:  # steps always; noise type and scale only when a group changed them
                _exhaust(map(operator.setitem, self.states, itertools.repeat(key), values))  # looped in C
        self._committed = (columns, live)
        if self._fresh:
            self.momentum_init[:] = False
            self._fresh = False
        self._pending = None
        self._grads = None
