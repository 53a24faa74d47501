"""The Triton kernels (optimizer step, commit, AMP, Disout) compile for a GPU (sm_90), without one.

Triton's interpreter runs the kernels' Python semantics on the CPU; it does not lower them, so
it cannot catch what only the compiler sees (types that differ between the branches of a runtime
`if`, an operation without a float64 lowering, ...). Triton compiles to PTX and cubin without a
device, so a subprocess (the interpreter must be off there) compiles each kernel variant the way
the launches do (nvrm_ext.backends.triton.kernel_variants), and the PTX is checked for what
bit-exactness across backends relies on: IEEE-rounded float32 division (no `div.full`), IEEE
float64 division and square root for the bias corrections, no contracted float64 multiply-adds,
and no NaN-dropping `max.f32`. The cubin's resource usage (cuobjdump from the Triton wheel) is
checked against the kernel's targets: no spills, at most 64 registers per thread (at least 50%
theoretical occupancy on sm_90), 128-bit global accesses on the aligned float32 path.
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_COMPILE = r"""
import json, os, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nvrm_ext.backends import tables as T, triton as K

target = GPUTarget("cuda", 90, 32)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out, usage = {}, {}
wanted = set(json.loads(sys.argv[1]))
with tempfile.TemporaryDirectory() as tmp:
    for v in K.kernel_variants():
        if v.name not in wanted:
            continue
        compiled = triton.compile(ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=v.attrs),
                                  target=target, options=v.options)
        out[v.name] = compiled.asm["ptx"]
        cubin = os.path.join(tmp, v.name + ".cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        if os.path.exists(cuobjdump):
            usage[v.name] = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True,
                                           check=True).stdout

# the sibling regularizers' kernels (nvrm_ext/ops)
from nvrm_ext.ops import amp_triton as A, disout_triton as D
amp_tables = {"blocks": "*i64", "ints": "*i64", "DTYPE": "constexpr", "BLOCK": "constexpr", "INT_COLUMNS": "constexpr"}
for first in (True, False):
    compiled = triton.compile(ASTSource(
        fn=A._clip_and_perturb_kernel,
        signature={**amp_tables, "floats": "*fp32", "tiny": "fp32", "FIRST": "constexpr", "FLOAT_COLUMNS": "constexpr"},
        constexprs={"FIRST": first, "DTYPE": tl.bfloat16, "BLOCK": A.BLOCK, "INT_COLUMNS": A.INT_COLUMNS,
                    "FLOAT_COLUMNS": A.FLOAT_COLUMNS}), target=target, options={"enable_fp_fusion": False})
    out[f"amp-perturb-{first}"] = compiled.asm["ptx"]
compiled = triton.compile(ASTSource(fn=A._restore_kernel, signature=amp_tables,
                                    constexprs={"DTYPE": tl.float32, "BLOCK": A.BLOCK, "INT_COLUMNS": A.INT_COLUMNS}),
                          target=target)
out["amp-restore"] = compiled.asm["ptx"]
sizes = {"numel": "i64", "height": "i64", "width": "i64", "seed": "i64", "gamma": "fp32", "block_size": "i64",
         "BLOCK": "constexpr"}
disout = {
    "count": (D._count_kept_kernel, {"kept_ptr": "*i64"}),
    "forward": (D._forward_kernel, {"x_ptr": "*fp16", "out_ptr": "*fp16", "std_ptr": "*fp32", "scale_ptr": "*fp32",
                                    "distortion_coef": "fp32"}),
    "backward": (D._backward_kernel, {"grad_out_ptr": "*fp32", "grad_in_ptr": "*fp32", "scale_ptr": "*fp32"}),
    "draws": (D._draws_kernel, {"distorted_ptr": "*i8", "noise_ptr": "*fp32"}),
}
for name, (fn, pointers) in disout.items():
    names = fn.arg_names
    signature = {arg: {**pointers, **sizes}[arg] for arg in names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs={"BLOCK": D.ELEMENTS_PER_PROGRAM}),
                              target=target)
    out[f"disout-{name}"] = compiled.asm["ptx"]
json.dump({"ptx": out, "usage": usage}, sys.stdout)
"""

# every op and dtype, every GradScaler argument at least once, the commit and sample kernels
VARIANTS = ["step-sgd-fp32", "step-sgd-fp16-grad_scale-found_inf", "step-sgd-bf16-found_inf",
            "step-adam-fp32-grad_scale-found_inf", "step-adam-fp16", "step-adam-bf16-grad_scale",
            "step-noise-fp32", "step-noise-fp16", "step-noise-bf16", "commit-found_inf", "sample-bf16",
            "step-sgd-fp64-grad_scale", "step-adam-fp64-found_inf", "step-noise-fp64"]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(VARIANTS)], env=env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("this Triton install has no ptxas")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def ptx(compiled):
    return compiled["ptx"]


def _count(pattern: str, text: str) -> int:
    return len(re.findall(re.escape(pattern), text))


def test_every_variant_compiles_for_sm90(ptx):
    regularizers = {"amp-perturb-True", "amp-perturb-False", "amp-restore", "disout-count", "disout-forward",
                    "disout-backward", "disout-draws"}
    assert set(ptx) == set(VARIANTS) | regularizers
    for name, text in ptx.items():
        assert ".target sm_90" in text, name


def test_the_variant_list_covers_every_launch():
    from nvrm_ext.backends import tables as T
    from nvrm_ext.backends import triton as K

    names = [v.name for v in K.kernel_variants()]
    assert len(names) == len(set(names)) == 4 * (4 + 4 + 1) + 2 + 4  # 4 dtypes; + commit x2, sample x4 dtypes
    assert set(VARIANTS) <= set(names)
    for v in K.kernel_variants():
        assert set(v.signature) == set(v.fn.arg_names), v.name
        assert v.options["enable_fp_fusion"] is False and v.options["num_warps"] == v.num_warps
        if v.fn is K._nvrm_kernel:
            assert v.constexprs["BLOCK"] == K.TRITON.block_size and v.constexprs["INT_COLUMNS"] == T.INT_COLUMNS


def test_float32_division_is_ieee_rounded(ptx):
    for name, text in ptx.items():
        if not name.startswith(("step", "commit")):
            continue  # the regularizers promise no bit-exactness across backends
        assert _count("div.full.f32", text) == 0 and _count("div.approx.f32", text) == 0, name
    assert _count("div.rn.f32", ptx["step-adam-fp32-grad_scale-found_inf"]) > 0  # m / denom, sqrt(v) / sqrt_bc2
    assert _count("div.rn.f32", ptx["step-sgd-fp16-grad_scale-found_inf"]) > 0  # the gradient unscale


def test_bias_corrections_use_ieee_float64_without_contraction(ptx):
    adam = ptx["step-adam-fp16"]
    assert _count("div.rn.f64", adam) >= 1 and _count("sqrt.rn.f64", adam) >= 1
    for name, text in ptx.items():
        assert _count("fma.rn.f64", text) == 0, name
    assert _count("div.rn.f64", ptx["step-sgd-fp32"]) == 0  # SGD has no bias correction
    # float64 parameters: the whole update in IEEE float64, uncontracted (checked above)
    assert _count("div.rn.f64", ptx["step-sgd-fp64-grad_scale"]) >= 1  # the gradient unscale
    adam64 = ptx["step-adam-fp64-found_inf"]
    assert _count("sqrt.rn.f64", adam64) >= 2 and _count("div.rn.f64", adam64) >= 3  # + sqrt(v), m / denom


def test_no_nan_dropping_maximum(ptx):
    """max.f32 returns the other operand when one is NaN; update.h and torch keep the NaN
    (AMSGrad's running maximum), so the step kernels must not use it."""
    for name, text in ptx.items():
        if name.startswith(("step", "commit")):
            assert not re.search(r"\bmax(\.ftz)?\.f32\b", text), name


def test_aligned_float32_rows_use_128_bit_accesses(ptx):
    for name in ("step-sgd-fp32", "step-adam-fp32-grad_scale-found_inf", "step-noise-fp32"):
        assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx[name]), name
        assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx[name]), name
    for name in ("step-adam-fp16", "step-noise-bf16"):  # 16-bit: 4 elements in 64 bits
        assert re.search(r"ld\.global(\.\w+)*\.v2\.b32", ptx[name]), name
    for name in ("step-sgd-fp64-grad_scale", "step-adam-fp64-found_inf", "step-noise-fp64"):  # float64: 2 per 128 bits
        assert re.search(r"ld\.global(\.\w+)*\.v2\.b64", ptx[name]), name
        assert re.search(r"st\.global(\.\w+)*\.v2\.b64", ptx[name]), name


def test_step_kernels_fit_64_registers_without_spills(compiled):
    """<= 64 registers per thread: at least 8 blocks of 128 threads (50% occupancy) per sm_90 SM.
    float64 rows hold twice the bits per value: <= 128 (25%; measured 63-102), still no spills."""
    if not compiled["usage"]:
        pytest.skip("this Triton install has no cuobjdump")
    for name, text in compiled["usage"].items():
        registers = int(re.search(r"REG:(\d+)", text).group(1))
        assert registers <= (128 if "-fp64" in name else 64), (name, registers)
        assert int(re.search(r"STACK:(\d+)", text).group(1)) == 0, name  # no local memory: no spills
        assert int(re.search(r"LOCAL:(\d+)", text).group(1)) == 0, name
