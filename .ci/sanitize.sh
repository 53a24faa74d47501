#!/usr/bin/env bash
# The CPU library built with AddressSanitizer and UBSan (setup.py's own ninja rules, with
# sanitize=True), and the tests that feed the kernels edge cases run against it: an
# out-of-bounds access or undefined behaviour in csrc/ aborts the run (non-zero exit) even where
# the normal build would not crash. The shipped nvrm_ext/_lib/ is left alone: the checking
# library lives in a temporary directory and is chosen with NVRM_EXT_CPU_LIBRARY.
#
#   bash .ci/sanitize.sh                      # the default test list below
#   bash .ci/sanitize.sh tests/test_x.py -k y # other pytest arguments instead
set -euo pipefail
cd "$(dirname "$0")/.."

# NVRM_SANITIZE_BUILD_DIR: build there and keep it (ninja then recompiles only what changed).
if [[ -n "${NVRM_SANITIZE_BUILD_DIR:-}" ]]; then
    build_dir="$NVRM_SANITIZE_BUILD_DIR"
    mkdir -p "$build_dir"
else
    build_dir="$(mktemp -d "${TMPDIR:-/tmp}/nvrm_sanitize.XXXXXX")"
    trap 'rm -rf "$build_dir"' EXIT
fi

# setup.py's write_build_ninja without running setup() (tools/mutate.py does the same).
python - "$build_dir" <<'EOF'
import runpy, subprocess, sys
from pathlib import Path

import setuptools

setuptools.setup = lambda **kwargs: None
setup = runpy.run_path("setup.py")
build_dir = Path(sys.argv[1])
setup["write_build_ninja"](build_dir, None, [], sanitize=True)
subprocess.run([setup["ninja_binary"](), "-C", str(build_dir)], check=True, stdout=subprocess.DEVNULL)
EOF

# The sanitizer runtimes must be loaded before anything else in the process (python is not
# built with them). detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# abort_on_error=1: a report ends the process with SIGABRT, so pytest cannot carry on past it.
libasan="$(gcc -print-file-name=libasan.so)"
libubsan="$(gcc -print-file-name=libubsan.so)"
for lib in "$libasan" "$libubsan"; do
    [[ -f "$lib" ]] || { echo "sanitize.sh: $lib not found (gcc's sanitizer runtimes)" >&2; exit 1; }
done

sanitized() {
    env NVRM_EXT_CPU_LIBRARY="$build_dir/libnvrm_cpu.so" \
        LD_PRELOAD="$libasan $libubsan" \
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1" \
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
        "$@"
}

# The tests must run the checking library, not fall back silently to the packaged one.
sanitized python -c '
import os
from nvrm_ext.backends import compiled
loaded = compiled.load_cpu_library()._name
assert loaded == os.environ["NVRM_EXT_CPU_LIBRARY"], f"loaded {loaded}"
'
# grep without -q reads all of ldd's output: with -q it may exit first, ldd then dies of SIGPIPE
# and pipefail turns that into "no ASan" (it did once, in a run of this script)
ldd "$build_dir/libnvrm_cpu.so" | grep libasan > /dev/null || { echo "sanitize.sh: the library has no ASan" >&2; exit 1; }

run_pytest() {
    echo "sanitize.sh: pytest $*"
    # --capture=sys: pytest's default fd capture would swallow a sanitizer report (written to
    # file descriptor 2) when the process aborts; this way it reaches the log. pytest's exit
    # status 5 (no test collected) fails too.
    sanitized python -m pytest -q -p no:cacheprovider --capture=sys "$@"
}

if [[ $# -gt 0 ]]; then
    run_pytest "$@"
    exit
fi
# The edge and fuzz tests (when present) and the tests that drive the compiled CPU kernel.
tests=()
for file in tests/test_compiled.py tests/test_cpu_threads.py tests/test_steady_step.py tests/test_launch_checks.py \
            tests/test_edges.py tests/test_fuzz_edges.py; do
    [[ -f "$file" ]] && tests+=("$file")
done
[[ ${#tests[@]} -gt 0 ]] || { echo "sanitize.sh: none of the listed test files exists" >&2; exit 1; }
run_pytest "${tests[@]}"
# The cpu-backend cases of the bookkeeping, capturable, 16-bit and trajectory tests: the kernel on
# live counters, compensation buffers and long runs.
run_pytest tests/test_bookkeeping.py tests/test_capturable.py tests/test_low_precision.py \
    tests/test_weight_tracking.py tests/test_trajectories.py -k cpu
