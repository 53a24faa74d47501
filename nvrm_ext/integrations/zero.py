"""ZeroRedundancyOptimizer (torch.distributed.optim): clean weights on every rank.

Each rank's local optimizer (``zero.optim``) steps and perturbs only the parameters that rank
owns; the others hold the noisy values their owners broadcast. So ``zero.optim.denoised()``
cleans only the local shard. `denoised(zero)` cleans all of them on every rank:

    with nvrm_ext.integrations.zero.denoised(zero):
        evaluate(model)            # same clean weights on every rank
        if rank == 0: torch.save(model.state_dict(), path)

It is collective: every rank of the optimizer's process group must enter it together.

``NVRM(ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, ...))`` puts the noise
on all parameters on every rank instead (after ZeRO's step has broadcast the updated shards, every
rank regenerates the same noise from the same seed): its own ``denoised()`` cleans everything
without communication, and `denoised(nvrm)` is that.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ._common import NoiseRemoval, unwrap, unwrap_to

__all__ = ["denoised"]


@contextlib.contextmanager
def denoised(zero):
    """Clean weights on every rank inside the block, each rank's noisy weights back bit for bit
    on exit. Every rank holds a copy of all parameters meanwhile (one model's worth of memory);
    the owner of each parameter removes its noise and broadcasts the clean values. Around
    NVRM(ZeroRedundancyOptimizer(...)) every rank removes the noise of all parameters itself."""
    outer = unwrap(zero)
    zero = _zero_of(zero)
    local = unwrap(zero.optim)
    if local is None and outer is not None:  # NVRM(ZeRO(...)): the noise is on every parameter, every rank
        removal = NoiseRemoval()
        try:
            removal.remove([outer])
            yield zero
        finally:
            removal.restore()
        return
    if local is None:
        raise TypeError(f"denoised(zero): the local optimizer is a {type(zero.optim).__name__}, not an "
                        "nvrm_ext optimizer (ZeroRedundancyOptimizer(..., optimizer_class=FusedVSGD), or "
                        "NVRM(ZeroRedundancyOptimizer(...)) around it)")
    group = zero.process_group
    owner_of = zero._param_to_rank  # ZeroRedundancyOptimizer's own partition (rank in `group`)
    params = [p for g in zero.param_groups for p in g["params"]]
    with torch.no_grad():
        held = {p: p.detach().clone() for p in params if owner_of[p] != zero.rank}
        removal = NoiseRemoval()
        try:
            removal.remove([local])
            for p in params:
                dist.broadcast(p.detach(), src=dist.get_global_rank(group, owner_of[p]), group=group)
            yield zero
        finally:
            removal.restore()  # this rank's own parameters: the optimizer's exact noisy copies
            for p, noisy in held.items():
                p.copy_(noisy)


def _zero_of(optimizer):
    """The ZeroRedundancyOptimizer `optimizer` is (or wraps), or a TypeError naming what to use."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    zero = unwrap_to(optimizer, ZeroRedundancyOptimizer)
    if zero is not None:
        return zero
    if unwrap(optimizer) is not None:
        raise TypeError(f"denoised(zero) takes a ZeroRedundancyOptimizer, got {type(optimizer).__name__}; "
                        "an optimizer that is not sharded cleans all its weights itself: use "
                        "`with optimizer.denoised():`")
    raise TypeError(f"denoised(zero) takes a ZeroRedundancyOptimizer (optimizer_class=FusedVSGD or "
                    f"FusedVAdam), got {type(optimizer).__name__}")
