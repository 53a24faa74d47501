"""The compiled backends (csrc/ -> nvrm_ext/_lib/) against the specification, docs/noise.md.

* noise-only launches against the reference nvrm_ext.noise (§8 tolerances);
* SGD / Adam launches against a plain-torch transcription of §7 written here, independent of
  the C++ (bitwise with Uniform noise, whose reference is bit-exact);
* the CPU instruction-set variants, the Triton kernel and (on a GPU) the CUDA kernel agree bit
  for bit;
* the messages of backends that cannot run.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from nvrm_ext import noise as spec
from nvrm_ext.backends import compiled
from nvrm_ext.backends import tables as T

CPU = compiled.compiled_backend("cpu")
GAUSSIAN, LAPLACE, UNIFORM = 0, 1, 2
SEED = 1234567890123
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UPDATE_DTYPES = DTYPES + [torch.float64]  # float64: the update in float64, the noise as float32's
# docs/noise.md §8: fused vs reference unit noise, Gaussian and Laplace.
Z_TOLERANCE = 4e-6


def launch(backend, op: int, plans: list[T.TensorPlan], seed: int = SEED, **options) -> None:
    ints, floats = T.build_rows(plans)
    blocks = T.build_block_table([p.param.numel() for p in plans], [p.offset for p in plans],
                                 backend.block_size)
    device = plans[0].param.device
    backend.launch(op, plans[0].param.dtype, T.to_device(ints, device), T.to_device(floats, device),
                   T.to_device(blocks, device), seed, **options)


def noise_flags(old_type: int, new_type: int) -> int:
    return (old_type << T.FLAG_OLD_TYPE_SHIFT) | (new_type << T.FLAG_NEW_TYPE_SHIFT)


def noise_floats(old_scale: float = 0.0, new_scale: float = 0.0) -> tuple:
    floats = [0.0] * T.FLOAT_COLUMNS
    floats[T.F_OLD_SCALE], floats[T.F_NEW_SCALE] = old_scale, new_scale
    return tuple(floats)


def compiled_noise(noise_type: int, numel: int, *, key=7, step=42, scale=1.0, offset=0,
                   backend=CPU, dtype=torch.float32, seed=SEED) -> torch.Tensor:
    """The noise a launch puts on zero weights (OP_NOISE, old step 0)."""
    param = torch.zeros(numel, dtype=dtype, device="cuda" if backend.name == "cuda" else "cpu")
    plan = T.TensorPlan(param, None, (), key, 0, step, noise_flags(0, noise_type),
                        noise_floats(new_scale=scale), offset)
    launch(backend, T.OP_NOISE, [plan], seed)
    return param.cpu()


# --- (a) noise against the reference --------------------------------------------------------

def test_uniform_noise_is_bitwise_the_reference():
    for offset, scale in ((0, 1.0), (5, 0.37), (2**33 + 1, 3e-3)):
        got = compiled_noise(UNIFORM, 4099, scale=scale, offset=offset)
        want = spec.noise("Uniform", scale, SEED, 7, 42, 4099, offset=offset)
        assert torch.equal(got, want), f"offset {offset}"


@pytest.mark.parametrize("name,code", [("Gaussian", GAUSSIAN), ("Laplace", LAPLACE)])
def test_noise_within_spec_tolerance_over_2_20_elements(name, code):
    n = 1 << 20
    got = compiled_noise(code, n)
    want = spec.noise(name, 1.0, SEED, 7, 42, n)
    deviation = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
    # Measured: Gaussian 2.5e-7, Laplace 1.2e-7 (a few float32 ulp).
    assert deviation <= Z_TOLERANCE, f"{name}: worst |z - z_ref| / max(1, |z_ref|) = {deviation:.3g}"


def test_noise_with_offset_and_extreme_counters():
    # The §9 vector with the largest seed and step, elements 5..10 (a shard starting mid-quad).
    got = compiled_noise(GAUSSIAN, 6, key=3, step=4294967295, offset=5, seed=2**64 - 1)
    want = torch.tensor([1.61712992e+00, -5.94353974e-01, 7.99300194e-01, 9.60576534e-01,
                         -1.01922989e+00, 5.80923915e-01])
    torch.testing.assert_close(got, want, rtol=Z_TOLERANCE, atol=Z_TOLERANCE)


def test_removing_noise_restores_clean_zero_weights():
    param = torch.zeros(1027)
    added = T.TensorPlan(param, None, (), 3, 0, 9, noise_flags(0, LAPLACE), noise_floats(0, 0.5))
    launch(CPU, T.OP_NOISE, [added])
    assert param.abs().min() > 0
    removed = T.TensorPlan(param, None, (), 3, 9, 0, noise_flags(LAPLACE, 0), noise_floats(0.5, 0))
    launch(CPU, T.OP_NOISE, [removed])
    assert torch.equal(param, torch.zeros(1027))


# --- (b) updates against a plain-torch transcription of §7 ------------------------------------

def f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def reference_update(op: int, plan: T.TensorPlan, seed: int):
    """(param, states) after one step, in the storage dtype: §7 with one float32 rounding per
    operation (float64 for float64 parameters, from the float32 table values) and the reference
    noise (float32), subtracted and added in that arithmetic."""
    dtype = plan.param.dtype
    math = torch.float64 if dtype == torch.float64 else torch.float32
    f = [f32(x).to(math) for x in plan.floats]
    p = plan.param.to(math)
    states = [None if s is None else s.to(math) for s in (tuple(plan.states) + (None,) * 3)[:3]]
    if op == T.OP_SGD:
        d = plan.grad.to(math)
        if plan.flags & T.FLAG_WEIGHT_DECAY:
            d = d + f[T.F_WEIGHT_DECAY] * p
        if plan.flags & T.FLAG_MOMENTUM:
            if plan.flags & T.FLAG_MOMENTUM_INIT:
                buf = d
            else:
                buf = f[T.F_MOMENTUM] * states[0] + f[T.F_MOMENTUM_COEF] * d
            states[0] = buf
            d = d + f[T.F_MOMENTUM] * buf if plan.flags & T.FLAG_NESTEROV else buf
        p = p - f[T.F_LR] * d
    elif op == T.OP_ADAM:
        g = plan.grad.to(math)
        if plan.flags & T.FLAG_DECOUPLED:
            p = p * f[T.F_DECAY]
        else:
            g = g + f[T.F_WEIGHT_DECAY] * p
        m = f[T.F_MOMENTUM] * states[0] + f[T.F_MOMENTUM_COEF] * g
        v = f[T.F_BETA2] * states[1] + (f[T.F_BETA2_COEF] * g) * g
        states[0], states[1] = m, v
        if plan.flags & T.FLAG_AMSGRAD:
            v = torch.maximum(states[2], v)
            states[2] = v
        # torch's CPU float32 and float64 sqrt are not always correctly rounded (SLEEF, 0.5001
        # ulp); the float64 sqrt rounded to float32 is, and so is numpy's float64 sqrt.
        root = torch.from_numpy(np.sqrt(v.numpy())) if math == torch.float64 else torch.sqrt(v.double()).float()
        denom = root / f[T.F_SQRT_BC2] + f[T.F_EPS]
        p = p - f[T.F_STEP_SIZE] * (m / denom)
    types = spec.NOISE_TYPES
    # float32 noise, its difference and addition in the update's arithmetic
    n_old = spec.noise(types[plan.flags & 3], plan.floats[T.F_OLD_SCALE], seed, plan.key,
                       plan.old_step, p.numel(), offset=plan.offset).to(math)
    n_new = spec.noise(types[(plan.flags >> 2) & 3], plan.floats[T.F_NEW_SCALE], seed, plan.key,
                       plan.new_step, p.numel(), offset=plan.offset).to(math)
    if plan.old_step or plan.new_step:
        p = p + (n_new - n_old)
    return p.to(dtype), [None if s is None else s.to(dtype) for s in states]


SGD_FLAGS = {
    "plain": 0,
    "weight_decay": T.FLAG_WEIGHT_DECAY,
    "momentum_init": T.FLAG_MOMENTUM | T.FLAG_MOMENTUM_INIT,
    "momentum": T.FLAG_MOMENTUM,
    "momentum_weight_decay": T.FLAG_MOMENTUM | T.FLAG_WEIGHT_DECAY,
    "nesterov_init": T.FLAG_MOMENTUM | T.FLAG_MOMENTUM_INIT | T.FLAG_NESTEROV,
    "nesterov": T.FLAG_MOMENTUM | T.FLAG_NESTEROV | T.FLAG_WEIGHT_DECAY,
}
ADAM_FLAGS = {
    "l2": 0,
    "amsgrad": T.FLAG_AMSGRAD,
    "decoupled": T.FLAG_DECOUPLED,
    "amsgrad_decoupled": T.FLAG_AMSGRAD | T.FLAG_DECOUPLED,
}
# (numel, offset, old_step, new_step): odd sizes, shards starting mid-quad, every noise state.
ROWS = [(1, 0, 4, 5), (3, 0, 0, 1), (4099, 0, 11, 12), (4099, 5, 7, 0), (17, 2, 0, 0),
        (40000, 0, 2, 3), (5, 2**33 + 3, 9, 10)]


def make_plans(op: int, flags: int, dtype: torch.dtype, noise_type: int, generator) -> list[T.TensorPlan]:
    plans = []
    for key, (numel, offset, old_step, new_step) in enumerate(ROWS):
        def tensor(positive=False):
            t = torch.randn(numel, generator=generator)
            return (t.abs() if positive else t).to(dtype)
        if op == T.OP_SGD:
            states = (tensor(),) if flags & T.FLAG_MOMENTUM else ()
            floats = (0.1, 0.01, 0.9, 0.75, 0, 0, 0, 0, 0, 0)
        else:
            states = (tensor(), tensor(positive=True),
                      tensor(positive=True) if flags & T.FLAG_AMSGRAD else None)
            step = 3
            floats = (1e-2, 0.05, 0.9, 1 - 0.9, 0.999, 1 - 0.999, 1e-8, 1e-2 / (1 - 0.9**step),
                      (1 - 0.999**step) ** 0.5, 1 - 1e-2 * 0.05)
        plans.append(T.TensorPlan(tensor(), tensor(), states, key, old_step, new_step,
                                  flags | noise_flags(noise_type, noise_type),
                                  tuple(np.float32(floats)) + (0.02, 0.03), offset))
    return plans


def check_update(op: int, flags: int, dtype: torch.dtype, noise_type: int, exact: bool):
    plans = make_plans(op, flags, dtype, noise_type, torch.Generator().manual_seed(flags))
    expected = [reference_update(op, plan, SEED) for plan in plans]
    launch(CPU, op, plans)
    for plan, (param, states) in zip(plans, expected):
        got = [plan.param] + [s for s in plan.states if s is not None]
        want = [param] + [s for s in states if s is not None]
        for name, g, w in zip(("param", "state0", "state1", "state2"), got, want):
            if exact:
                assert torch.equal(g, w), f"{name} of a {plan.param.numel()}-element row differs"
            else:
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", UPDATE_DTYPES, ids=str)
@pytest.mark.parametrize("flags", SGD_FLAGS.values(), ids=SGD_FLAGS.keys())
def test_sgd_matches_spec(flags, dtype):
    check_update(T.OP_SGD, flags, dtype, UNIFORM, exact=True)


@pytest.mark.parametrize("dtype", UPDATE_DTYPES, ids=str)
@pytest.mark.parametrize("flags", ADAM_FLAGS.values(), ids=ADAM_FLAGS.keys())
def test_adam_matches_spec(flags, dtype):
    check_update(T.OP_ADAM, flags, dtype, UNIFORM, exact=True)


@pytest.mark.parametrize("noise_type", [GAUSSIAN, LAPLACE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_updates_with_gaussian_and_laplace_noise(noise_type, dtype):
    # Scales 0.02 / 0.03 and |z| < 16: the noise differs from the reference by < 1e-6.
    check_update(T.OP_SGD, T.FLAG_MOMENTUM | T.FLAG_NESTEROV, dtype, noise_type, exact=False)
    check_update(T.OP_ADAM, T.FLAG_AMSGRAD, dtype, noise_type, exact=False)


# --- agreement between the fused kernels --------------------------------------------------------

def mixed_noise_plans(device="cpu"):
    generator = torch.Generator().manual_seed(0)
    plans = []
    for key, (numel, offset) in enumerate([(4099, 0), (3, 1), (9000, 6), (1, 0)]):
        param = torch.randn(numel, generator=generator).to(device)
        plans.append(T.TensorPlan(param, None, (), key, 5, 6, noise_flags(key % 3, (key + 1) % 3),
                                  noise_floats(0.1, 0.2), offset))
    return plans


def test_cpu_variants_are_bit_identical():
    lib = compiled.load_cpu_library()
    default = lib.nvrm_cpu_variant()
    if lib.nvrm_cpu_select_variant(b"avx2_fma") != 0:
        pytest.skip("this CPU has no AVX2+FMA+F16C: only the baseline variant runs")
    try:
        results = {}
        for variant in (b"baseline", b"avx2_fma"):
            assert lib.nvrm_cpu_select_variant(variant) == 0
            results[variant] = [compiled_noise(t, 5000, offset=3) for t in (GAUSSIAN, LAPLACE, UNIFORM)]
            small = mixed_noise_plans()  # tensors of at most 4 quads: both draws in one Philox vector (AVX2)
            launch(CPU, T.OP_NOISE, small)
            results[variant] += [plan.param for plan in small]
    finally:
        lib.nvrm_cpu_select_variant(default)
    for baseline, avx2 in zip(results[b"baseline"], results[b"avx2_fma"]):
        assert torch.equal(baseline, avx2)


def test_cpu_and_triton_are_bit_identical():
    pytest.importorskip("triton")
    from nvrm_ext.backends.triton import TRITON
    reason = TRITON.unavailable_reason(torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(reason)
    by_cpu, by_triton = mixed_noise_plans(), mixed_noise_plans()
    launch(CPU, T.OP_NOISE, by_cpu)
    launch(TRITON, T.OP_NOISE, by_triton)
    for a, b in zip(by_cpu, by_triton):
        assert torch.equal(a.param, b.param), f"noise types {a.flags & 3}, {a.flags >> 2}"


@pytest.mark.parametrize("op,flags", [(T.OP_SGD, T.FLAG_MOMENTUM | T.FLAG_NESTEROV | T.FLAG_WEIGHT_DECAY),
                                      (T.OP_ADAM, T.FLAG_AMSGRAD)], ids=["sgd", "adam"])
def test_cpu_and_triton_float64_updates_are_bit_identical(op, flags):
    """float64 rows (odd sizes, mid-quad shards, Gaussian noise): the whole update, not only the noise."""
    pytest.importorskip("triton")
    from nvrm_ext.backends.triton import TRITON
    reason = TRITON.unavailable_reason(torch.device("cpu"), torch.float64)
    if reason:
        pytest.skip(reason)
    by_cpu, by_triton = (make_plans(op, flags, torch.float64, GAUSSIAN, torch.Generator().manual_seed(2))
                         for _ in range(2))
    launch(CPU, op, by_cpu)
    launch(TRITON, op, by_triton)
    for a, b in zip(by_cpu, by_triton):
        assert a.param.dtype == torch.float64 and torch.equal(a.param, b.param)
        assert all(s is None or torch.equal(s, t) for s, t in zip(a.states, b.states))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", UPDATE_DTYPES, ids=str)
def test_cuda_and_cpu_are_bit_identical(dtype):
    cuda = compiled.compiled_backend("cuda")
    reason = cuda.unavailable_reason(torch.device("cuda"), dtype)
    assert reason is None, reason
    for op, flags in ((T.OP_SGD, T.FLAG_MOMENTUM | T.FLAG_WEIGHT_DECAY), (T.OP_ADAM, T.FLAG_AMSGRAD)):
        for noise_type in (GAUSSIAN, LAPLACE, UNIFORM):
            on_cpu = make_plans(op, flags, dtype, noise_type, torch.Generator().manual_seed(1))
            on_gpu = make_plans(op, flags, dtype, noise_type, torch.Generator().manual_seed(1))
            for plan in on_gpu:
                plan.param, plan.grad = plan.param.cuda(), plan.grad.cuda()
                plan.states = tuple(None if s is None else s.cuda() for s in plan.states)
            launch(CPU, op, on_cpu)
            launch(cuda, op, on_gpu)
            torch.cuda.synchronize()
            for a, b in zip(on_cpu, on_gpu):
                assert torch.equal(a.param, b.param.cpu())
                for s, t in zip(a.states, b.states):
                    assert s is None or torch.equal(s, t.cpu())


@pytest.mark.cuda
def test_cuda_unaligned_rows_take_the_scalar_path():
    cuda = compiled.compiled_backend("cuda")
    storage = torch.zeros(4099 + 1, device="cuda")
    param = storage[1:]  # 4-byte aligned only
    plan = T.TensorPlan(param, None, (), 7, 0, 42, noise_flags(0, UNIFORM), noise_floats(0, 1.0))
    launch(cuda, T.OP_NOISE, [plan])
    assert torch.equal(param.cpu(), spec.noise("Uniform", 1.0, SEED, 7, 42, 4099))


# --- the libraries and their messages ----------------------------------------------------------

def test_cpu_library_is_available():
    assert CPU.unavailable_reason(torch.device("cpu"), torch.float32) is None
    assert hasattr(torch.ops.nvrm_ext, "cpu_launch"), "the launch is not a torch.library custom op"


def test_unsupported_device_and_dtype_are_explained():
    assert "not cuda tensors" in CPU.unavailable_reason(torch.device("cuda"), torch.float32)
    assert CPU.unavailable_reason(torch.device("cpu"), torch.float64) is None
    assert "not torch.int32" in CPU.unavailable_reason(torch.device("cpu"), torch.int32)


def test_bad_tables_are_rejected_with_clear_messages():
    plan = T.TensorPlan(torch.zeros(8), None, (), 0, 0, 1, 0, noise_floats(0, 1.0))
    ints, floats = (torch.from_numpy(a) for a in T.build_rows([plan]))
    blocks = torch.from_numpy(T.build_block_table([8], [0], CPU.block_size))
    with pytest.raises(ValueError, match="floats table must be torch.float32"):
        CPU.launch(T.OP_NOISE, torch.float32, ints, floats.double(), blocks, SEED)
    with pytest.raises(ValueError, match=rf"ints table must have shape \[N, {T.INT_COLUMNS}\]"):
        CPU.launch(T.OP_NOISE, torch.float32, ints[:, :5].contiguous(), floats, blocks, SEED)
    with pytest.raises(ValueError, match="unknown op 7"):
        CPU.launch(7, torch.float32, ints, floats, blocks, SEED)


@pytest.fixture
def library_dir(tmp_path, monkeypatch):
    """An empty nvrm_ext/_lib/ stand-in; the loaders' caches are reset around the test."""
    monkeypatch.setattr(compiled, "LIB_DIR", tmp_path)
    monkeypatch.delenv(compiled.CPU_LIBRARY_VARIABLE, raising=False)  # .ci/sanitize.sh sets it
    compiled._cpu_library.cache_clear()
    compiled._cuda_library.cache_clear()
    yield tmp_path
    compiled._cpu_library.cache_clear()
    compiled._cuda_library.cache_clear()


def test_auto_falls_back_to_torch_without_the_cpu_library(library_dir):
    import nvrm_ext
    from nvrm_ext.backends.torch_ref import TORCH

    p = torch.nn.Parameter(torch.zeros(10))
    with pytest.warns(RuntimeWarning, match="is missing.*using the much slower 'torch' backend"):
        opt = nvrm_ext.FusedVSGD([p], lr=0.1, seed=0)
    assert opt._resolve_backend(p.device, p.dtype) is TORCH
    p.grad = torch.ones_like(p)
    opt.step()
    with opt.denoised():
        torch.testing.assert_close(p.detach(), torch.full_like(p, -0.1))
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run"):
        nvrm_ext.FusedVSGD([p], lr=0.1, backend="cpu")


def test_missing_cpu_library_is_explained(library_dir):
    reason = CPU.unavailable_reason(torch.device("cpu"), torch.float32)
    assert reason == ("the CPU library nvrm_ext/_lib/libnvrm_cpu.so is missing: "
                      "reinstall with pip install .")
    with pytest.raises(RuntimeError, match="is missing"):
        compiled.load_cpu_library()


def test_cpu_library_variable_chooses_the_library(library_dir, monkeypatch):
    """NVRM_EXT_CPU_LIBRARY (a sanitizer build) is what loads, and a wrong path says so."""
    packaged = compiled.Path(compiled.__file__).resolve().parent.parent / "_lib" / compiled.CPU_LIBRARY
    copy = library_dir / "elsewhere" / "libnvrm_checking.so"
    copy.parent.mkdir()
    shutil.copy2(packaged, copy)
    monkeypatch.setenv(compiled.CPU_LIBRARY_VARIABLE, str(copy))
    assert compiled.load_cpu_library()._name == str(copy)
    compiled._cpu_library.cache_clear()
    monkeypatch.setenv(compiled.CPU_LIBRARY_VARIABLE, str(copy) + ".missing")
    assert CPU.unavailable_reason(torch.device("cpu"), torch.float32) == (
        f"the CPU library {copy}.missing (NVRM_EXT_CPU_LIBRARY) is missing: "
        "unset NVRM_EXT_CPU_LIBRARY or correct it")


def test_skipped_cuda_library_is_explained(library_dir):
    (library_dir / compiled.BUILD_INFO).write_text(
        json.dumps({"cuda_skipped": "nvcc was not found at install time", "cuda_archs": []}))
    with pytest.raises(RuntimeError, match="^the CUDA library was not built: nvcc was not found "
                                           "at install time$"):
        compiled.load_cuda_library()


def nvcc_exists() -> bool:
    home = os.environ.get("CUDA_HOME")
    return bool(shutil.which("nvcc") or (home and os.path.exists(os.path.join(home, "bin", "nvcc")))
                or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_cuda_library_was_built_when_nvcc_exists():
    skipped = compiled.build_info().get("cuda_skipped")
    if skipped:
        pytest.skip(f"the CUDA library was skipped at build time: {skipped}")
    if not nvcc_exists():
        pytest.skip("no nvcc on this machine")
    assert (compiled.LIB_DIR / compiled.CUDA_LIBRARY).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_library_without_gpu_fails_clearly():
    reason = compiled.compiled_backend("cuda").unavailable_reason(torch.device("cuda"), torch.float32)
    if not (compiled.LIB_DIR / compiled.CUDA_LIBRARY).is_file():
        assert reason.startswith(("the CUDA library was not built: ", "the CUDA library nvrm_ext/_lib/"))
        pytest.skip("the CUDA library was not built")
    # the library's own reason comes first: it names the fix (here: no driver)
    assert reason.startswith("the CUDA library cannot use a GPU: ")
    if "insufficient" in reason:  # no driver at all reads as a too-old one
        assert "install an NVIDIA driver" in reason
    with pytest.raises(RuntimeError, match="^the CUDA library cannot use a GPU: .+"):
        compiled.load_cuda_library()


# manylinux_2_28's ceilings (auditwheel's policy): what a library may require of the system.
_MANYLINUX_2_28 = {"GLIBC": (2, 28), "GCC": (7, 0, 0), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11)}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.parametrize("name", [compiled.CPU_LIBRARY, compiled.CUDA_LIBRARY])
def test_libraries_need_nothing_newer_than_manylinux_2_28(name):
    """setup.py's link flags at work: the _Float16 helpers from libgcc.a (not GCC_12.0.0 of
    libgcc_s), cudart's pthread/dl calls bound to their pre-2.34 glibc versions."""
    import re
    import subprocess

    path = compiled.LIB_DIR / name
    if not path.is_file():
        pytest.skip(f"{name} was not built")
    symbols = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=True).stdout
    too_new = set()
    for library, version in re.findall(r"\*UND\*\s+\S+\s+\(?([A-Z]+)_([0-9.]+)\)?", symbols):
        ceiling = _MANYLINUX_2_28.get(library)
        if ceiling is not None and tuple(map(int, version.split("."))) > ceiling:
            too_new.add(f"{library}_{version}")
    assert not too_new, f"{name} needs {sorted(too_new)}, newer than manylinux_2_28 allows"


def _fused_backend(name):
    if name == "cpu":
        return CPU
    if name == "cuda":
        backend = compiled.compiled_backend("cuda")
        reason = backend.unavailable_reason(torch.device("cuda"), torch.float32)
        if reason:
            pytest.skip(reason)
        return backend
    pytest.importorskip("triton")
    from nvrm_ext.backends.triton import TRITON
    reason = TRITON.unavailable_reason(torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(reason)
    return TRITON


@pytest.mark.parametrize("skipped", [False, True], ids=["step", "found_inf"])
@pytest.mark.parametrize("dtype", UPDATE_DTYPES)
@pytest.mark.parametrize("backend_name", ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_launch_copies_the_weight_samples_after_the_update(backend_name, dtype, skipped):
    """tables.SAMPLE_SIZE, written out here: row r's slot j < count = min(numel, 8) holds element
    j * (numel // count) of its parameter as the launch left it; the other slots, and the rows
    past len(samples), are not written. A step skipped for found_inf samples the weights too."""
    backend = _fused_backend(backend_name)
    generator = torch.Generator().manual_seed(3)
    numels = [1, 3, 8, 9, 17, 0, 4099, 5]
    floats = list(noise_floats(0.1, 0.2))
    floats[T.F_LR] = 0.5
    plans = []
    device = "cuda" if backend_name == "cuda" else "cpu"  # Triton: on a GPU where there is one
    if backend_name == "triton" and torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        device = "cuda"
    for key, n in enumerate(numels):
        param = torch.randn(n, generator=generator).to(device=device, dtype=dtype)
        plans.append(T.TensorPlan(param, torch.ones_like(param), (), key, 5, 6, noise_flags(key % 3, (key + 1) % 3),
                                  tuple(floats), 0))
    before = [plan.param.clone() for plan in plans]
    sentinel = torch.tensor(-12345.0, dtype=dtype)
    samples = torch.full((len(plans) - 1, 8), -12345.0, dtype=dtype, device=device)  # the last row: not sampled
    launch(backend, T.OP_SGD, plans, samples=samples, found_inf=torch.ones(1, device=device) if skipped else None)
    samples, params, before = samples.cpu(), [plan.param.cpu() for plan in plans], [b.cpu() for b in before]
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    for row, (param, n) in enumerate(zip(params[:-1], numels)):
        count = min(n, 8)
        expected = param[[j * (n // count) for j in range(count)]] if count else param[:0]
        assert torch.equal(samples[row, :count].view(bits), expected.view(bits)), row
        assert (samples[row, count:] == sentinel).all(), row
        if skipped:
            assert torch.equal(param, before[row])
        elif n:
            assert not torch.equal(param, before[row])  # the samples are of the updated weights

