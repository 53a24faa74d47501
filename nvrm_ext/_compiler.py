"""torch.compile helpers that keep ``import nvrm_ext`` from importing torch._dynamo.

``@torch.compiler.disable`` imports torch._dynamo (and with it triton, sympy, ...) the moment it
decorates, which made ``import nvrm_ext`` take seconds longer than ``import torch``.
"""
from __future__ import annotations

import functools
import sys

import torch


def disable(fn):
    """``torch.compiler.disable(fn)``, built on the first call that needs it.

    Calls go straight to ``fn`` unless torch.compile is tracing the caller (is_compiling(),
    which torch.compile reads as True while it traces this wrapper); then they go through
    ``torch.compiler.disable(fn)``, made once, so the compiled caller breaks its graph at this
    call instead of tracing ``fn``. Eager calls skip the disable wrapper's frame switching
    (a few microseconds per optimizer step).
    """
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if not is_compiling():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper


def is_compiling() -> bool:
    """Whether torch.compile is tracing the caller (False on torch < 2.3, which lacks the query,
    and whenever torch._dynamo has not even been imported)."""
    if "torch._dynamo" not in sys.modules:
        return False
    query = getattr(torch.compiler, "is_compiling", None)
    return bool(query and query())
