"""The noise seed: drawn from torch's generator, the same on every data-parallel rank, checked
wherever it enters (construction, the param groups, a load)."""
from __future__ import annotations

import numbers

import torch

from .keys import SEED_KEY  # noqa: F401  (the seed's place in the param groups)


def is_seed(value) -> bool:
    """Whether `value` is a valid 64-bit noise seed (an integer in [0, 2**64), not a bool)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and 0 <= value < 2**64


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
