"""The Triton kernels compiled for AMD GPUs and judged by their figures, without a GPU.

    python -m bench.kernels_amd [--archs gfx942 gfx90a] [--out bench/kernels_amd.json] [--results bench/RESULTS.md]

The AMD twin of bench/kernels.py: every Triton variant the optimizers launch on a 64-thread
wavefront (nvrm_ext.backends.triton.kernel_variants(64)), compiled with
`triton.compile(ASTSource(...), target=GPUTarget("hip", arch, 64))` for gfx942 (MI300) and
gfx90a (MI200) -- the triton wheel carries LLVM's AMDGPU backend and links the hsaco itself. From
the amdgcn assembly it reads VGPRs/SGPRs, spills and scratch, occupancy, the width of every
global data access and the instructions per element on the Gaussian path (bench/kernels.py's
path search, over the amdgcn translated into its vocabulary), and predicts the step on MI300X
and on one MI250X die with the same roofline model. docs/kernel_model.md says how.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bench import kernels as K

ROOT = K.ROOT
WAVE = 64  # threads per wavefront on CDNA2/CDNA3 (the variants' TILE gives each thread one quad)


@dataclasses.dataclass(frozen=True)
class AmdArch:
    """Per-SIMD limits of a CDNA GPU (AMD's CDNA2/CDNA3 ISA guides; LLVM's AMDGPU target)."""
    vgprs: int = 512  # per lane: architected + accumulation VGPRs share one file on gfx90a/gfx942
    vgpr_granule: int = 8
    max_waves: int = 8  # per SIMD
    simds: int = 4  # per compute unit
    lds_bytes: int = 64 * 1024  # per compute unit


ARCHS = {"gfx942": AmdArch(), "gfx90a": AmdArch()}


@dataclasses.dataclass(frozen=True)
class AmdGpu:
    """The roofline figures (docs/kernel_model.md): a wave64 vector instruction occupies a
    16-lane SIMD for 4 cycles, so a CU issues 4 x 16 lane-instructions per cycle."""
    name: str
    arch: str
    cus: int
    clock_hz: float  # peak engine clock
    hbm_bytes_per_s: float
    achievable_fraction: float = 0.90

    @property
    def lane_instructions_per_s(self) -> float:
        return self.cus * 4 * 16 * self.clock_hz

    def memory_s(self, nbytes: float) -> float:
        return nbytes / (self.hbm_bytes_per_s * self.achievable_fraction)


# AMD's datasheets: MI300X 304 CUs, 2,100 MHz, 5.3 TB/s; MI250X 220 CUs in two dies (GCDs, each
# one torch device) at 1,700 MHz, 3.2768 TB/s in all.
GPUS = (AmdGpu("MI300X", "gfx942", cus=304, clock_hz=2.1e9, hbm_bytes_per_s=5.3e12),
        AmdGpu("MI250X (one GCD)", "gfx90a", cus=110, clock_hz=1.7e9, hbm_bytes_per_s=1.6384e12))

# Vector instructions LLVM's AMDGPU scheduling model issues at quarter rate (WriteQuarterRate32,
# WriteTrans32): the 32-bit integer multiplies of Philox, and the transcendental functions.
_QUARTER_RATE = re.compile(r"^v_(mul_hi_[iu]32|mul_lo_[iu]32|mad_[iu]64_[iu]32|mad_[iu]32_[iu]24_hi"
                           r"|(rcp|rsq|sqrt|log|exp|sin|cos)_(f32|legacy_f32))\b")

# ---------------------------------------------------------------------------------------------
# amdgcn


@dataclasses.dataclass(frozen=True)
class AmdInstruction:
    mnemonic: str  # e.g. 'buffer_load_dwordx4'
    operands: str
    source: str  # its source: the triton.py text from the .loc column on ('' if unknown)


_WIDTHS = {"dwordx4": 128, "dwordx3": 96, "dwordx2": 64, "dword": 32, "short": 16, "ushort": 16, "sshort": 16,
           "short_d16": 16, "short_d16_hi": 16, "byte": 8, "ubyte": 8, "sbyte": 8}
_MEMORY = re.compile(r"^(global|buffer|flat|scratch)_(load|store)_(\w+?)$")


def memory_access(instruction: AmdInstruction) -> tuple[str, str, int] | None:
    """(space, 'load' | 'store', bits) of a vector memory instruction, else None. Scalar loads
    (s_load_*, the launch tables' uniform words) are not vector memory instructions."""
    match = _MEMORY.match(instruction.mnemonic)
    if match is None or match.group(3) not in _WIDTHS:
        return None
    return match.group(1), match.group(2), _WIDTHS[match.group(3)]


_DATA_SOURCE = re.compile(r"tl\.(load|store)\(\s*\w*ptr \+ (idx|i[0-3])\b")


def is_data_access(instruction: AmdInstruction) -> bool:
    """A global load/store of a tensor's elements: the call it comes from (the .loc column's)
    indexes a tile (`tl.load(ptr + idx ...`, lane by lane `ptr + i0`..`i3`); where LLVM kept no
    location (line 0, an access merged from several), a buffer access, the form Triton gives
    tensor accesses on CDNA. The others read the launch tables' per-row scalars (bench/kernels.py
    leaves those out of the SASS figures as .CONSTANT loads)."""
    access = memory_access(instruction)
    if access is None or access[0] not in ("global", "buffer"):
        return False
    if not instruction.source:
        return access[0] == "buffer"
    return _DATA_SOURCE.match(instruction.source) is not None


def parse_amdgcn(text: str) -> tuple[list[AmdInstruction], dict[str, int]]:
    """The kernel's instructions (with the source line of each, from the .loc directives) and
    the label -> instruction index map."""
    files: dict[str, list[str]] = {}
    for number, directory, name in re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]*)"\s+"([^"]*)"', text, re.M):
        path = Path(directory) / name
        files[number] = path.read_text().splitlines() if path.is_file() else []
    instructions: list[AmdInstruction] = []
    labels: dict[str, int] = {}
    source = ""
    in_function = False
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].rstrip()
        if not in_function:
            in_function = bool(re.match(r"^[A-Za-z_]\w*:", line)) and not line.startswith(".")
            continue
        if re.match(r"^\.Lfunc_end\d+:", line):
            break
        label = re.match(r"^([.\w$]+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(".loc"):
            number, row, column = (stripped.split() + ["0"])[1:4]
            lines = files.get(number, [])
            line = lines[int(row) - 1] if 0 < int(row) <= len(lines) else ""
            # from the column on; without a column, the line's first load or store
            source = line[int(column) - 1:] if int(column) > 0 else line[max(line.find("tl."), 0):]
            continue
        if stripped.startswith("."):
            continue
        mnemonic, _, operands = stripped.partition(" ")
        instructions.append(AmdInstruction(mnemonic, operands.strip(), source))
    return instructions, labels


def as_sass(instructions: list[AmdInstruction], labels: dict[str, int]) -> list[K.Instruction]:
    """The amdgcn in bench/kernels.py's SASS vocabulary, so that its control-flow graph and
    Gaussian-path search read it unchanged: s_branch -> BRA, s_cbranch_* -> a predicated BRA,
    s_endpgm -> EXIT, s_nop -> NOP, a global data access of B bits -> LDG/STG.B, float64
    arithmetic marked .F64; addresses 16 apart, as in SASS."""
    out = []
    for index, instruction in enumerate(instructions):
        mnemonic, operands, predicate = instruction.mnemonic, instruction.operands, ""
        if mnemonic in ("s_branch",) or mnemonic.startswith("s_cbranch_"):
            predicate = "" if mnemonic == "s_branch" else "@P0"
            target = labels.get(operands.split(",")[0].strip())
            opcode, operands = "BRA", (f"0x{target * 16:x}" if target is not None else operands)
        elif mnemonic == "s_endpgm":
            opcode = "EXIT"
        elif mnemonic == "s_nop":
            opcode = "NOP"
        elif is_data_access(instruction):
            _, kind, bits = memory_access(instruction)
            opcode = ("LDG" if kind == "load" else "STG") + {128: ".E.128", 64: ".E.64", 96: ".E.64", 16: ".E.U16",
                                                           8: ".E.U8"}.get(bits, ".E")
        else:
            opcode = mnemonic + (".F64" if "_f64" in mnemonic else "")
        out.append(K.Instruction(index * 16, predicate, opcode, operands))
    return out


def valu_cost(instruction: K.Instruction) -> int:
    """Issue cycles of a SIMD lane per wave64 vector instruction, in units of a full-rate one
    (1; quarter-rate: 4); scalar, memory and branch instructions issue elsewhere (0)."""
    if not instruction.opcode.startswith("v_"):
        return 0
    return 4 if _QUARTER_RATE.match(instruction.opcode) else 1


def gaussian_path(instructions: list[K.Instruction], elements_per_thread: int, elements_per_iteration: int,
                  cost=K.issued) -> K.PathCount:
    """Instructions per element on the Gaussian path of an amdgcn step kernel: the prologue
    (entry to the loop) + iterations x the loop body, each the heaviest path by (sin/cos markers,
    wide accesses, cost) as in bench.kernels.gaussian_path, float64 blocks excluded.

    bench.kernels.gaussian_path's entry-to-exit path does not fit LLVM's AMDGPU code: its CFG
    structurizer lays the two arms of a uniform branch one after the other, joined by a flow
    block that branches on the saved condition, so that a path may run through both (twice the
    instructions one tile executes); and a loop is entered below its exit test. Here the loop
    body is the one through the back edge of the shortest span whose path holds the Gaussian
    transform and wide accesses -- the vectorized arm alone -- and the prologue ends where the
    entry first jumps into the loop."""
    blocks = K.control_flow_graph(instructions)
    allowed = lambda block: not block.float64  # noqa: E731
    loops = []
    for block in blocks.values():
        for head in (s for s in block.successors if s <= block.start and allowed(block)):
            body = K._longest(blocks, head, block.start,
                              lambda b, h=head, e=block.start: allowed(b) and h <= b.start <= e, cost)
            if body is not None and body[0] > 0:
                loops.append((body[1] == 0, block.start - head, head, block.start, body))
    if not loops:
        raise ValueError("no loop over quads holds the Gaussian transform")
    _, _, head, latch, body = min(loops)  # wide accesses first, then the innermost
    best: dict[int, tuple | None] = {}
    for address in sorted((a for a in blocks if a < head and allowed(blocks[a])), reverse=True):
        block = blocks[address]
        tails = [best[s] for s in block.successors if address < s < head and best.get(s) is not None]
        if any(head <= s <= latch for s in block.successors):
            tails.append((0, 0, 0))
        best[address] = tuple(a + b for a, b in zip(block.weight(cost), max(tails))) if tails else None
    prologue = best.get(min(blocks))
    if prologue is None:
        raise ValueError("no path from the entry reaches the loop")
    iterations = elements_per_thread // elements_per_iteration
    total = prologue[2] + iterations * body[2]
    return K.PathCount(total / elements_per_thread, body[0], prologue[2] + body[2], body[2])


def metadata(text: str) -> dict[str, int]:
    """The code object's figures: the AMDHSA metadata (.vgpr_count ...) and LLVM's occupancy."""
    def field(name: str, default: int = 0) -> int:
        match = re.search(rf"^\s*\.{name}:\s*(\d+)", text, re.M)
        return int(match.group(1)) if match else default

    occupancy = re.search(r"^; Occupancy: (\d+)", text, re.M)
    return {"vgprs": field("vgpr_count"), "agprs": field("agpr_count"), "sgprs": field("sgpr_count"),
            "vgpr_spills": field("vgpr_spill_count"), "sgpr_spills": field("sgpr_spill_count"),
            "private_segment_bytes": field("private_segment_fixed_size"),
            "lds_bytes": field("group_segment_fixed_size"),
            "llvm_occupancy": int(occupancy.group(1)) if occupancy else None}


def waves_per_simd(vgprs: int, agprs: int, threads: int, lds_bytes: int, arch: AmdArch) -> int:
    """Waves one SIMD holds, by VGPRs (architected + accumulation, rounded up to the granule)
    and by the LDS of the workgroups, up to the hardware's maximum."""
    allocated = -(-max(vgprs + agprs, 1) // arch.vgpr_granule) * arch.vgpr_granule
    by_vgprs = arch.vgprs // allocated
    waves_per_group = -(-threads // WAVE)
    by_lds = (arch.lds_bytes // lds_bytes) * waves_per_group // arch.simds if lds_bytes else arch.max_waves
    return max(0, min(by_vgprs, by_lds, arch.max_waves))


# ---------------------------------------------------------------------------------------------
# Compiling and describing


_TRITON_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nvrm_ext.backends import triton as K

jobs, wave = json.loads(sys.argv[1])
variants = {v.name: v for v in K.kernel_variants(wave)}
out = []
for name, arch, stem in jobs:
    variant = variants[name]
    compiled = triton.compile(ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs,
                                        attrs=getattr(variant, "attrs", None)),
                              target=GPUTarget("hip", arch, wave), options=variant.options)
    open(stem + ".amdgcn", "w").write(compiled.asm["amdgcn"])
    open(stem + ".hsaco", "wb").write(compiled.asm["hsaco"])
    out.append({"num_warps": compiled.metadata.num_warps, "warp_size": compiled.metadata.warp_size})
json.dump(out, sys.stdout)
"""


def hip_unavailable_reason() -> str | None:
    """None if this triton can compile for AMD GPUs, else why not."""
    try:
        from triton.backends import backends
    except ImportError as error:
        return f"triton is not importable: {error}"
    return None if "amd" in backends else "this triton wheel carries no AMD backend"


def compile_triton(jobs: list[tuple[dict, str]], directory: Path) -> list[dict]:
    """Compiles Triton variants (of triton_variants(WAVE)), each for its arch, in one subprocess
    (the interpreter must be off there; importing triton and hashing it for its cache take
    longer than a compilation) and describes them."""
    stems = [str(directory / f"triton-{variant['name']}-{arch}") for variant, arch in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argument = json.dumps([[[variant["name"], arch, stem] for (variant, arch), stem in zip(jobs, stems)], WAVE])
    result = subprocess.run([sys.executable, "-c", _TRITON_COMPILE, argument],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        names = ", ".join(f"{variant['name']} for {arch}" for variant, arch in jobs)
        raise RuntimeError(f"compiling {names} failed:\n{result.stderr[-3000:]}")
    records = []
    for (variant, arch), stem, meta in zip(jobs, stems, json.loads(result.stdout)):
        if meta["warp_size"] != WAVE:
            raise RuntimeError(f"{variant['name']} compiled for {meta['warp_size']}-thread waves, not {WAVE}")
        records.append(describe(variant, arch, Path(f"{stem}.amdgcn").read_text(), threads=WAVE * meta["num_warps"],
                                num_warps=meta["num_warps"], files=(f"{stem}.amdgcn", f"{stem}.hsaco")))
    return records


def describe(variant: dict, arch: str, text: str, *, threads: int, num_warps: int, files=(None, None)) -> dict:
    """One kernels_amd.json record of the amdgcn `text`."""
    figures = metadata(text)
    instructions, labels = parse_amdgcn(text)
    widths: dict[str, dict[int, int]] = {"load": {}, "store": {}}
    for instruction in instructions:
        if is_data_access(instruction):
            _, kind, bits = memory_access(instruction)
            widths[kind][bits] = widths[kind].get(bits, 0) + 1
    scratch = sum((memory_access(i) or ("",))[0] == "scratch" for i in instructions)
    record = {
        "name": variant["name"], "backend": "triton", "arch": arch, "variant": variant,
        "amdgcn": K._relative(files[0]), "hsaco": K._relative(files[1]), "num_warps": num_warps, "threads": threads,
        "vgprs": figures["vgprs"], "agprs": figures["agprs"], "sgprs": figures["sgprs"],
        "spills": {"vgpr_spills": figures["vgpr_spills"], "private_segment_bytes": figures["private_segment_bytes"],
                   "scratch_instructions": scratch},
        "sgpr_spills_to_vgpr_lanes": figures["sgpr_spills"], "lds_bytes": figures["lds_bytes"],
        "waves_per_simd": waves_per_simd(figures["vgprs"], figures["agprs"], threads, figures["lds_bytes"],
                                         ARCHS[arch]),
        "llvm_occupancy_waves": figures["llvm_occupancy"],
        "widest_load_bits": max(widths["load"], default=None), "widest_store_bits": max(widths["store"], default=None),
        "access_widths": {kind: {str(k): v for k, v in sorted(c.items())} for kind, c in widths.items()},
        "flat_accesses": sum((memory_access(i) or ("",))[0] == "flat" for i in instructions),
        "instructions": sum(i.mnemonic != "s_nop" for i in instructions),
    }
    if variant["kind"] == "step":
        sass = as_sass(instructions, labels)
        per_thread, per_iteration = variant["block"] // threads, variant["tile"] // threads
        path = gaussian_path(sass, per_thread, per_iteration)
        valu = gaussian_path(sass, per_thread, per_iteration, cost=valu_cost)
        nbytes = K.bytes_per_element(variant["op"], variant["dtype"], variant["scaler"])
        torch_bytes = K.torch_fused_bytes(variant["op"], variant["dtype"])
        record.update({
            "elements_per_thread": per_thread,
            "gaussian_instructions_per_element": round(path.instructions_per_element, 2),
            "gaussian_valu_cycles_per_element": round(valu.instructions_per_element, 2),
            "gaussian_path": dataclasses.asdict(path), "bytes_per_element": nbytes,
            "torch_fused_bytes_per_element": torch_bytes,
            "prediction_100M": prediction(arch, valu.instructions_per_element, nbytes, torch_bytes),
        })
    return record


def prediction(arch: str, valu_cycles_per_element: float, nbytes: int, torch_bytes: int | None,
               parameters: int = K.PARAMETERS) -> dict[str, dict]:
    """Per GPU of `arch`: max(memory, VALU issue) time of our kernel and torch's fused kernel's
    memory time (bench/kernels.py's model with the AMD figures)."""
    out = {}
    for gpu in (g for g in GPUS if g.arch == arch):
        memory = gpu.memory_s(nbytes * parameters)
        issue = valu_cycles_per_element * parameters / gpu.lane_instructions_per_s
        ours = max(memory, issue)
        torch_s = gpu.memory_s(torch_bytes * parameters) if torch_bytes else None
        out[gpu.name] = {"memory_ms": memory * 1e3, "issue_ms": issue * 1e3, "predicted_ms": ours * 1e3,
                         "torch_fused_ms": torch_s * 1e3 if torch_s else None,
                         "vs_torch_fused": ours / torch_s if torch_s else None}
    return out


# ---------------------------------------------------------------------------------------------
# Targets and the table


def target_failures(record: dict) -> list[str]:
    """The sm_90 targets this kernel misses on AMD: no spills (no scratch: VGPRs spilled to
    memory), and 128-bit global loads and stores on float32 step rows."""
    failures = []
    where = f"{record['backend']} {record['name']} {record['arch']}"
    spills = record["spills"]
    if spills["vgpr_spills"] or spills["private_segment_bytes"] or spills["scratch_instructions"]:
        failures.append(f"{where}: spills ({spills})")
    if record["variant"]["kind"] == "step" and record["variant"]["dtype"] == "fp32":
        for kind in ("load", "store"):
            if (record[f"widest_{kind}_bits"] or 0) < 128:
                failures.append(f"{where}: widest global {kind} {record[f'widest_{kind}_bits']} bits < 128")
    return failures


def markdown_table(records: list[dict]) -> str:
    lines = ["| kernel | arch | VGPR/SGPR | spills (SGPR→VGPR lanes) | waves/SIMD (LLVM) | data loads, bits×count | "
             "data stores, bits×count | instr/elem (VALU cycles/elem), Gaussian | B/elem | "
             "predicted ms, 100M (× torch fused) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["variant"]["kind"] != "step":
            continue
        spills = r["spills"]
        spilled = ("none" if not any(spills.values())
                   else f"{spills['vgpr_spills']} VGPR, {spills['private_segment_bytes']} B")
        widths = [" ".join(f"{bits}×{count}" for bits, count in sorted(r["access_widths"][kind].items(),
                                                                     key=lambda item: -int(item[0])))
                  for kind in ("load", "store")]
        gpu, p = next(iter(r["prediction_100M"].items()))
        ratio = f" ({p['vs_torch_fused']:.2f}×)" if p["vs_torch_fused"] else ""
        lines.append(f"| triton {r['name']} | {r['arch']} | {r['vgprs']}/{r['sgprs']} | {spilled} "
                     f"({r['sgpr_spills_to_vgpr_lanes']}) | {r['waves_per_simd']} ({r['llvm_occupancy_waves']}) | "
                     f"{widths[0]} | {widths[1]} | {r['gaussian_instructions_per_element']:.1f} "
                     f"({r['gaussian_valu_cycles_per_element']:.1f}) | {r['bytes_per_element']} | "
                     f"{gpu}: {p['predicted_ms']:.3f}{ratio} |")
    return "\n".join(lines)


RESULTS_BEGIN = "<!-- bench.kernels_amd: begin -->"
RESULTS_END = "<!-- bench.kernels_amd: end -->"


def update_results(path: Path, records: list[dict]) -> None:
    """Replaces (or appends) the marked AMD section of bench/RESULTS.md."""
    failures = [f for r in records for f in target_failures(r)]
    section = "\n".join([
        RESULTS_BEGIN, "## The Triton kernels on AMD GPUs, by their compiled figures (no GPU)", "",
        "Generated by `python -m bench.kernels_amd` (bench/kernels_amd.json); the model is docs/kernel_model.md. "
        "Compiled for 64-thread wavefronts (one quad of 4 elements per thread). Data loads and stores: the "
        "global_/buffer_ accesses of tensor elements in the code, by width (128 = dwordx4: a float32 quad; 64: a "
        "16-bit quad; 32 and 16: the unaligned path, lane by lane), launch-table reads not counted. Predictions at "
        f"{K.PARAMETERS // 1_000_000}M parameters, 2 Gaussian draws per element, from the VALU cycles "
        "(quarter-rate integer multiplies and transcendentals ×4) and the bytes; GradScaler variants omitted "
        "(in the JSON).", "",
        markdown_table([r for r in records if not r["variant"].get("scaler") and not r["variant"].get("found_inf")]),
        "", f"Targets (no spills; 128-bit float32 accesses): {len(failures)} missed."
        + "".join(f"\n- {f}" for f in failures), "", RESULTS_END])
    K.replace_section(path, section, RESULTS_BEGIN, RESULTS_END)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--out", type=Path, default=K.BENCH_DIR / "kernels_amd.json")
    parser.add_argument("--results", default=str(K.BENCH_DIR / "RESULTS.md"),
                        help="markdown file whose marked AMD section is replaced ('' to skip)")
    parser.add_argument("--artifacts", type=Path, default=K.ARTIFACTS, help="where the amdgcn/hsaco files go")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--render", action="store_true",
                        help="only re-render the tables from an existing --out JSON (no compiling)")
    args = parser.parse_args(argv)
    if args.render:
        records = json.loads(args.out.read_text())
        print(markdown_table(records))
        if args.results:
            update_results(Path(args.results), records)
        return 0
    reason = hip_unavailable_reason()
    if reason:
        parser.error(reason)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    jobs = [(variant, arch) for arch in args.archs for variant in K.triton_variants(WAVE)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        chunks = pool.map(lambda chunk: compile_triton(chunk, args.artifacts),
                          [jobs[i::args.jobs] for i in range(args.jobs)])
        records = [record for chunk in chunks for record in chunk]
    records.sort(key=lambda r: (r["arch"], r["variant"]["kind"] != "step", r["name"]))
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(markdown_table(records))
    if args.results:
        update_results(Path(args.results), records)
    failures = [f for r in records for f in target_failures(r)]
    print(f"\n{len(records)} kernels -> {args.out}; targets missed: {len(failures)}")
    for failure in failures:
        print("  " + failure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
