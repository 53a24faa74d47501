"""Issue 11's kernel targets, checked from compiled code (no GPU): bench/kernels.py.

The analysis itself is checked on hand-written SASS with known answers and against the CUDA
occupancy rules; the targets on the CUDA kernels of the built libnvrm_cuda.so (skipped when
nvcc did not build it) and on two Triton variants compiled for sm_90 (a few seconds each).
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if not (ROOT / "bench" / "kernels.py").is_file():
    pytest.skip("the checkout's bench/ is not here (tests run against an installed wheel)", allow_module_level=True)

from bench import kernels as K  # noqa: E402


# --- the analysis ---------------------------------------------------------------------------


@pytest.mark.parametrize("registers, threads, shared, arch, expected", [
    (64, 256, 0, 90, 0.50),     # 64 regs x 256 threads: 4 blocks of 8 warps
    (215, 256, 0, 90, 0.125),   # the Triton step before issue 11: one block per SM
    (32, 256, 0, 90, 1.00),
    (65, 256, 0, 90, 0.375),    # 72 allocated (units of 8): 3 blocks
    (40, 128, 0, 80, 0.75),     # 1280 regs per warp: 12 warps per sub-partition
    (32, 128, 100 * 1024, 90, 0.125),  # shared memory: 2 blocks of 101 KB in 228 KB
    (32, 128, 100 * 1024, 80, 0.0625),  # 1 block in 164 KB
])
def test_theoretical_occupancy_follows_the_occupancy_calculator(registers, threads, shared, arch, expected):
    assert K.theoretical_occupancy(registers, threads, shared, K.ARCHS[arch]) == expected


def _sass(body: str) -> list:
    lines = ["\t\tFunction : kernel"]
    for index, text in enumerate(line.strip() for line in body.strip().splitlines()):
        lines.append(f"        /*{index * 16:04x}*/                   {text} ;  /* 0x0 */")
    return K.parse_sass("\n".join(lines))["kernel"]


# A loop of 2 iterations over one Gaussian/Laplace branch: the Gaussian arm (sin/cos
# coefficient 1.5707963705062866211) is shorter than the Laplace arm, and is the one counted.
_LOOPED = """
IMAD.MOV.U32 R1, RZ, RZ, 0x0
ISETP.NE.AND P0, PT, R2, RZ, PT
@P0 BRA 0x0080
FFMA R3, R3, R4, 1.5707963705062866211
LDG.E.128 R8, desc[UR4][R6.64]
BRA 0x00d0
FADD R3, R3, R3
FADD R3, R3, R3
FADD R3, R3, R3
FADD R3, R3, R3
FADD R3, R3, R3
LDG.E R8, desc[UR4][R6.64]
LDG.E.CONSTANT R9, desc[UR4][R6.64]
STG.E.128 desc[UR4][R6.64], R8
IADD3 R1, R1, 0x1, RZ
ISETP.LT.AND P1, PT, R1, 0x2, PT
@P1 BRA 0x0010
EXIT
BRA 0x0120
NOP
"""


def test_gaussian_path_takes_the_gaussian_arm_and_counts_the_loop_per_iteration():
    instructions = _sass(_LOOPED)
    # entry 1 + loop body [0x10, 0x100]: 2 + 3 (Gaussian arm) + 4 (join) = 9 (+ EXIT 1) = 11
    path = K.gaussian_path(instructions, elements_per_thread=8, elements_per_iteration=4)
    assert path.loop_body == 9
    assert path.whole_path == 11
    assert path.instructions_per_element == (11 + 9) / 8
    assert path.markers == 1


def test_access_widths_count_global_data_accesses_only():
    widths = K.access_widths(_sass(_LOOPED))
    assert widths == {"load": {128: 1, 32: 1}, "store": {128: 1}}  # the .CONSTANT table load is not data
    for opcode, bits in [("LDG.E.EF.128", 128), ("STG.E.U16", 16), ("LDG.E.64", 64), ("LD.E.128", None),
                         ("LDG.E.64.CONSTANT", None), ("FADD", None)]:
        assert K.access_width(K.Instruction(0, "", opcode, "")) == bits, opcode


def test_roofline_against_torch_fused_bytes():
    # 20 B/elem memory-bound: the same time as torch's fused SGD; 10x the H200 issue budget: slower
    fast = K.prediction(10.0, 20, 20)["H200"]
    assert fast["vs_torch_fused"] == 1.0
    slow = K.prediction(1400.0, 20, 20)["H200"]
    h200 = K.GPUS[1]
    assert slow["predicted_ms"] == pytest.approx(1400 * K.PARAMETERS / h200.thread_instructions_per_s * 1e3)
    assert slow["vs_torch_fused"] > 9
    assert K.bytes_per_element(0, "fp32") == 20 and K.bytes_per_element(1, "fp32") == 28
    assert K.bytes_per_element(0, "bf16") == 14  # + the compensation buffer, read and written


# --- the targets ----------------------------------------------------------------------------


# target -> the text of bench.kernels.target_failures() lines that miss it
TARGETS = {"no spills": "spills", "at most 64 registers on sm_90": "registers",
           "128-bit global loads and stores on float32 rows": "bits < 128",
           "float32 step within 1.10x torch fused on H200": "torch fused"}


def _cuda_records(directory):
    if not K.CUDA_LIBRARY.is_file():
        pytest.skip("libnvrm_cuda.so was not built (no nvcc at install time)")
    records = K.cuda_kernels(K.CUDA_LIBRARY, [90], directory)
    assert {r["name"] for r in records if r["variant"]["kind"] == "step"} >= {
        f"step-{op}-{dtype}" for op in ("sgd", "adam", "noise") for dtype in ("fp32", "fp16", "bf16")}
    return records


def _triton_records(directory):
    """Two variants (a few seconds each): the float32 SGD and Adam steps."""
    pytest.importorskip("triton")
    wanted = {"step-sgd-fp32", "step-adam-fp32"}
    variants = [v for v in K.triton_variants() if v["name"] in wanted]
    assert {v["name"] for v in variants} == wanted
    return [K.compile_triton(v, 90, directory) for v in variants]


@pytest.fixture(scope="module", params=["cuda", "triton"])
def records(request, tmp_path_factory):
    if K.cuda_tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (triton wheel or CUDA toolkit)")
    build = _cuda_records if request.param == "cuda" else _triton_records
    return build(tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("target", list(TARGETS))
def test_kernels_meet_the_issue_11_target(records, target):
    assert [f for r in records for f in K.target_failures(r) if TARGETS[target] in f] == []
