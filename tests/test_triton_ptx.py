"""The Triton kernels (optimizer step, commit, AMP, Disout) compile for a GPU (sm_90), without one.

Triton's interpreter runs the kernels' Python semantics on the CPU; it does not lower them, so
it cannot catch what only the compiler sees (types that differ between the branches of a runtime
`if`, an operation without a float64 lowering, ...). Triton compiles to PTX and cubin without a
device, so a subprocess (the interpreter must be off there) compiles each kernel variant, and
the PTX is checked for what bit-exactness across backends relies on: IEEE-rounded float32
division (no `div.full`), IEEE float64 division and square root for the bias corrections, and
no contracted float64 multiply-adds.
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_COMPILE = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nvrm_ext.backends import tables as T, triton as K

target = GPUTarget("cuda", 90, 32)
step_signature = {"blocks": "*i64", "ints": "*i64", "floats": "*fp32", "seed_lo": "i32", "seed_hi": "i32",
                  "grad_scale": "*fp32", "found_inf": "*fp32", "OP": "constexpr", "DTYPE": "constexpr",
                  "BLOCK": "constexpr", "INT_COLUMNS": "constexpr", "FLOAT_COLUMNS": "constexpr",
                  "HAS_GRAD_SCALE": "constexpr", "HAS_FOUND_INF": "constexpr"}
dtypes = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
out = {}
for op, dtype, scaler in json.loads(sys.argv[1]):
    constants = {"OP": op, "DTYPE": dtypes[dtype], "BLOCK": K.BLOCK, "INT_COLUMNS": T.INT_COLUMNS,
                 "FLOAT_COLUMNS": T.FLOAT_COLUMNS, "HAS_GRAD_SCALE": scaler, "HAS_FOUND_INF": scaler}
    compiled = triton.compile(ASTSource(fn=K._nvrm_kernel, signature=step_signature, constexprs=constants),
                              target=target, options={"num_warps": 8, "enable_fp_fusion": False})
    out[f"step-{op}-{dtype}-{scaler}"] = compiled.asm["ptx"]
commit_signature = {"ints": "*i64", "floats": "*fp32", "found_inf": "*fp32", "commit_rows": "i64",
                    "ROWS": "constexpr", "INT_COLUMNS": "constexpr", "FLOAT_COLUMNS": "constexpr",
                    "HAS_FOUND_INF": "constexpr"}
compiled = triton.compile(ASTSource(fn=K._commit_kernel, signature=commit_signature,
                                    constexprs={"ROWS": K._COMMIT_ROWS, "INT_COLUMNS": T.INT_COLUMNS,
                                                "FLOAT_COLUMNS": T.FLOAT_COLUMNS, "HAS_FOUND_INF": True}),
                          target=target, options={"enable_fp_fusion": False})
out["commit"] = compiled.asm["ptx"]

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
json.dump(out, sys.stdout)
"""

# (op, storage dtype, GradScaler protocol): every op, every dtype, both scaler variants
VARIANTS = [(0, "fp32", False), (0, "bf16", True), (1, "fp32", True), (1, "fp16", False), (2, "bf16", False)]


@pytest.fixture(scope="module")
def ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(VARIANTS)], env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("this Triton install has no ptxas")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _count(pattern: str, text: str) -> int:
    return len(re.findall(re.escape(pattern), text))


def test_every_variant_compiles_for_sm90(ptx):
    regularizers = {"amp-perturb-True", "amp-perturb-False", "amp-restore", "disout-count", "disout-forward",
                    "disout-backward", "disout-draws"}
    assert set(ptx) == {f"step-{op}-{dtype}-{scaler}" for op, dtype, scaler in VARIANTS} | {"commit"} | regularizers
    for name, text in ptx.items():
        assert ".target sm_90" in text, name


def test_float32_division_is_ieee_rounded(ptx):
    for name, text in ptx.items():
        if not name.startswith(("step", "commit")):
            continue  # the regularizers promise no bit-exactness across backends
        assert _count("div.full.f32", text) == 0 and _count("div.approx.f32", text) == 0, name
    assert _count("div.rn.f32", ptx["step-1-fp32-True"]) > 0  # Adam: m / denom, sqrt(v) / sqrt_bc2
    assert _count("div.rn.f32", ptx["step-0-bf16-True"]) > 0  # the gradient unscale


def test_bias_corrections_use_ieee_float64_without_contraction(ptx):
    adam = ptx["step-1-fp16-False"]
    assert _count("div.rn.f64", adam) >= 1 and _count("sqrt.rn.f64", adam) >= 1
    for name, text in ptx.items():
        assert _count("fma.rn.f64", text) == 0, name
    assert _count("div.rn.f64", ptx["step-0-fp32-False"]) == 0  # SGD has no bias correction
