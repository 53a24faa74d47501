"""Issue 11's kernel targets, checked from compiled code (no GPU): bench/kernels.py, and the
same targets on AMD GPUs: bench/kernels_amd.py.

The analysis itself is checked on hand-written SASS and amdgcn with known answers and against
the CUDA occupancy rules; the targets on the CUDA kernels of the built libnvrm_cuda.so (skipped
when nvcc did not build it), on four Triton variants compiled for sm_90 and on six compiled for
gfx942 (MI300) and gfx90a (MI200) (a few seconds each).
"""
import concurrent.futures
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if not (ROOT / "bench" / "kernels.py").is_file():
    pytest.skip("the checkout's bench/ is not here (tests run against an installed wheel)", allow_module_level=True)

from bench import kernels as K  # noqa: E402
from bench import kernels_amd as A  # noqa: E402


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


def test_nvrm_prediction_adds_the_swap_launch_to_torch_fused_adamw():
    h200 = K.GPUS[1]
    # a memory-bound swap of 8 B/elem after torch's 28 B/elem AdamW: (28 + 8) / 28
    cheap = K.nvrm_prediction(1.0, 8, 28)["H200"]
    assert cheap["swap_bound"] == "memory"
    assert cheap["vs_torch_fused"] == pytest.approx(36 / 28)
    # an issue-bound swap: torch's memory time + the swap's issue time
    costly = K.nvrm_prediction(120.0, 8, 28)["H200"]
    torch_ms = 28 * K.PARAMETERS / (h200.hbm_bytes_per_s * h200.achievable_fraction) * 1e3
    swap_ms = 120 * K.PARAMETERS / h200.thread_instructions_per_s * 1e3
    assert costly["swap_bound"] == "issue"
    assert costly["nvrm_ms"] == pytest.approx(torch_ms + swap_ms)
    assert costly["vs_torch_fused"] == pytest.approx((torch_ms + swap_ms) / torch_ms)


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
    """Four variants (a few seconds each): the float32 SGD and Adam steps, and NVRM's swap (the
    noise-only op) in float32 and bfloat16."""
    pytest.importorskip("triton")
    wanted = {"step-sgd-fp32", "step-adam-fp32", "step-noise-fp32", "step-noise-bf16"}
    variants = [v for v in K.triton_variants() if v["name"] in wanted]
    assert {v["name"] for v in variants} == wanted
    return [K.compile_triton(v, 90, directory) for v in variants]


# ids: a test id of plain "cuda" would read as the cuda marker (tests/conftest.py skips those
# without a GPU), and these need none
@pytest.fixture(scope="module", params=["cuda", "triton"], ids=["libnvrm_cuda", "triton"])
def records(request, tmp_path_factory):
    if K.cuda_tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (triton wheel or CUDA toolkit)")
    build = _cuda_records if request.param == "cuda" else _triton_records
    return build(tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("target", list(TARGETS))
def test_kernels_meet_the_issue_11_target(records, target):
    assert [f for r in records for f in K.target_failures(r) if TARGETS[target] in f] == []


def test_swap_kernels_do_not_spill_and_move_a_whole_quad_per_access(records):
    """NVRM's swap (the noise-only op): no spills, and on the aligned path each thread loads and
    stores its quad of 4 elements in one access (128 bits in float32, 64 in 16-bit)."""
    swaps = [r for r in records if "nvrm_swap" in r]
    assert {r["variant"]["dtype"] for r in swaps} >= {"fp32", "bf16"}
    for swap in swaps:
        where = f"{swap['backend']} {swap['name']} {swap['arch']}"
        assert swap["variant"]["op"] == K.OP_NOISE, where
        assert swap["spills"] == {"local_bytes": 0, "stack_bytes": 0, "ldl_stl_instructions": 0}, where
        quad_bits = 4 * 8 * K.DTYPES[swap["variant"]["dtype"]]
        assert (swap["widest_load_bits"], swap["widest_store_bits"]) == (quad_bits, quad_bits), where


def test_nvrm_over_torch_fused_adamw_is_predicted_for_every_swap_kernel(records):
    """The ratio is computed (reported in bench/RESULTS.md, its value not asserted here): NVRM's
    step is torch's fused AdamW plus the swap, so it costs more than AdamW alone."""
    pairs = K.swap_pairs(records)
    assert pairs
    for swap, adam in pairs:
        for gpu in K.GPUS:
            predicted = swap["nvrm_swap"]["prediction_100M"][gpu.name]
            assert predicted["nvrm_ms"] == pytest.approx(predicted["torch_fused_ms"] + predicted["swap_ms"])
            assert 1.0 < predicted["vs_torch_fused"] < float("inf")
        if swap["variant"]["dtype"] == "fp32":  # FusedVAdam's float32 step, side by side
            assert adam is not None and adam["prediction_100M"]["H200"]["vs_torch_fused"] >= 1.0
    assert any("NVRM(torch AdamW fused)" in line for line in K.nvrm_goal_lines(records))
    table = K.swap_table(records)
    assert table.count("\n") == 1 + len(pairs)


# --- AMD GPUs (bench/kernels_amd.py) ----------------------------------------------------------

# A loop of 2 iterations as LLVM's AMDGPU backend lays it out: entered below its exit test, and a
# uniform branch structurized into two arms in sequence, joined by a flow block that branches
# back to the loop head after the first arm -- one arm runs per iteration, not both.
_AMD_SOURCE = """row = tl.load(frow + F_LR)
p = tl.load(param_ptr + idx, mask=mask, other=0.0)
tl.store(ptr + i0, x0, mask=m0)
s = tl.fma(r2, 0.00016044118092395365, -0.004681753925979137)
m = tl.load(frow + F_MOMENTUM) * tl.load(m_ptr + idx, mask=mask)
"""
_AMD_KERNEL = """
\t.file\t1 "{directory}" "source.py"
_kernel:
\t.loc\t1 1 0
\tglobal_load_dword v1, v0, s[0:1]
\t.loc\t1 5 5
\tglobal_load_dwordx4 v[8:11], v0, s[2:3] offset:8
\t.loc\t1 5 34
\tglobal_load_dwordx2 v[12:13], v[14:15], off
\t.loc\t1 0 5
\tbuffer_load_ushort v16, v6, s[12:15], 0 offen
\ts_mov_b32 s7, 0
\ts_branch .LBB0_2
.LBB0_1:
\ts_cmp_ge_u32 s7, 2
\ts_cbranch_scc1 .LBB0_6
.LBB0_2:
\ts_cmp_eq_u32 s8, 0
\ts_cbranch_scc1 .LBB0_3
\t.loc\t1 2 0
\tbuffer_load_dwordx4 v[2:5], v6, s[12:15], 0 offen
\t.loc\t1 4 0
\tv_fmaak_f32 v2, v2, v3, 0x3fc90fdb
\tv_mul_hi_u32 v3, v2, v4
.LBB0_3:
\ts_add_u32 s7, s7, 1
\ts_cbranch_vccnz .LBB0_1
\t.loc\t1 3 0
\tbuffer_store_dword v2, v6, s[12:15], 0 offen
\t.loc\t1 4 0
\tv_fmaak_f32 v2, v2, v3, 0x3fc90fdb
\tv_add_f32_e32 v2, v2, v3
\tv_add_f32_e32 v2, v2, v3
\ts_branch .LBB0_1
.LBB0_6:
\ts_endpgm
.Lfunc_end0:
"""


def _amd_kernel(tmp_path):
    (tmp_path / "source.py").write_text(_AMD_SOURCE)
    instructions, labels = A.parse_amdgcn(_AMD_KERNEL.format(directory=tmp_path))
    return instructions, A.as_sass(instructions, labels)


def test_amd_gaussian_path_counts_one_arm_per_iteration_and_the_prologue_once(tmp_path):
    _, sass = _amd_kernel(tmp_path)
    # prologue 6; loop body: head 2 + branch 2 + vector arm 3 + flow block 2 = 9, twice
    path = A.gaussian_path(sass, elements_per_thread=8, elements_per_iteration=4)
    assert (path.loop_body, path.whole_path, path.markers) == (9, 15, 1)
    assert path.instructions_per_element == (6 + 2 * 9) / 8
    # VALU issue: v_fmaak (full rate) + v_mul_hi_u32 (quarter rate: 4) per iteration
    assert A.gaussian_path(sass, 8, 4, cost=A.valu_cost).instructions_per_element == 2 * 5 / 8


def test_amd_data_accesses_are_the_tile_loads_and_stores_by_source_line(tmp_path):
    instructions, _ = _amd_kernel(tmp_path)
    data = [(i.mnemonic, A.memory_access(i)) for i in instructions if A.is_data_access(i)]
    assert data == [("global_load_dwordx2", ("global", "load", 64)),  # line 5's second load: m_ptr + idx
                    ("buffer_load_ushort", ("buffer", "load", 16)),  # no location: a buffer access is data
                    ("buffer_load_dwordx4", ("buffer", "load", 128)), ("buffer_store_dword", ("buffer", "store", 32))]
    assert A.memory_access(instructions[0]) == ("global", "load", 32)  # the table reads: not data
    assert not A.is_data_access(instructions[1])  # line 5's first load: frow + F_MOMENTUM
    assert A.memory_access(A.AmdInstruction("s_load_dwordx4", "", "")) is None


@pytest.mark.parametrize("vgprs, agprs, threads, lds, expected", [
    (58, 0, 256, 0, 8),        # 64 allocated: 512 / 64
    (79, 0, 256, 0, 6),        # 80 allocated: 6 waves
    (40, 40, 256, 0, 6),       # accumulation VGPRs share the file
    (129, 0, 256, 0, 3),       # 136 allocated
    (24, 0, 256, 20 * 1024, 3),  # LDS: 3 workgroups of 4 waves over 4 SIMDs
])
def test_amd_waves_per_simd(vgprs, agprs, threads, lds, expected):
    assert A.waves_per_simd(vgprs, agprs, threads, lds, A.ARCHS["gfx942"]) == expected


@pytest.fixture(scope="module")
def amd_records(tmp_path_factory):
    """Six variants for 64-thread wavefronts (a few seconds each, two at a time): gfx942's float32
    SGD, Adam and swap steps and its bfloat16 swap; gfx90a's float32 Adam and swap."""
    reason = A.hip_unavailable_reason()
    if reason:
        pytest.skip(reason)
    variants = {v["name"]: v for v in K.triton_variants(A.WAVE)}
    jobs = [(name, "gfx942") for name in ("step-sgd-fp32", "step-adam-fp32", "step-noise-fp32", "step-noise-bf16")]
    jobs += [(name, "gfx90a") for name in ("step-adam-fp32", "step-noise-fp32")]
    directory = tmp_path_factory.mktemp("amd")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # two processes of three
        chunks = pool.map(lambda half: A.compile_triton([(variants[n], arch) for n, arch in half], directory),
                          [jobs[0::2], jobs[1::2]])
        return [record for chunk in chunks for record in chunk]


AMD_TARGETS = {"no spills": "spills", "128-bit global loads and stores on float32 rows": "bits < 128"}


@pytest.mark.parametrize("target", list(AMD_TARGETS))
def test_amd_kernels_meet_the_sm_90_target(amd_records, target):
    assert [f for r in amd_records for f in A.target_failures(r) if AMD_TARGETS[target] in f] == []


def test_amd_swap_kernels_move_a_whole_quad_per_access(amd_records):
    """As on sm_90: one access per quad of 4 elements on the aligned path (dwordx4 in float32,
    dwordx2 in 16-bit), no scratch, and the occupancy the VGPRs allow."""
    swaps = [r for r in amd_records if r["variant"]["op"] == K.OP_NOISE]
    assert {(r["arch"], r["variant"]["dtype"]) for r in swaps} == {("gfx942", "fp32"), ("gfx942", "bf16"),
                                                                   ("gfx90a", "fp32")}
    for swap in swaps:
        quad_bits = 4 * 8 * K.DTYPES[swap["variant"]["dtype"]]
        assert (swap["widest_load_bits"], swap["widest_store_bits"]) == (quad_bits, quad_bits), swap["name"]
        assert swap["spills"] == {"vgpr_spills": 0, "private_segment_bytes": 0, "scratch_instructions": 0}
        assert swap["waves_per_simd"] >= 4 and swap["flat_accesses"] == 0
    for record in amd_records:  # the figures behind the table and the prediction are read
        assert 0 < record["gaussian_valu_cycles_per_element"] <= record["gaussian_instructions_per_element"]
        (prediction,) = record["prediction_100M"].values()
        assert prediction["predicted_ms"] >= prediction["memory_ms"] > 0
    assert A.markdown_table(amd_records).count("\n") == 1 + len(amd_records)


def test_amd_section_of_results_is_replaced_in_place_and_kept_by_the_timing_report(amd_records, tmp_path):
    from bench import report

    results = tmp_path / "RESULTS.md"
    results.write_text("# timings\n")
    for _ in range(2):  # a second run replaces the section
        A.update_results(results, amd_records)
    text = results.read_text()
    assert text.startswith("# timings\n") and text.count(A.RESULTS_BEGIN) == 1
    assert "0 missed" in text
    assert A.RESULTS_BEGIN in report.kept_sections(results)  # python -m bench.report carries it over
