"""The checkpoint half of the noise engine: pickling, state_dict / load_state_dict with the seed
and the noise bookkeeping, what a load must refuse before anything changes, and the seed kept in
the param groups (the source of truth: some checkpoint paths restore only the groups)."""
from __future__ import annotations

import torch

from ..backends import tables as T
from . import relative, validation as V, weights
from .denoise import _REMOVALS
from .launch.bucket import BlockTables
from .params import _is_dtensor, _number
from .keys import NOISY_COMPENSATION_KEY, NOISY_KEYS, NOISY_PARAM_KEY, NOISY_STEP_KEY, SEED_KEY, STATE_DICT_KEY
from .seed import is_seed



class CheckpointMixin:
    """The noise engine's state_dict, load_state_dict, pickling and seed (module docstring)."""

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
        self._forget_launch_data()  # torch's load_state_dict comes here too

    def _forget_launch_data(self) -> None:
        """Drop everything built from the parameters, their state dicts and their groups -- the
        launch plans, block tables, weight records, the last step's layout, the validated
        groups -- when those are replaced wholesale (unpickling, load_state_dict). Plans a
        captured CUDA graph still replays stay alive (_retired_plans)."""
        self._block_tables = BlockTables()
        self._retired_plans = getattr(self, "_retired_plans", []) + [
            plan for plan in getattr(self, "_plans", {}).values()
            if plan.live is not None and plan._graph_owned]
        self._plans = {}
        self._records = {}
        self._loaded = []  # a load sets it after this
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
        if not is_seed(seed):
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
        self._seed = seed
        self._forget_launch_data()  # done by torch's load (through __setstate__) too: not relied on
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
        if not is_seed(seed):
            raise ValueError(f"{name}.load_state_dict: invalid seed {seed!r}; nothing was loaded")
        return int(seed)


def _host_counters(state: dict, row=None) -> dict:
    """A copy of one parameter's state with live counters as plain numbers (the host-mode
    checkpoint format, loadable with or without capturable). `row`: its live counters already
    copied to the host, else each is read on its own."""
    out = dict(state)
    for column, (key, kind) in enumerate(zip(T.LIVE_STATE_KEYS, (int, int, int, float, bool))):
        if key in out:
            out[key] = kind(row[column] if row is not None else _number(out[key]))
    spread = out.get(relative.STATE_KEY)
    if isinstance(spread, torch.Tensor):  # relative variability's spread on the device: a float, as in host mode
        out[relative.STATE_KEY] = float(row[T.LIVE_COLUMNS] if row is not None and len(row) > T.LIVE_COLUMNS
                                        else _number(spread))
    if out.pop("momentum_fresh", False):
        out.pop("momentum_buffer", None)  # never used yet: the next step initialises it
    return out
