"""The steady step: a step laid out like the last full one -- the same groups, the same
parameters with gradients, in the same buckets and plans -- is found with a few C-level scans
(steady_work) instead of the full path's per-tensor validation, so that a step's host time
stays at or below torch's fused optimizers' (bench/test_host_overhead.py)."""
from __future__ import annotations

import itertools
import operator

from ..keys import SEED_KEY
from . import scan
from .bucket import BucketWork

_PARAMS = operator.itemgetter("params")
_SEED = operator.methodcaller("get", SEED_KEY)
_GAVE_UP = False  # SteadyCheck._grad_guard: the scans alone (see steady_grad_pointers)


def steady_work(layout, state, groups, flat_params, seed: int):
    """The work of a step laid out like the last full one -- the same groups, the same
    parameters with gradients, in the same buckets and plans -- found with a few C-level
    scans instead of the full path's per-tensor validation, which would cost more host time
    than torch's fused step. The buckets keep the backends the full path
    resolved (what can run where does not change within a process). Returns [BucketWork],
    or None: then _prepare_work validates (raising
    its errors) and rebuilds."""
    if (layout is None or state is not layout.state or len(state) != len(layout.state_keys)
            or not all(map(operator.is_, state, layout.state_keys))
            or not all(map(operator.is_, state.values(), layout.state_values))):
        return None
    if (len(groups) != len(layout.groups) or not all(map(operator.is_, groups, layout.groups))
            or list(map(len, map(_PARAMS, groups))) != layout.lengths):
        return None
    params = flat_params()
    if not all(map(operator.is_, params, layout.params)):
        return None
    grads = list(map(scan.GRAD, params))
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
        work.append(BucketWork(bucket, backend, plan, bucket_grads, grad_pointers))
    # seed: the groups' (_sync_seed); any other value takes the full path
    if not all(map(operator.eq, itertools.repeat(seed), map(_SEED, groups))):  # not seed.__eq__: NotImplemented is truthy
        return None
    return work


class _StepLayout:
    """Who took part in the last full step: the groups and parameters (by identity), which
    parameters had no gradient, and each bucket's plan with the positions of its rows among the
    parameters. steady_work compares a step with it; the plans vouch for the rest
    (_BucketPlan.steady_grad_pointers)."""

    def __init__(self, state, groups, params: list, bucket_rows: list, work: list):
        self.state = state
        # which state dict each parameter has (the plans hold the dicts), read without hashing a tensor
        self.state_keys = list(state)
        self.state_values = list(state.values())
        self.groups = list(groups)
        self.lengths = [len(group["params"]) for group in self.groups]
        self.params = params  # a row's key is its position here
        present = {key for rows in bucket_rows for key in rows}
        self.absent = [key for key in range(len(self.params)) if key not in present]
        everything = list(range(len(self.params)))
        self.buckets = [(bucket, backend, plan, None if rows == everything else _picker(rows))
                        for rows, (bucket, backend, plan, _, _) in zip(bucket_rows, work)]


def _picker(rows: list):
    """A function taking the items at positions `rows` out of a list, in C (itemgetter)."""
    getter = operator.itemgetter(*rows)
    return (lambda items: (getter(items),)) if len(rows) == 1 else getter


class SteadyCheck:
    """What a _BucketPlan (plan.py) checks of a steady step."""

    def steady_grad_pointers(self, grads) -> list | None:
        """The gradients' addresses if this plan fits the step as it is: every gradient a plain
        tensor with exactly the dtype, shape and strides its parameter had when the plan was
        built (read in place, nothing to convert), every parameter still at its address, every
        group with the state needs the plan was built for -- with steady_work's check of the
        state dicts, what the full path's validation and plan signature check, compared as
        whole lists (the gradients' layout in one C++ call where torch has one:
        scan.layout_guard). None otherwise (the full path then raises its errors, converts or rebuilds).

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
        guard = self._grad_guard
        if guard is None or guard is _GAVE_UP or not scan.guard_passes(guard, grads):
            try:
                if (list(map(type, grads)) != types or list(map(scan.DTYPE, grads)) != dtypes
                        or list(map(scan.SHAPE, grads)) != shapes or list(map(scan.STRIDE, grads)) != strides):
                    return None
            except RuntimeError:  # sparse gradients have no strides
                return None
            # These gradients pass: the next steps' are checked in one C++ call where torch has it.
            # One that refuses gradients the scans pass (it also compares requires_grad and the
            # dispatch keys, which inference_mode changes) is not made again for this plan.
            self._grad_guard = (scan.layout_guard(grads, shapes, strides) or _GAVE_UP) if guard is None else _GAVE_UP
        params = self.param_tensors
        if (list(map(scan.DATA_PTR, params)) != addresses
                or [self.rule.state_signature(group) for group in self.groups] != self.state_signatures):
            return None
        if self.backend.host_tables and (list(map(scan.SHAPE, params)) != shapes or list(map(scan.STRIDE, params)) != strides
                                      or list(map(scan.DTYPE, params)) != dtypes):
            return None  # its torch ops read the parameters as they are now, not the storage the plan kept
        states = self.states
        try:
            for getter, key, tensors in self._state_refs:
                now = map(getter, states) if getter is not None else map(dict.get, states, itertools.repeat(key))
                if not all(map(operator.is_, now, tensors)):
                    return None
        except KeyError:  # a state tensor deleted from its dict
            return None
        return list(map(scan.DATA_PTR, grads))
