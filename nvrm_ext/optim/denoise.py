"""The denoise half of the noise engine: taking the noise off the weights and putting it back
(remove_noise / restore_noise / denoised), declaring the weights clean (reset_noise), clean
copies for saving (clean_state_dict), and the noise-only launch (tables.OP_NOISE) they share."""
from __future__ import annotations

import contextlib
import itertools
import operator

import torch

from .. import _compiler
from ..backends import tables as T
from . import relative, validation as V, weights
from .params import _compensation, _fp32, _global_offset, _local, _number, _refuse_capture

# numbers every entry into the removed state (DenoiseMixin.removal_token)
_REMOVALS = itertools.count(1)
_NOISY_PARAM = operator.itemgetter(1)  # the param of a (key, param, state, noise) row
_increment_versions = torch._C._increment_version  # torch.autograd.graph.increment_version's C call


class DenoiseMixin:
    """The noise engine's removal, restoration and reset of the noise (module docstring)."""

    @property
    def noise_removed(self) -> bool:
        """True between remove_noise() and restore_noise() (or inside denoised()): the
        parameters hold the clean weights and the optimizer holds the noisy ones."""
        return self._held is not None

    @property
    def carries_noise(self) -> bool:
        """Whether some parameter holds noise now: stepped since it was last clean, and the
        noise not removed. Reads the counters (a sync where they live on a device)."""
        return self._held is None and any(_number(state.get("noise_step", 0)) for state in self.state.values())

    @property
    def removal_token(self) -> int:
        """Which removal the held noisy copies come from: a number that changes at every entry
        into the removed state (remove_noise(), or load_state_dict() of a state saved while the
        noise was removed; 0 before any). Whoever removed the noise can compare it later to tell
        whether the copies held now are the ones that removal made, or came with a load."""
        return self._removal_id

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
            plan.forget_committed()  # its copy of the counters says noise; the dicts now say none
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
        order, then its weight_std where the state holds the plan's view), one device-to-host
        copy per bucket instead of one read per counter; empty in host mode."""
        rows = {}
        for plan in self._plans.values():
            if plan.live is not None:  # and the spread (relative variability) where the state holds its view
                values = torch.cat([plan.live, plan.weight_stds[:, None]], 1).cpu().tolist()
                base, size = plan.weight_stds.data_ptr(), plan.weight_stds.element_size()
                for row, (state, value) in enumerate(zip(plan.states, values)):
                    spread = state.get(relative.STATE_KEY)
                    if not (isinstance(spread, torch.Tensor) and spread.data_ptr() == base + row * size):
                        value.pop()
                    rows[id(state)] = value
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
        for bucket, members in T.by_bucket(noisy, _NOISY_PARAM).items():
            plans = [T.TensorPlan(param=_local(p), grad=None, states=(), key=key, offset=_global_offset(p),
                                  compensation=_local(state.get("compensation")), old_step=s, new_step=0,
                                  flags=(code << T.FLAG_OLD_TYPE_SHIFT) | (code << T.FLAG_NEW_TYPE_SHIFT),
                                  floats=_fp32([0.0] * T.F_OLD_SCALE + [scale] * 2))
                     for key, p, state, (s, code, scale) in members]
            ints, floats = T.build_rows(plans)
            rows = [(plan.param, None, (), plan.compensation) for plan in plans]
            backend = self._resolve_backend(*bucket)
            self._launch(backend, T.OP_NOISE, bucket, rows, ints, floats)
            if backend.writes_through_addresses:  # see _BucketPlan.bump_versions
                _increment_versions([t for param, _, _, comp in rows for t in (param, comp) if t is not None])
