"""Command-line value checks shared by `nvrm-demo` and `python -m nvrm_ext.demo.tune`.

Every value is checked while the command line is parsed, so a bad value costs a one-line
message and exit status 2, never a traceback after minutes of training. The `type=`
functions raise argparse.ArgumentTypeError, which argparse reports as
"argument --flag: <message>".
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (prog, the message, where to look), not the
    multi-line usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


def _bounded(kind, *, above=None, at_least=None, below=None, at_most=None, what: str):
    """A type= function parsing `kind` and accepting only values in the given bounds."""
    def parse(text: str):
        value = _number(text, kind)
        if ((above is not None and not value > above) or (at_least is not None and not value >= at_least)
                or (below is not None and not value < below) or (at_most is not None and not value <= at_most)):
            raise argparse.ArgumentTypeError(f"must be {what}; got {text}")
        return value
    return parse


positive_int = _bounded(int, at_least=1, what="an integer >= 1")
nonnegative_int = _bounded(int, at_least=0, what="an integer >= 0")
positive_float = _bounded(float, above=0.0, what="a number > 0")
nonnegative_float = _bounded(float, at_least=0.0, what="a number >= 0")
probability = _bounded(float, at_least=0.0, at_most=1.0, what="in [0, 1]")
below_one = _bounded(float, at_least=0.0, below=1.0, what="in [0, 1)")


def int_at_least(minimum: int, why: str):
    return _bounded(int, at_least=minimum, what=f"an integer >= {minimum} ({why})")


def int_between(minimum: int, maximum: int, why: str):
    return _bounded(int, at_least=minimum, at_most=maximum, what=f"an integer in [{minimum}, {maximum}] ({why})")


def torch_device(text: str) -> str:
    """'cpu' or a CUDA device this process can allocate on, checked now rather than at the
    first tensor (the optimizers' fused kernels exist for these two device types)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N; got {text!r}")
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this torch build ({torch.__version__}) has no CUDA support; use --device cpu")
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available (no GPU visible); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: only {count} CUDA device(s) visible")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise argparse.ArgumentTypeError(f"{text!r} cannot be used here: {reason}") from None
    return text


def distinct(values: list, flag: str) -> str | None:
    """The error for a repeated value in a list option (each value names a run), or None."""
    repeated = sorted({v for v in values if values.count(v) > 1})
    return f"argument {flag}: each value once; repeated: {' '.join(f'{v:g}' for v in repeated)}" if repeated else None


def writable_directory(out: Path, filenames: list[str]) -> str | None:
    """Create `out` (with its parents) and check that `filenames` can be written into it.

    Returns the one-line error, or None. Done before any training, so a bad --out costs
    nothing; the directory is left in place (empty if it was created here).
    """
    where = f"argument --out: {str(out)!r}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"{where} is a file, not a directory"
    except OSError as error:
        return f"{where}: cannot create the directory: {error.strerror or error}"
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        return f"{where}: cannot write into the directory: {error.strerror or error}"
    for name in filenames:
        target = out / name
        if target.is_dir():
            return f"{where}: {name} is a directory; results could not be saved over it"
        if target.exists() and not os.access(target, os.W_OK):
            return f"{where}: {name} exists and is not writable"
    return None


def fail(prog: str, message: str, status: int = 2):
    """Exit with one line on stderr, in argparse's format (for checks made after parsing)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def command_line(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
