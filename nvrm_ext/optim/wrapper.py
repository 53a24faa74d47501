"""NVRM(optimizer): neural variability around any torch optimizer.

The paper's rule combines with any optimizer: the base update is applied at the perturbed
weights, then the noise is swapped (``p += n(s) - n(s-1)``; every ``num_iters``-th step only
``p -= n(s-1)``). FusedVSGD / FusedVAdam fuse their update with that swap into one kernel; here
the inner optimizer steps on its own and the swap is one launch per (device, dtype) of the
same noise engine with no update of its own (tables.OP_NOISE, the op denoised() uses).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch.optim import Optimizer

from ..backends import tables as T
from . import validation as V
from .engine import NoiseEngine
from .keys import SEED_KEY, STATE_DICT_KEY
from .params import _global_offset, _is_dense, _local
from .protocol import NoisyOptimizer

NOISE_DEFAULTS = ("variability", "num_iters", "noise_type", "relative")
STATE_PREFIX = "nvrm_"  # the engine's per-parameter entries inside the wrapper's state_dict
_FORMAT = 1


class NoiseSwap(NoiseEngine):
    """The noise engine with no update of its own: its step is the swap alone. Its param groups
    are the inner optimizer's (NVRM keeps them the same list); its state is its own: the noise
    counters (step, noise_step, noise_type, noise_scale) and 16-bit compensation buffers."""

    _op = T.OP_NOISE
    _checks_weights_first = True  # NVRM checks before the inner update, which changes the weights

    def _validate_group(self, group: dict) -> None:
        group.setdefault("relative", False)
        V.check_group_keys(group, NOISE_DEFAULTS)
        V.check_flag("relative", group["relative"])
        V.check_number("Invalid variability", group["variability"])
        group["num_iters"] = V.check_num_iters(group["num_iters"])
        V.check_noise_type(group["noise_type"])

    def _state_signature(self, group: dict):
        return None

    def _state_tensors(self, group: dict, p: torch.Tensor, state: dict):
        return (None, None, None), False

    def _group_row(self, group: dict):
        return 0, [0.0] * T.FLOAT_COLUMNS


class NVRM(Optimizer):
    r"""Artificial neural variability (NVRM) around any ``torch.optim.Optimizer``.

    ``NVRM(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), variability=0.01,
    num_iters=len(loader))`` trains on perturbed weights ``w + b``: the inner optimizer's
    ``step()`` runs on the perturbed weights (the original algorithm's order), then the noise is
    swapped in one launch per (device, dtype): ``p += n(s) - n(s-1)``, or only ``p -= n(s-1)``
    every ``num_iters``-th step of a parameter, which leaves it clean. The noise is regenerated
    from (seed, parameter, step, element) (docs/noise.md), never stored.

    The noise hyperparameters (``variability``, ``num_iters``, ``noise_type``) live in the inner
    optimizer's param groups (these arguments fill in the groups that lack them), so per-group
    values, ``variability=0`` groups, LR schedulers and ``add_param_group`` work as usual. A
    parameter's noise key is its position in the flat list of all groups' parameters, as in
    FusedVSGD / FusedVAdam, so ``NVRM(SGD(...))`` draws the noise FusedVSGD draws with the same
    seed (the fused step rounds the update and the swap once, this one twice).

    Everything the fused optimizers have works the same way: ``denoised()``,
    ``remove_noise()`` / ``restore_noise()`` / ``reset_noise()``, ``clean_state_dict()``,
    ``state_dict()`` / ``load_state_dict()`` (the inner state plus the noise bookkeeping, for a
    bit-exact resume), :class:`~nvrm_ext.WeightsChangedError`, ``denoise=False`` (PSGD), 16-bit
    compensation. ``optimizer.state`` and ``param_groups`` are the inner optimizer's.

    Args:
        optimizer: the inner optimizer (any ``torch.optim.Optimizer`` over floating-point
            parameters; not itself an NVRM or fused NVRM optimizer).
        variability, num_iters, noise_type, relative: as in FusedVSGD; defaults of the groups.
        seed: 64-bit noise seed; None draws it from torch's default generator.
        backend: where the swap runs: 'auto', 'torch', 'triton', 'cpu' or 'cuda'.
        denoise: False gives PSGD (noise added each step, never removed).
    """

    def __init__(self, optimizer: Optimizer, variability=0.01, num_iters=1000, noise_type="Gaussian", *,
                 relative=False, seed=None, backend="auto", denoise=True):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"NVRM wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        carrier = _noise_carrier_in(optimizer)
        if carrier is not None:
            which = "it" if carrier is optimizer else f"the {type(carrier).__name__} inside it"
            raise TypeError(f"NVRM cannot wrap {type(optimizer).__name__}: {which} already puts noise on the weights "
                            "(stacking two noise rules would remove each other's noise)")
        if type(optimizer).__name__ == "LBFGS":
            raise TypeError("NVRM does not wrap LBFGS: its line search re-evaluates the closure at weights it "
                            "moves itself, over a history of directions that the swapped noise would corrupt; "
                            "use a first-order optimizer")
        noise_defaults = {"variability": variability, "num_iters": num_iters, "noise_type": noise_type,
                          "relative": relative}
        groups = optimizer.param_groups
        for index, group in enumerate(groups):
            probe = {**noise_defaults, **{k: group[k] for k in NOISE_DEFAULTS if k in group}}
            try:
                NoiseSwap._validate_group(None, probe)
            except ValueError as error:
                raise ValueError(f"NVRM: param group {index}: {error}") from None
        self.optimizer = optimizer
        self._noise_defaults = noise_defaults
        self.defaults = {**optimizer.defaults, **noise_defaults}
        capturable = any(bool(group.get("capturable", False)) for group in groups)
        engine_groups = [{"params": list(group["params"]), **noise_defaults,
                          **{k: group[k] for k in NOISE_DEFAULTS if k in group}} for group in groups]
        self._engine = NoiseSwap(engine_groups, dict(noise_defaults), seed=seed, backend=backend,
                                 denoise=denoise, capturable=capturable)
        for group, filled in zip(groups, self._engine.param_groups):
            for key in (*NOISE_DEFAULTS, SEED_KEY):
                group[key] = filled[key]
        self._engine.param_groups = groups
        self._init_hooks()

    def _init_hooks(self) -> None:
        """What torch.optim.Optimizer.__init__ sets up besides groups and state: the hook
        registries and the step wrapper that runs them (NVRM has no groups or state of its own)."""
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # ------------------------------------------------------------------ the inner optimizer's data
    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.optimizer.state = state

    def __getstate__(self):
        return {"optimizer": self.optimizer, "_engine": self._engine, "_noise_defaults": self._noise_defaults,
                "defaults": self.defaults}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (f"NVRM(seed={self.seed}, variability={self._noise_defaults['variability']}, "
                f"num_iters={self._noise_defaults['num_iters']}, noise_type={self._noise_defaults['noise_type']!r},\n"
                f"{inner}\n)")

    def _bound_engine(self, check_inner_state: bool = True) -> NoiseSwap:
        """The engine, looking at the inner optimizer's groups as they are now: a load (the inner
        optimizer's own, too) replaces the list, add_param_group on the inner optimizer appends
        groups without noise hyperparameters (they get the defaults here)."""
        engine = self._engine
        if check_inner_state:
            inner_states = self.optimizer.state
            if inner_states and (not engine.state or _NOISE_STEP_ENTRY in _first_dict(inner_states)):
                _refuse_entries_loaded_past_nvrm(inner_states)
        groups = self.optimizer.param_groups
        if engine.param_groups is not groups:
            engine.param_groups = groups
        seed = None
        for group in groups:
            if SEED_KEY not in group or "noise_type" not in group:
                seed = engine._seed if seed is None else seed
                for key, value in self._noise_defaults.items():
                    group.setdefault(key, value)
                group.setdefault(SEED_KEY, seed)
        return engine

    # ------------------------------------------------------------------ step
    def step(self, closure=None):
        """The inner optimizer's step on the perturbed weights, then the noise swap for every
        parameter with a gradient. Checks first (the groups' noise values, the seed, weights
        rewritten since the last step): an error there changes nothing."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError("NVRM does not take grad_scale / found_inf (GradScaler's fused protocol): "
                               "GradScaler unscales the gradients and skips inf steps itself for NVRM, which "
                               "does not declare _step_supports_amp_scaling; nothing was changed")
        engine = self._bound_engine()
        engine.check_weights_before_update()
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        engine._step()  # not engine.step(): torch's global step hooks see the NVRM step only
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """The inner optimizer's add_param_group, with the noise hyperparameters checked (and
        defaults filled in) first; a group the noise cannot follow is taken back out."""
        engine = self._bound_engine()
        probe = {**self._noise_defaults, **{k: param_group[k] for k in NOISE_DEFAULTS if k in param_group}}
        engine._validate_group(probe)
        groups = self.optimizer.param_groups
        count = len(groups)
        self.optimizer.add_param_group(param_group)
        added = groups[count:]
        try:
            for group in added:
                for p in group["params"]:
                    if not p.is_floating_point():
                        raise ValueError(f"NVRM supports real floating-point parameters only, got a parameter "
                                         f"of dtype {p.dtype}")
                    V.check_parameter("NVRM: a parameter", _local(p), _is_dense)
                    _global_offset(p)  # raises for shardings the noise cannot follow
                engine._check_backends(group["params"])
        except BaseException:
            del groups[count:]
            raise
        for group in added:
            group.update({key: probe[key] for key in NOISE_DEFAULTS})
            group[SEED_KEY] = engine.seed

    # ------------------------------------------------------------------ the noise engine's API
    @property
    def seed(self) -> int:
        return self._bound_engine().seed

    @property
    def noise_removed(self) -> bool:
        return self._engine.noise_removed

    @property
    def removal_token(self) -> int:
        """Which entry into the removed state the noisy copies come from (0: none yet); see
        NoiseEngine."""
        return self._engine.removal_token

    @property
    def carries_noise(self) -> bool:
        """Whether some parameter holds noise now (see NoisyOptimizer)."""
        return self._engine.carries_noise

    def denoised(self):
        """Context manager: the clean weights inside the block, the noisy ones back bit for bit on exit."""
        return self._bound_engine().denoised()

    def remove_noise(self) -> None:
        self._bound_engine().remove_noise()

    def restore_noise(self) -> None:
        self._bound_engine().restore_noise()

    def reset_noise(self) -> None:
        self._bound_engine().reset_noise()

    def clean_state_dict(self, module: torch.nn.Module) -> dict:
        return self._bound_engine().clean_state_dict(module)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The inner optimizer's state_dict, each parameter's state extended with the noise
        engine's entries (prefixed ``nvrm_``: counters, compensation, weight samples or noisy
        copies), and the seed: in every param group and in the top-level ``nvrm`` entry. One
        flat state per parameter, so checkpoint paths that keep only 'state' and 'param_groups'
        (torch.distributed.checkpoint) keep the noise bookkeeping too."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        engine = self._bound_engine()
        noise = engine.state_dict()
        inner = self.optimizer.state_dict()
        states = {index: dict(state) for index, state in inner["state"].items()}
        for index, state in noise["state"].items():
            entry = states.setdefault(index, {})
            for key, value in state.items():
                entry[STATE_PREFIX + key] = value
        sd = {**inner, "state": states,
              STATE_DICT_KEY: {**noise[STATE_DICT_KEY], "format": _FORMAT, "optimizer": type(self).__name__,
                               "inner": type(self.optimizer).__name__}}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the inner optimizer's state and the noise bookkeeping (seed included) from
        NVRM.state_dict(). Both halves are checked before either is loaded."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        engine = self._bound_engine(check_inner_state=False)  # a load through here is the remedy
        if not isinstance(state_dict, dict):
            raise TypeError(f"NVRM.load_state_dict expects a dict, got {type(state_dict).__name__}")
        extra = state_dict.get(STATE_DICT_KEY)
        if isinstance(extra, dict):
            saved_by = extra.get("optimizer")
            if saved_by != type(self).__name__:
                raise ValueError(f"NVRM.load_state_dict: this state_dict was saved by {saved_by}, not by NVRM; "
                                 "its per-parameter state does not fit (nothing was loaded)")
            inner_name = extra.get("inner")
            if inner_name is not None and inner_name != type(self.optimizer).__name__:
                raise ValueError(f"NVRM.load_state_dict: this state_dict holds the state of {inner_name}, this "
                                 f"NVRM wraps {type(self.optimizer).__name__} (nothing was loaded)")
        states = state_dict.get("state", {})
        if not isinstance(states, dict):
            raise ValueError(f"NVRM.load_state_dict: 'state' must be a dict, got a {type(states).__name__}")
        inner_states, noise_states = {}, {}
        for index, state in states.items():
            if not isinstance(state, dict):
                raise ValueError(f"NVRM.load_state_dict: the state of parameter {index!r} is not a dict")
            inner_states[index] = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
            noise = {k[len(STATE_PREFIX):]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
            if noise:
                noise_states[index] = noise
            if not inner_states[index]:
                del inner_states[index]
        groups = state_dict.get("param_groups")
        noise_sd = {"state": noise_states, "param_groups": groups}
        if isinstance(extra, dict):
            noise_sd[STATE_DICT_KEY] = {**extra, "optimizer": type(engine).__name__}
        engine._seed_of(noise_sd)  # both halves checked before anything changes
        engine._check_loadable(noise_sd)
        self.optimizer.load_state_dict({**state_dict, "state": inner_states})
        try:
            engine.load_state_dict(noise_sd)
        finally:
            engine.param_groups = self.optimizer.param_groups
            self._bound_engine(check_inner_state=False)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


_NOISE_STEP_ENTRY = STATE_PREFIX + "noise_step"
# Where wrappers keep the optimizer they wrap: Lightning (_optimizer), accelerate (optimizer),
# FusedAMP (base_optimizer), ZeroRedundancyOptimizer (optim: the local optimizer).
_WRAPPED = ("_optimizer", "optimizer", "base_optimizer", "optim")


def _noise_carrier_in(optimizer):
    """The optimizer in `optimizer`'s chain of wrappers that already puts noise on the weights
    (a NoisyOptimizer: say ZeroRedundancyOptimizer(optimizer_class=FusedVSGD)), else None."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, NoisyOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = next((getattr(optimizer, name) for name in _WRAPPED if getattr(optimizer, name, None) is not None),
                         None)
    return None


def _first_dict(states) -> dict:
    """The first per-parameter state, or {} (ZeroRedundancyOptimizer keeps None for the
    parameters other ranks own)."""
    first = next(iter(states.values()), None)
    return first if isinstance(first, dict) else {}


def _refuse_entries_loaded_past_nvrm(inner_states) -> None:
    """NVRM's own entries in the inner optimizer's state mean that an NVRM state_dict was written
    into the inner optimizer directly, not through NVRM.load_state_dict: ZeroRedundancyOptimizer's
    load does that to its local optimizer, ZeroRedundancyOptimizer(optimizer_class=<an NVRM
    factory>). The noise bookkeeping stayed behind, so the noise on the weights is unknown: every
    use of the noise is refused (checked in full only while the engine has no state, and on the
    first parameter's state otherwise, so that a step pays no per-parameter scan)."""
    for state in inner_states.values():
        if isinstance(state, dict) and any(isinstance(key, str) and key.startswith(STATE_PREFIX) for key in state):
            raise RuntimeError(
                "NVRM: the inner optimizer's state holds NVRM's own entries (nvrm_noise_step, ...): a state_dict "
                "saved by NVRM was loaded into the inner optimizer directly, not through NVRM.load_state_dict "
                "(ZeroRedundancyOptimizer(optimizer_class=<NVRM>).load_state_dict does that), so the noise on "
                "the weights is unknown; nothing was changed. Load it with NVRM.load_state_dict, or wrap the other "
                "way round: NVRM(ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, ...))")
