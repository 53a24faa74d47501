"""Host mode: the counters live in `optimizer.state` as numbers. Each step reads them (a
float64 mirror, reused while the state dicts hold what the last step wrote), resolves them into
the tables (on the CPU the kernel does it from the mirror), launches, and commits them into the
state dicts."""
from __future__ import annotations

import collections
import itertools
import operator

from typing import NamedTuple

import numpy as np
import torch

from ...backends import tables as T
from .. import validation as V
from .bucket import launch

_HOST_COUNTER_KEYS = T.LIVE_STATE_KEYS[:T.L_FRESH]  # what optimizer.state holds in host mode
_HOST_COUNTER_GETTERS = tuple(map(operator.itemgetter, _HOST_COUNTER_KEYS))
_exhaust = collections.deque(maxlen=0).extend  # runs an iterator to its end in C


class PreparedLaunch(NamedTuple):
    """Host mode on the CPU: the launch CompiledBackend.prepare checked once for these tables."""

    host_tables: object  # the plan's HostTables it was prepared for (compared by identity)
    seed: int
    call: object  # PreparedCpuLaunch: one library call


class HostLaunch:
    """The host-mode launch of a _BucketPlan (plan.py)."""

    def ready_host_launch(self, bucket, ints: np.ndarray, seed: int) -> None:
        """Host mode: what can still fail before this step's launch (the block table; on the
        CPU the launch prepared once per table set and seed, CompiledBackend.prepare, which
        checks its arguments), done for every bucket before any launches."""
        backend = self.backend
        if backend.block_size and self.host_blocks is None:
            self.host_blocks = self.block_tables.get(backend, bucket[0], ints)
        if self._kernel_resolves and backend.name == "cpu":
            prepared = self._prepared
            if prepared is None or prepared.host_tables is not self._host_tables or prepared.seed != seed:
                _, ints, floats = self._host_tables
                self._prepared = PreparedLaunch(self._host_tables, seed, backend.prepare(
                    self.rule.op, bucket[1], torch.from_numpy(ints), torch.from_numpy(floats), self.host_blocks,
                    seed, commit_rows=len(ints), samples=self.samples))

    def host_launch(self, bucket, ints: np.ndarray, floats: np.ndarray, seed: int) -> None:
        """Host mode: the launch of this step's tables (from tables(), readied by
        ready_host_launch()), then commit(). On the CPU the prepared launch is one library call:
        the tables stay at their addresses."""
        backend = self.backend
        if self._kernel_resolves and backend.name == "cpu":
            self._prepared.call()
        else:
            launch(backend, self.rule.op, bucket, self.rows, ints, floats, seed, self.host_blocks, self.block_tables,
                   commit_rows=len(ints) if self._kernel_resolves else 0, samples=self.samples)
        self.commit()

    def _counters(self) -> tuple:
        """Host mode: the rows' counters as float64 [T, LIVE_COLUMNS] from the state dicts.
        When the dicts hold what the last commit() wrote (nobody changed them since), its array
        is reused instead of converting every value again, and those columns are returned too
        (commit() then rewrites only the keys whose values change); else None and a new array."""
        states = self.states
        try:
            columns = [list(map(getter, states)) for getter in _HOST_COUNTER_GETTERS]
        except KeyError as error:
            columns = None
            missing = error
        try:
            same = columns is not None and self._committed is not None and columns == self._committed[0]
        except RuntimeError:  # a tensor edited into a counter compares elementwise: checked below
            same = False
        if same:
            return columns, self._committed[1]  # its L_FRESH column is 0, as momentum_init after commit()
        name = self.owner
        for key, state in zip(self.static_ints[:, T.I_KEY].tolist(), states):  # edited or new: check them
            where = f"{name}: parameter {key}'s state"
            if columns is None and not set(_HOST_COUNTER_KEYS) <= set(state):
                raise ValueError(f"{where} lacks {missing}; drop the state (del optimizer.state[p]) to start "
                                 "the parameter afresh, or load a complete one")
            V.check_counters(where, state)
        n = len(states)
        counters = np.empty((n, T.LIVE_COLUMNS), dtype=np.float64)
        for column, values in enumerate(columns):
            counters[:, column] = np.fromiter(values, np.float64, n)
        counters[:, T.L_FRESH] = self.momentum_init
        return None, counters

    def forget_committed(self) -> None:
        """The state dicts were declared clean (reset_noise()): the counters the last commit()
        wrote say noise is on the weights, so they must not be reused or refilled from."""
        self._committed = None

    def commit(self) -> None:
        """Host mode: record the launched step in the per-parameter state. The noise type and
        scale each row now carries are its group's (from _group_columns); the steps come from
        the committed counters."""
        ints, floats, counters, group_tables, committed_columns = self._pending
        new_scales, new_types = group_tables.new_scales, group_tables.new_types
        scale_values = group_tables.new_scale_values
        if not self._kernel_resolves:  # else the launch committed them into `counters`
            T.commit_rows(ints, floats, counters)
        counters[:, T.L_NOISE_SCALE] = new_scales  # as the state holds it (the kernels: the float32 value)
        columns = counters[:, :T.L_NOISE_TYPE].astype(np.int64).T.tolist() + [new_types, scale_values]
        for key, values, before in zip(_HOST_COUNTER_KEYS, columns, committed_columns or [None] * len(columns)):
            if values != before:  # steps always; noise type and scale only when a group changed them
                _exhaust(map(operator.setitem, self.states, itertools.repeat(key), values))  # looped in C
        self._committed = (columns, counters)
        if self._fresh:
            self.momentum_init[:] = False
            self._fresh = False
        self._pending = None
        self._grads = None
