"""Weight records: how the engine's last operation left each parameter -- its state dict,
version counter, storage address and a few of its values (tables.SAMPLE_SIZE) -- so that weights
rewritten outside the optimizer while they carry its noise are refused (WeightsChangedError)
with nothing changed, instead of corrupted by removing noise that is no longer on them.

A step records its bucket's parameters in the bucket's plan (cheap enough for every step:
_BucketPlan.record_weights); everything else works on per-parameter records in
`optimizer._records`, into which the plans' records are spilled first.
"""
from __future__ import annotations

import torch

from ..backends import tables as T
from .params import _local, _number


class WeightsChangedError(RuntimeError):
    """The parameters were changed outside the optimizer (model.load_state_dict, copy_, ...)
    while it believed its noise was on them: removing or regenerating that noise would corrupt
    them, so nothing was changed."""


class WeightRecordsMixin:
    """The noise engine's weight records (see the module docstring)."""

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
        records = self._records
        for rows in T.by_bucket(range(len(tensors)), tensors.__getitem__).values():
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
            "optimizer (model.load_state_dict, copy_, ...), or by a step() interrupted part way (an "
            "exception or KeyboardInterrupt inside it), while it carried the optimizer's noise; "
            "removing or regenerating that noise now would corrupt it, so nothing was changed. If the "
            "parameters now hold clean weights (e.g. a clean or best checkpoint), call "
            "optimizer.reset_noise(); if they are noisy weights saved with an optimizer state, load that "
            "state with optimizer.load_state_dict(...)")

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


def _record_key(state: dict, t: torch.Tensor) -> tuple:
    """What a weight record compares first: the state dict, version counter and address."""
    return id(state), t._version, t.data_ptr()


def _samples_differ(tensors, recorded) -> list:
    """Per tensor, whether its sample now differs bitwise from the recorded one; one
    device-to-host read per (device, dtype) for all of them."""
    out = [True] * len(tensors)
    comparable = []
    for i, (t, r) in enumerate(zip(tensors, recorded)):
        if t.dtype == r.dtype and t.numel() and min(T.SAMPLE_SIZE, t.numel()) == r.numel():
            comparable.append(i)
        elif not t.numel() and not r.numel():
            out[i] = False
    for (device, _), rows in T.by_bucket(comparable, tensors.__getitem__).items():
        now = torch.cat([T.sample_view(tensors[i]) for i in rows])
        then = torch.cat([recorded[i].to(device) for i in rows])
        flags = (_bits(now) != _bits(then)).tolist()
        position = 0
        for i in rows:
            count = recorded[i].numel()
            out[i] = any(flags[position:position + count])
            position += count
    return out


_NO_RECORD = (None, None, 0, 0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so that NaN == NaN and -0 != +0 when comparing)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)
