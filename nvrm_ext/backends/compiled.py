"""The compiled backends: csrc/ built into nvrm_ext/_lib/libnvrm_cpu.so and libnvrm_cuda.so.

The libraries export a small C ABI (csrc/api.cpp) loaded with ctypes, so one build serves every
torch version. Each launch is registered as a torch.library custom op (``nvrm_ext::cpu_launch``,
``nvrm_ext::cuda_launch``) so that torch.compile keeps it as one opaque call; eager launches
call the library directly.

``NVRM_EXT_CPU_LIBRARY=/path/libnvrm_cpu.so`` loads that CPU library instead of the packaged one
(read once, at first use): for a checking build such as .ci/sanitize.sh's, with AddressSanitizer
and UBSan, which must never replace the shipped file.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .. import _compiler
from . import tables as T
from .select import rocm, rocm_cuda_library_reason

LIB_DIR = Path(__file__).resolve().parent.parent / "_lib"
CPU_LIBRARY = "libnvrm_cpu.so"
CUDA_LIBRARY = "libnvrm_cuda.so"
BUILD_INFO = "build_info.json"  # written by setup.py: why the CUDA library was skipped, its archs
CPU_LIBRARY_VARIABLE = "NVRM_EXT_CPU_LIBRARY"  # a CPU library to load instead of LIB_DIR's
ABI_VERSION = 5  # csrc/api.cpp kAbiVersion
_REFUSED = 2  # csrc/api.cpp kRefused: invalid arguments or tables, nothing changed

DTYPE_CODES = T.STORAGE_CODES  # the parameter dtypes the libraries run, by their C codes

# What csrc/api.cpp nvrm_table_layout() must report for the tables built by tables.py.
_EXPECTED_LAYOUT = (
    T.INT_COLUMNS, T.FLOAT_COLUMNS, T.FLAG_WEIGHT_DECAY, T.FLAG_MOMENTUM, T.FLAG_MOMENTUM_INIT,
    T.FLAG_NESTEROV, T.FLAG_AMSGRAD, T.FLAG_DECOUPLED, T.FLAG_KEEP_NOISE, T.OP_SGD, T.OP_ADAM,
    T.OP_NOISE, T.I_LIVE, T.I_NUM_ITERS, T.LIVE_COLUMNS, T.SAMPLE_SIZE, T.B_ROW, T.B_START, T.BLOCK_COLUMNS,
    T.NOISE_TYPE_MASK, *(T.STORAGE_CODES[dtype] for dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                             torch.float64)),
)

# op, dtype code, ints, floats, num_rows, blocks, num_blocks, block_size, seed, commit_rows,
# grad_scale, found_inf, sample_rows, samples
_TABLE_ARGS = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
               ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int64,
               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
_UINT64_MASK = (1 << 64) - 1


def build_info() -> dict:
    """What setup.py recorded about the build (empty if the file is missing)."""
    try:
        return json.loads((LIB_DIR / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return {}


def _relative(path: Path) -> str:
    if path.parent != LIB_DIR:  # NVRM_EXT_CPU_LIBRARY
        return f"{path} ({CPU_LIBRARY_VARIABLE})"
    return f"nvrm_ext/_lib/{path.name}"


def _open(path: Path) -> ctypes.CDLL:
    """dlopen the library and check that it matches this Python package."""
    lib = ctypes.CDLL(str(path))
    lib.nvrm_abi_version.restype = ctypes.c_int
    lib.nvrm_last_error.restype = ctypes.c_char_p
    version = lib.nvrm_abi_version()
    if version != ABI_VERSION:
        raise OSError(f"it has ABI version {version}, this nvrm_ext expects {ABI_VERSION}")
    layout = (ctypes.c_int64 * 32)()
    count = lib.nvrm_table_layout(layout, len(layout))
    if tuple(layout[:count]) != _EXPECTED_LAYOUT:
        raise OSError("its launch-table layout differs from nvrm_ext/backends/tables.py")
    return lib


def _source_checkout() -> Path | None:
    """The checkout this nvrm_ext was imported from (setup.py and csrc/ beside the package), or
    None for an installed package. Run from a checkout's root, `import nvrm_ext` finds the source
    tree before any installed copy, and the source tree has libraries only once built in place."""
    root = LIB_DIR.parent.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def _installed_elsewhere() -> Path | None:
    """An installed nvrm_ext (a wheel's files, not an editable link) other than the one imported."""
    from importlib import metadata

    imported = LIB_DIR.parent.resolve()
    try:
        for distribution in metadata.distributions(name="nvrm_ext"):
            for file in distribution.files or ():
                if file.as_posix() == "nvrm_ext/__init__.py":
                    package = Path(distribution.locate_file(file)).resolve().parent
                    if package != imported and package.is_dir():
                        return package
    except Exception:  # unreadable metadata: the message names no installed copy, nothing fails
        return None
    return None


def _build_in_place(root: Path) -> str:
    """The command that builds the libraries into the checkout, with this interpreter."""
    return f"cd {root} && {sys.executable} setup.py build_ext --inplace"


def _missing_library_fix(condition: str = "") -> str:
    """What happened, and the fix (to run `condition`, e.g. with nvcc available), where
    nvrm_ext/_lib/ lacks a library."""
    condition = f" ({condition})" if condition else ""
    root = _source_checkout()
    if root is None:
        return f"reinstall{condition} with pip install ."
    installed = _installed_elsewhere()
    shadowing = f", and it shadows the installed nvrm_ext at {installed}" if installed else ""
    return (f"the nvrm_ext imported is the source checkout at {LIB_DIR.parent}, which has no compiled "
            f"libraries{shadowing}; run from another directory, or build them in place{condition}: "
            f"{_build_in_place(root)}")


def _rebuild_fix() -> str:
    """The fix for a library that is there but does not match this Python package."""
    root = _source_checkout()
    return "reinstall with pip install ." if root is None else f"rebuild it in place: {_build_in_place(root)}"


@lru_cache(maxsize=None)
def _cpu_library() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it cannot be used)."""
    chosen = os.environ.get(CPU_LIBRARY_VARIABLE)
    path = Path(chosen) if chosen else LIB_DIR / CPU_LIBRARY
    fix = f"unset {CPU_LIBRARY_VARIABLE} or correct it" if chosen else None
    if not path.exists():
        return None, f"the CPU library {_relative(path)} is missing: {fix or _missing_library_fix()}"
    try:
        lib = _open(path)
    except (OSError, AttributeError) as error:
        return None, f"the CPU library {_relative(path)} cannot be used ({error}): {fix or _rebuild_fix()}"
    lib.nvrm_cpu_launch.argtypes = _TABLE_ARGS + [ctypes.c_int]
    lib.nvrm_cpu_launch.restype = ctypes.c_int
    lib.nvrm_cpu_variant.restype = ctypes.c_char_p
    lib.nvrm_cpu_select_variant.argtypes = [ctypes.c_char_p]
    return lib, None


@lru_cache(maxsize=None)
def _cuda_library() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it cannot be used). Needs a usable GPU."""
    if rocm():  # not dlopened: its probe would look for an NVIDIA driver behind AMD GPUs
        return None, rocm_cuda_library_reason()
    path = LIB_DIR / CUDA_LIBRARY
    if not path.exists():
        skipped = build_info().get("cuda_skipped")
        if skipped:
            return None, f"the CUDA library was not built: {skipped}"
        return None, f"the CUDA library {_relative(path)} is missing: {_missing_library_fix('with nvcc available')}"
    try:
        lib = _open(path)
    except (OSError, AttributeError) as error:
        return None, (f"the CUDA library {_relative(path)} cannot be used ({error})"
                      f"{_cuda_fix(str(error)) or ': ' + _rebuild_fix()}")
    lib.nvrm_cuda_launch.argtypes = _TABLE_ARGS + [ctypes.c_void_p]
    lib.nvrm_cuda_launch.restype = ctypes.c_int
    if lib.nvrm_cuda_probe() != 0:
        error = lib.nvrm_last_error().decode()
        return None, f"the CUDA library cannot use a GPU: {error}{_cuda_fix(error)}"
    return lib, None


def _cuda_fix(error: str) -> str:
    """What to do about a CUDA library load or probe error ('' when there is nothing to add)."""
    if "insufficient" in error:  # cudaErrorInsufficientDriver: no driver, or one too old
        version = build_info().get("cuda_version")
        built = f"CUDA {version}" if version else "the CUDA version it was built with"
        return (f" (no NVIDIA driver, or one too old: install an NVIDIA driver that supports {built}, "
                f"or rebuild nvrm_ext with an older CUDA toolkit: pip install .)")
    if "GLIBC_" in error:
        return " (this system's glibc is older than the build's: build nvrm_ext on it, pip install .)"
    return ""


def _arch_number(arch: str) -> tuple[int, int]:
    digits = arch.partition("_")[2].rstrip("af")
    return int(digits[:-1]), int(digits[-1])


def arch_runs(capability: tuple[int, int], archs) -> bool:
    """Whether code for `archs` (sm_XY cubins, compute_XY PTX) runs on a GPU of `capability`.

    A cubin runs on its own major version at the same or a higher minor (sm_80 on 8.6), an
    'a' (architecture-specific) cubin only on its exact version; PTX is JIT-compiled by the
    driver for its version and every later one.
    """
    for arch in archs:
        number = _arch_number(arch)
        if arch.startswith("compute_"):
            if tuple(capability) >= number:
                return True
        elif arch.endswith("a"):
            if tuple(capability) == number:
                return True
        elif capability[0] == number[0] and capability[1] >= number[1]:
            return True
    return False


@lru_cache(maxsize=None)
def _device_reason(index: int) -> str | None:
    """None if the CUDA library has code for GPU `index`, else why not (and the fix)."""
    archs = build_info().get("cuda_archs")
    capability = torch.cuda.get_device_capability(index)
    if not archs or arch_runs(capability, archs):
        return None
    major, minor = capability
    return (f"the CUDA library holds code for {' '.join(archs)}, none of which runs on "
            f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}); rebuild it "
            f"for this GPU with a CUDA toolkit that supports it: NVRM_EXT_CUDA_ARCHS=sm_{major}{minor} "
            f"pip install .")


def load_cpu_library() -> ctypes.CDLL:
    lib, reason = _cpu_library()
    if lib is None:
        raise RuntimeError(reason)
    return lib


def load_cuda_library() -> ctypes.CDLL:
    lib, reason = _cuda_library()
    if lib is None:
        raise RuntimeError(reason)
    return lib


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    """A refused launch (invalid arguments or tables: the library checked them before touching
    any tensor) raises ValueError, a failed one (a CUDA error) RuntimeError."""
    if status == _REFUSED:
        raise ValueError(f"nvrm_ext {what} refused, nothing was changed: {lib.nvrm_last_error().decode()}")
    if status != 0:
        raise RuntimeError(f"nvrm_ext {what} failed: {lib.nvrm_last_error().decode()}")


def _signed(seed: int) -> int:
    """A uint64 seed as the int64 a torch op schema carries."""
    seed &= _UINT64_MASK
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _table_arguments(op: int, dtype_code: int, ints: torch.Tensor, floats: torch.Tensor,
                     blocks: torch.Tensor, block_size: int, seed: int, commit_rows: int,
                     grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                     samples: Optional[torch.Tensor]) -> tuple:
    """The arguments both launchers take first, in _TABLE_ARGS order."""
    return (op, dtype_code, ints.data_ptr(), floats.data_ptr(), ints.shape[0], blocks.data_ptr(), blocks.shape[0],
            block_size, seed & _UINT64_MASK, commit_rows, T.address(grad_scale), T.address(found_inf),
            _rows(samples), T.address(samples))


def _run_cpu(op: int, dtype_code: int, ints: torch.Tensor, floats: torch.Tensor,
             blocks: torch.Tensor, block_size: int, seed: int, commit_rows: int,
             grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
             samples: Optional[torch.Tensor]) -> None:
    """The launch on at most torch's intra-op thread count, read when it runs (a compiled graph
    must not keep the count it was traced with)."""
    lib = load_cpu_library()
    arguments = _table_arguments(op, dtype_code, ints, floats, blocks, block_size, seed, commit_rows,
                                 grad_scale, found_inf, samples)
    _check(lib, lib.nvrm_cpu_launch(*arguments, torch.get_num_threads()), "CPU launch")


def _run_cuda(op: int, dtype_code: int, ints: torch.Tensor, floats: torch.Tensor,
              blocks: torch.Tensor, block_size: int, seed: int, commit_rows: int,
              grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
              samples: Optional[torch.Tensor]) -> None:
    lib = load_cuda_library()
    with torch.cuda.device(ints.device):  # the kernel runs on the current device
        stream = torch.cuda.current_stream(ints.device).cuda_stream
        status = lib.nvrm_cuda_launch(*_table_arguments(op, dtype_code, ints, floats, blocks, block_size, seed,
                                                        commit_rows, grad_scale, found_inf, samples), stream)
    _check(lib, status, "CUDA launch")


def _rows(samples: Optional[torch.Tensor]) -> int:
    return 0 if samples is None else samples.shape[0]


# The kernels write the tensors whose addresses the int table holds, which no schema can name;
# `ints` is declared mutated so that torch.compile never drops or reorders the call.
if hasattr(torch.library, "custom_op"):  # torch >= 2.4
    @torch.library.custom_op("nvrm_ext::cpu_launch", mutates_args=("ints", "samples"), device_types="cpu")
    def _cpu_launch(op: int, dtype_code: int, ints: torch.Tensor, floats: torch.Tensor,
                    blocks: torch.Tensor, block_size: int, seed: int, commit_rows: int,
                    grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                    samples: Optional[torch.Tensor]) -> None:
        _run_cpu(op, dtype_code, ints, floats, blocks, block_size, seed, commit_rows, grad_scale,
                 found_inf, samples)

    @torch.library.custom_op("nvrm_ext::cuda_launch", mutates_args=("ints", "samples"), device_types="cuda")
    def _cuda_launch(op: int, dtype_code: int, ints: torch.Tensor, floats: torch.Tensor,
                     blocks: torch.Tensor, block_size: int, seed: int, commit_rows: int,
                     grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                     samples: Optional[torch.Tensor]) -> None:
        _run_cuda(op, dtype_code, ints, floats, blocks, block_size, seed, commit_rows, grad_scale,
                  found_inf, samples)

    @_cpu_launch.register_fake
    @_cuda_launch.register_fake
    def _(op, dtype_code, ints, floats, blocks, block_size, seed, commit_rows, grad_scale,
          found_inf, samples):
        return None
else:
    _cpu_launch, _cuda_launch = _run_cpu, _run_cuda


def _check_scalars(device: torch.device, *scalars) -> None:
    for t in scalars:
        if t is not None and not (t.dtype == torch.float32 and t.numel() == 1 and t.device == device):
            raise ValueError(f"grad_scale / found_inf must be one-element float32 tensors on {device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")


class CompiledBackend:
    """FusedBackend over one of the compiled libraries ('cpu' or 'cuda')."""

    uses_alignment_flag = False  # the kernels test the addresses themselves
    writes_through_addresses = True
    host_tables = False
    capturable = True

    def __init__(self, name: str, block_size: int):
        self.name = name
        self.block_size = block_size

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        device = torch.device(device)
        if device.type != self.name:
            return f"the {self.name} backend runs on {self.name} tensors, not {device.type} tensors"
        if dtype not in DTYPE_CODES:
            return f"the {self.name} backend handles float32, float64, float16 and bfloat16 parameters, not {dtype}"
        if self.name == "cpu":
            return _cpu_library()[1]
        _, reason = _cuda_library()  # first: its reasons (driver, glibc) come with a fix
        if reason is not None:
            return reason
        if not torch.cuda.is_available():
            return "the cuda backend needs a CUDA device, and torch.cuda.is_available() is False"
        return _device_reason(device.index if device.index is not None else torch.cuda.current_device())

    def launch(self, op: int, dtype: torch.dtype, ints: torch.Tensor, floats: torch.Tensor,
               blocks: torch.Tensor, seed: int, *, rows=None, live=None, commit_rows: int = 0,
               grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
               samples: Optional[torch.Tensor] = None) -> None:
        """One update launch over `blocks` (`rows`, `live`: for the torch reference only); then the live counters of the first commit_rows rows
        are advanced (capturable mode), and `samples` ([R, tables.SAMPLE_SIZE] in `dtype`)
        receives the weight samples of the first R rows (tables.sample_view).

        Invalid tables raise ValueError with nothing changed: their types and shapes are checked
        here, their contents by the CPU library on every launch (csrc/api.cpp invalid_tables).
        The CUDA library cannot read tables in device memory without a sync, so it checks its
        arguments only; the caller's host tables are what can be checked there
        (tables.check_table_contents)."""
        self._check_arguments(dtype, ints, floats, blocks, commit_rows, samples)
        _check_scalars(ints.device, grad_scale, found_inf)
        if blocks.shape[0] == 0 and commit_rows == 0 and samples is None:
            return
        # The custom op only matters to torch.compile; eagerly its dispatch would cost ~45 us per
        # launch (more than a 148-tensor launch itself), so the library is called directly.
        if _compiler.is_compiling():
            run = _cpu_launch if self.name == "cpu" else _cuda_launch
        else:
            run = _run_cpu if self.name == "cpu" else _run_cuda
        run(op, DTYPE_CODES[dtype], ints, floats, blocks, self.block_size, _signed(seed), commit_rows,
            grad_scale, found_inf, samples)

    def prepare(self, op: int, dtype: torch.dtype, ints: torch.Tensor, floats: torch.Tensor,
                blocks: torch.Tensor, seed: int, *, commit_rows: int = 0,
                samples: Optional[torch.Tensor] = None) -> "PreparedCpuLaunch":
        """launch(...) with these tables and arguments, checked now, as a callable: for a caller
        that rewrites the tables in place between launches (a host-mode CPU step), so that each
        launch costs one library call. CPU only (the call has finished the work when it returns)."""
        assert self.name == "cpu", "prepared launches are for the CPU library"
        self._check_arguments(dtype, ints, floats, blocks, commit_rows, samples)
        return PreparedCpuLaunch(_table_arguments(op, DTYPE_CODES[dtype], ints, floats, blocks, self.block_size,
                                                  seed, commit_rows, None, None, samples),
                                 (ints, floats, blocks, samples))

    def _check_arguments(self, dtype, ints, floats, blocks, commit_rows: int, samples) -> None:
        """What the library cannot check itself: the tables' types and shapes (their contents
        it checks, the CPU library on every launch)."""
        if dtype not in DTYPE_CODES:
            raise ValueError(f"the {self.name} backend does not handle {dtype}")
        T.check_table_types(torch.device(self.name), ints, floats, blocks, commit_rows, samples, dtype)


class PreparedCpuLaunch:
    """One CPU launch whose arguments were checked once (CompiledBackend.prepare); it keeps the
    tensors whose addresses it passes alive. Threads follow torch.get_num_threads() per call."""

    __slots__ = ("_arguments", "_tensors", "_library")

    def __init__(self, arguments: tuple, tensors: tuple):
        self._arguments = arguments
        self._tensors = tensors
        self._library = load_cpu_library()

    def __call__(self) -> None:
        library = self._library
        _check(library, library.nvrm_cpu_launch(*self._arguments, torch.get_num_threads()), "CPU launch")


# Elements per block_table row. CPU: large enough that the per-block row decode is noise, small
# enough that 2..64 threads balance over a few million elements. CUDA: one thread block of 256
# threads, 4 quads each.
_BACKENDS = {"cpu": CompiledBackend("cpu", 16384), "cuda": CompiledBackend("cuda", 4096)}


def compiled_backend(name: str) -> CompiledBackend:
    """The compiled backend 'cpu' or 'cuda' (the library loads on first use)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown compiled backend {name!r}: expected 'cpu' or 'cuda'") from None
