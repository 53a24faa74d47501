"""What every neural-variable optimizer shares.

An NVRM step perturbs the weights with fresh noise after the update and removes the previous
noise, so the gradient is taken at w + b while the optimizer tracks the clean w. Here the noise
is a function (docs/noise.md), not a buffer: per parameter we keep only the base optimizer's
state plus O(1) bookkeeping -- which step's noise is on the weights, of which type and scale --
and one launch per (device, dtype) bucket regenerates the old noise, applies the update and adds
the new noise.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required

from .. import noise as spec
from ..backends import tables as T
from ..backends.torch_ref import TORCH

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STATE_DICT_KEY = "nvrm"


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


def _fp32(values) -> tuple:
    """Round host-computed (float64) constants to float32 once, as the kernels will see them."""
    return tuple(np.asarray(values, dtype=np.float32).tolist())


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    return int(value)


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


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t):
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if _is_dtensor(t) else t


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

    Subclasses set `_op` (tables.OP_SGD / OP_ADAM) and implement `_validate_group`,
    `_init_state` and `_row` (the state tensors, flags and float row of one parameter).
    """

    _op: int

    def __init__(self, params, defaults: dict, *, seed: int | None, backend: str, denoise: bool):
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(BACKENDS)})")
        if seed is None:
            seed = draw_seed()
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
            raise ValueError(f"Invalid seed: {seed!r} (expected an integer in [0, 2**64))")
        self._backend_name = backend
        self._seed = broadcast_seed(int(seed))
        self._denoise = bool(denoise)
        self._block_tables: dict = {}
        self._inside_denoised = False
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
            if isinstance(p, torch.Tensor) and not _is_dense(_local(p)):
                raise ValueError(
                    f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} and strides "
                    f"{p.stride()} overlaps itself or has gaps; parameters must be dense tensors")
            if isinstance(p, torch.Tensor):
                _global_offset(p)  # raises for shardings the noise cannot follow
        self._check_backends(p for p in params if isinstance(p, torch.Tensor))
        super().add_param_group({**param_group, "params": params})

    def _validate_group(self, group: dict) -> None:
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) and not (isinstance(lr, numbers.Real) and lr >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr!r} (expected a number >= 0)")
        variability = group["variability"]
        if not (isinstance(variability, numbers.Real) and math.isfinite(variability) and variability > 0.0):
            raise ValueError(f"Invalid variability: {variability!r} (expected a finite number > 0)")
        group["num_iters"] = _check_positive_int("num_iters", group["num_iters"])
        spec.noise_type_code(group["noise_type"])
        wd = group["weight_decay"]
        if not (isinstance(wd, numbers.Real) and wd >= 0.0):
            raise ValueError(f"Invalid weight_decay: {wd!r} (expected a number >= 0)")

    # ------------------------------------------------------------------ seed and state_dict
    def __getstate__(self):
        # torch's Optimizer pickles only defaults, state and param_groups; keep the seed too
        state = super().__getstate__()
        state.update(_seed=self._seed, _backend_name=self._backend_name, _denoise=self._denoise)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._block_tables = {}
        self._inside_denoised = False

    @property
    def seed(self) -> int:
        """The 64-bit seed of the noise (part of the optimizer state)."""
        return self._seed

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd[STATE_DICT_KEY] = {"seed": self._seed, "format": 1}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters, per-parameter state *and the seed*, so a resumed run
        continues the identical noise sequence."""
        extra = state_dict.get(STATE_DICT_KEY)
        if extra is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this state_dict has no '{STATE_DICT_KEY}' "
                "entry (it was not saved by an nvrm_ext optimizer), so the noise on the weights "
                "could not be regenerated")
        for index, s in state_dict.get("state", {}).items():
            missing = {"step", "noise_step"} - set(s)
            if missing:
                raise ValueError(f"state of parameter {index} lacks {sorted(missing)}")
        rest = {k: v for k, v in state_dict.items() if k != STATE_DICT_KEY}
        super().load_state_dict(rest)
        self._seed = int(extra["seed"])
        self._block_tables.clear()

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
            for candidate in candidates:
                try:
                    backend = fused_backend(candidate)
                except ImportError:
                    continue
                if backend.unavailable_reason(device, dtype) is None:
                    return backend
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

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter with a gradient: remove the old noise, apply the base
        update at the perturbed weights, add fresh noise. Returns the closure's loss."""
        if self._inside_denoised:
            raise RuntimeError("step() called inside denoised(): leave the block first")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_all()
        return loss

    @torch.compiler.disable
    def _step_all(self) -> None:
        """The step proper. Opaque to torch.compile: host-side table building and one launch
        per bucket, nothing for the compiler to fuse, so a compiled training step breaks its
        graph once here instead of tracing (and breaking) through every line."""
        participants = self._participants()
        buckets: dict = {}
        for key, group, p, g in participants:
            buckets.setdefault((p.device, p.dtype), []).append((key, group, p, g))
        resolved = {bucket: self._resolve_backend(*bucket) for bucket in buckets}
        for bucket, members in buckets.items():
            plans, commits = [], []
            for key, group, p, g in members:
                plan, commit = self._plan_step(key, group, p, g)
                plans.append(plan)
                commits.append(commit)
            self._launch(resolved[bucket], self._op, bucket, plans)
            for commit in commits:
                commit()

    def _plan_step(self, key: int, group: dict, p: torch.Tensor, g: torch.Tensor):
        """The TensorPlan of one parameter and a callback that records the step in its state."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["noise_step"] = 0
            state["noise_type"] = spec.noise_type_code(group["noise_type"])
            state["noise_scale"] = float(group["variability"])
        local_p, local_g = _local(p), _local(g)
        if local_g.stride() != local_p.stride():  # the kernels walk param and grad in one memory order
            local_g = torch.empty_like(local_p).copy_(local_g)
        step = state["step"] + 1
        new_step = step if step % group["num_iters"] != 0 else 0
        old_step = state["noise_step"] if self._denoise else 0
        old_type = state["noise_type"]
        new_type = spec.noise_type_code(group["noise_type"])
        states, flags, hyper = self._row(group, p, state, step)
        flags |= (old_type << T.FLAG_OLD_TYPE_SHIFT) | (new_type << T.FLAG_NEW_TYPE_SHIFT)
        floats = _fp32(list(hyper) + [state["noise_scale"], group["variability"]])
        plan = T.TensorPlan(param=local_p, grad=local_g, states=tuple(_local(s) for s in states),
                            key=key, old_step=old_step, new_step=new_step, flags=flags,
                            floats=floats, offset=_global_offset(p))

        def commit():
            state["step"] = step
            state["noise_step"] = new_step if self._denoise else 0
            state["noise_type"] = new_type
            state["noise_scale"] = float(group["variability"])

        return plan, commit

    def _launch(self, backend, op: int, bucket, plans: list) -> None:
        if not plans:
            return
        if backend is TORCH:
            TORCH.run(op, plans, self._seed)
            return
        device, dtype = bucket
        layout = (device, backend.name, tuple((p.param.numel(), p.offset) for p in plans))
        blocks = self._block_tables.get(layout)
        if blocks is None:
            array = T.build_block_table([n for n, _ in layout[2]], [o for _, o in layout[2]], backend.block_size)
            blocks = self._block_tables[layout] = T.to_device(array, device)
        ints, floats = T.build_rows(plans)
        backend.launch(op, dtype, T.to_device(ints, device), T.to_device(floats, device), blocks, self._seed)

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def denoised(self):
        """Inside the block the parameters hold the clean weights; on exit the same noise is
        put back. Use it to evaluate or save clean weights. One launch per bucket each way."""
        if self._inside_denoised:
            raise RuntimeError("denoised() blocks do not nest")
        noisy = self._noisy_parameters()
        self._noise_launch(noisy, remove=True)
        self._inside_denoised = True
        try:
            yield self
        finally:
            self._inside_denoised = False
            self._noise_launch(noisy, remove=False)

    @torch.no_grad()
    def clean_state_dict(self, module: torch.nn.Module) -> dict:
        """`module.state_dict()` holding clean copies of the parameters this optimizer
        perturbed; the live (perturbed) parameters are not touched. The copies are made by the
        same launch as denoised(), so they are bit-identical to what denoised() shows."""
        state_dict = module.state_dict(keep_vars=True)
        noisy = {id(p): (key, state) for key, p, state in self._noisy_parameters()}
        copies = []
        for name, tensor in state_dict.items():
            if id(tensor) in noisy:
                key, state = noisy[id(tensor)]
                tensor = tensor.detach().clone()
                copies.append((key, tensor, state))
            state_dict[name] = tensor.detach()
        self._noise_launch(copies, remove=True)
        return state_dict

    def _noisy_parameters(self):
        """(key, param, state) of every parameter that has noise on it now."""
        noisy = []
        key = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and state.get("noise_step", 0):
                    noisy.append((key, p, state))
                key += 1
        return noisy

    @torch.compiler.disable
    def _noise_launch(self, noisy, *, remove: bool) -> None:
        buckets: dict = {}
        for key, p, state in noisy:
            code = state["noise_type"]
            s = state["noise_step"]
            plan = T.TensorPlan(
                param=_local(p), grad=None, states=(), key=key, offset=_global_offset(p),
                old_step=s if remove else 0, new_step=0 if remove else s,
                flags=(code << T.FLAG_OLD_TYPE_SHIFT) | (code << T.FLAG_NEW_TYPE_SHIFT),
                floats=_fp32([0.0] * T.F_OLD_SCALE + [state["noise_scale"]] * 2))
            buckets.setdefault((p.device, p.dtype), []).append(plan)
        for bucket, plans in buckets.items():
            self._launch(self._resolve_backend(*bucket), T.OP_NOISE, bucket, plans)
