"""Build of nvrm_ext: compiles csrc/ into nvrm_ext/_lib/ with ninja.

Two shared libraries with a plain C ABI (csrc/api.cpp), loaded with ctypes at run time, so the
build needs neither torch nor Python headers and one wheel serves every torch version:

* libnvrm_cpu.so, always: csrc/cpu/multi_tensor.cpp compiled twice, for baseline x86-64 and for
  AVX2+FMA+F16C, the variant picked at run time from the CPU's features;
* libnvrm_cuda.so, when nvcc is found (CUDA_HOME/bin/nvcc, else PATH), with static cudart.

Environment: NVRM_EXT_NO_CUDA=1 skips the CUDA library; NVRM_EXT_CUDA_ARCHS overrides the
architectures ("sm_80 sm_90 compute_90": sm_XX is machine code, compute_XX is PTX).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
LIB_PACKAGE_DIR = "nvrm_ext/_lib"
CPU_LIBRARY = "libnvrm_cpu.so"
CUDA_LIBRARY = "libnvrm_cuda.so"
BUILD_INFO = "build_info.json"  # read by nvrm_ext/backends/compiled.py

# sm_70 is listed for CUDA versions that still have it (CUDA 13 dropped it); compute_90 adds PTX
# that newer GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]

# Bit-exact element math (docs/noise.md §6): no contraction beyond the explicit fmas. The other
# two flags only let GCC vectorize (sqrt without errno, selects of floating-point values) and do
# not change any result.
CXX_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off",
             "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC,-fvisibility=hidden"]


def find_nvcc() -> tuple[str | None, str]:
    """(path to nvcc, '') or (None, why the CUDA library is skipped)."""
    if os.environ.get("NVRM_EXT_NO_CUDA", "") not in ("", "0"):
        return None, "NVRM_EXT_NO_CUDA is set"
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate), ""
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path, ""
    return None, "nvcc was not found at install time"


def supported_archs(nvcc: str) -> set[str]:
    """Virtual architectures this nvcc can compile for, e.g. {'compute_75', ...}."""
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True)
    return set(listed.stdout.split())


def cuda_archs(nvcc: str) -> list[str]:
    requested = os.environ.get("NVRM_EXT_CUDA_ARCHS")
    if requested:
        return requested.replace(",", " ").replace(";", " ").split()
    available = supported_archs(nvcc)
    return [arch for arch in DEFAULT_CUDA_ARCHS if "compute_" + arch.split("_")[1] in available]


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        kind, _, number = arch.partition("_")
        if kind not in ("sm", "compute") or not number:
            raise ValueError(f"NVRM_EXT_CUDA_ARCHS: expected sm_XX or compute_XX, got {arch!r}")
        flags += ["-gencode", f"arch=compute_{number},code={arch}"]
    return flags


def ninja_escape(path: Path | str) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_build_ninja(build_dir: Path, nvcc: str | None, archs: list[str]) -> list[str]:
    """build.ninja in build_dir; returns the library file names it produces."""
    cxx = os.environ.get("CXX", "g++")
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        f"cxxflags = {' '.join(CXX_FLAGS)}",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $cxxflags $flags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $out",
        "rule link_cxx",
        "  command = $cxx -shared $in -o $out $ldflags",
        "  description = LINK $out",
    ]
    cpu_objects = []
    for variant, flags in (("baseline", []), ("avx2_fma", AVX2_FLAGS)):
        obj = f"cpu_multi_tensor_{variant}.o"
        lines += [f"build {obj}: cxx {ninja_escape(CSRC / 'cpu' / 'multi_tensor.cpp')}",
                  f"  flags = -fopenmp -DNVRM_CPU_LAUNCH=launch_{variant} {' '.join(flags)}"]
        cpu_objects.append(obj)
    lines += [f"build cpu_api.o: cxx {ninja_escape(CSRC / 'api.cpp')}",
              f"build {CPU_LIBRARY}: link_cxx {' '.join(cpu_objects)} cpu_api.o",
              "  ldflags = -fopenmp"]
    libraries = [CPU_LIBRARY]
    if nvcc:
        jobs = max(1, os.cpu_count() or 1)
        lines += [
            f"nvcc = {ninja_escape(nvcc)}",
            f"nvccflags = {' '.join(NVCC_FLAGS + gencode_flags(archs))} --threads {jobs}",
            "rule nvcc",
            "  command = $nvcc --generate-dependencies-with-compile --dependency-output $out.d "
            "$nvccflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = NVCC $out",
            "rule link_nvcc",
            "  command = $nvcc -shared -cudart static $in -o $out",
            "  description = LINK $out",
            f"build cuda_multi_tensor.o: nvcc {ninja_escape(CSRC / 'cuda' / 'multi_tensor.cu')}",
            f"build cuda_api.o: cxx {ninja_escape(CSRC / 'api.cpp')}",
            "  flags = -DNVRM_API_CUDA",
            f"build {CUDA_LIBRARY}: link_nvcc cuda_multi_tensor.o cuda_api.o",
        ]
        libraries.append(CUDA_LIBRARY)
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    return libraries


def ninja_binary() -> str:
    try:
        import ninja  # the PyPI package: a build requirement in pyproject.toml
        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if not found:
            raise RuntimeError("ninja is required to build nvrm_ext: pip install ninja") from None
        return found


class NinjaLibraries(build_ext):
    """Builds the two libraries with ninja and places them in nvrm_ext/_lib/ of the build tree
    (wheel) and, for in-place / editable builds, of the source tree."""

    def run(self):
        build_dir = Path(self.build_temp).resolve() / "nvrm_ninja"
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc, skipped = find_nvcc()
        archs = cuda_archs(nvcc) if nvcc else []
        if nvcc and not archs:
            nvcc, skipped = None, f"{nvcc} supports none of {' '.join(DEFAULT_CUDA_ARCHS)}"
        if not nvcc:
            print(f"nvrm_ext: skipping the CUDA library: {skipped}", flush=True)
        libraries = write_build_ninja(build_dir, nvcc, archs)
        subprocess.run([ninja_binary(), "-C", str(build_dir)], check=True)

        info = {"cuda_skipped": skipped or None, "cuda_archs": archs}
        targets = [Path(self.build_lib) / LIB_PACKAGE_DIR]
        if self.inplace or getattr(self, "editable_mode", False):
            targets.append(ROOT / LIB_PACKAGE_DIR)
        self._outputs = []
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            stale = target / CUDA_LIBRARY
            if CUDA_LIBRARY not in libraries and stale.exists():
                stale.unlink()  # never ship a CUDA library from an earlier build
            for name in libraries:
                # Copy then rename: a new file, never a rewrite of one a running process has
                # mapped (rewriting a loaded library in place crashes that process).
                staging = target / f".{name}.tmp"
                shutil.copy2(build_dir / name, staging)
                os.replace(staging, target / name)
                self._outputs.append(str(target / name))
            (target / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
            self._outputs.append(str(target / BUILD_INFO))

    def get_outputs(self):
        return getattr(self, "_outputs", [])


class BinaryDistribution(Distribution):
    """The libraries are built here, so the wheel is platform-specific."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: the libraries use no Python ABI."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    name="nvrm_ext",
    version="0.1.0",
    description="Artificial neural variability (NVRM) optimizers with stateless, regenerated noise",
    python_requires=">=3.9",
    packages=find_packages(include=["nvrm_ext*"]),
    package_data={"nvrm_ext": ["_lib/*.so", "_lib/*.json"]},
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "scipy", "hypothesis", "triton",
                 "scikit-learn", "tqdm", "matplotlib"],
        "demo": ["scikit-learn", "tqdm", "matplotlib"],
    },
    entry_points={"console_scripts": ["nvrm-demo = nvrm_ext.demo.__main__:main"]},
    distclass=BinaryDistribution,
    cmdclass={"build_ext": NinjaLibraries, "bdist_wheel": PlatformWheel},
    zip_safe=False,
)
