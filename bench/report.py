"""Turn pytest-benchmark JSON files into bench/RESULTS.md and bench/step_time.png.

    python -m bench.report                                  # every bench/results/*.json
    python -m bench.report bench/results/cpu.json --markdown bench/RESULTS.md --plot bench/step_time.png

One table per device: a row per (workload, optimizer/backend) with the step time, the
speed-up over the original NVRM algorithm, the overhead over torch's fused optimizer (the same
update without noise), state bytes per parameter, transient peak memory of a step and, on CUDA,
kernel launches per step and the fraction of copy bandwidth achieved. Then the project's goals,
checked against the numbers, whatever they are.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_INPUTS = sorted((BENCH_DIR / "results").glob("*.json"))

ORIGINAL = "original"
TORCH_FUSED = "torch-fused"
IMPLEMENTATION_ORDER = ("original", "torch-foreach", "torch-fused", "nvrm-torch", "nvrm-cpu", "nvrm-cpu-capturable",
                        "nvrm-triton", "nvrm-cuda", "nvrm-cuda-capturable", "nvrm-cuda-graph")
STYLE = {  # one colour per implementation, shared by both families
    "original": dict(color="tab:red", marker="o"),
    "torch-foreach": dict(color="tab:gray", marker="s", linestyle="--"),
    "torch-fused": dict(color="black", marker="s"),
    "nvrm-torch": dict(color="tab:cyan", marker="^", linestyle=":"),
    "nvrm-cpu": dict(color="tab:blue", marker="D"),
    "nvrm-triton": dict(color="tab:green", marker="D"),
    "nvrm-cuda": dict(color="tab:purple", marker="D"),
    "nvrm-cpu-capturable": dict(color="tab:blue", marker="x", linestyle="--"),
    "nvrm-cuda-capturable": dict(color="tab:purple", marker="x", linestyle="--"),
    "nvrm-cuda-graph": dict(color="tab:purple", marker="*", linestyle=":"),
}
FAMILY_TITLE = {"sgd": "SGD with momentum", "adam": "Adam"}
STEP_TIME_KEYS = {"workload", "family", "implementation", "numel"}  # what test_step_time records


def load(paths: list[Path]) -> list[dict]:
    """One record per test_step_time benchmark: extra_info + min/median/rounds + machine info."""
    records = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        machine = dict(run.get("machine_info", {}))
        machine.setdefault("bench_date", run.get("datetime", "")[:16].replace("T", " "))
        machine["skipped"] = run.get("skipped", [])
        for bench in run["benchmarks"]:
            info = bench["extra_info"]
            if not STEP_TIME_KEYS <= info.keys():  # another benchmark of bench/ (e.g. test_amp_step)
                continue
            stats = bench["stats"]
            records.append(dict(info, min_s=stats["min"], median_s=stats["median"],
                                rounds=stats["rounds"], machine=machine))
    return records


def load_nvrm(paths: list[Path]) -> list[dict]:
    """One record per bench/test_nvrm_step.py benchmark (NVRM vs its inner optimizer vs
    FusedVAdam), with the run's machine info."""
    records = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        for bench in run["benchmarks"]:
            if bench["extra_info"].get("nvrm_step") and "nvrm_over_fused_vadam" in bench["extra_info"]:
                records.append(dict(bench["extra_info"], rounds=bench["stats"]["rounds"],
                                    machine=run.get("machine_info", {})))
    return records


NVRM_GOAL_OVER_FUSED_VADAM_CPU = 1.25


def nvrm_section(records: list[dict]) -> list[str]:
    """NVRM(torch AdamW fused) against torch's fused AdamW and FusedVAdam(decoupled), measured
    side by side (one row per run and workload), and the CPU goal against every run."""
    out = ["## NVRM(optimizer): the swap's cost over its inner optimizer", "",
           "From `bench/test_nvrm_step.py`: `NVRM(torch.optim.AdamW(fused=True))`, `torch.optim.AdamW(fused=True)` "
           "alone and `FusedVAdam(decoupled=True)` over the same parameters and gradients (AdamW lr 1e-3, "
           "weight decay 1e-2; noise Gaussian, variability 0.01, compiled backend of the device), one step of each "
           "per round, interleaved so that all three see the same load. On CPU torch runs one intra-op thread: "
           "**CPU ms** is the median CPU time of the stepping thread (all the work, and the figure least "
           "disturbed by other processes); the wall-time ratios are of the fastest rounds and of the medians.", ""]
    header = ["workload", "params / tensors", "run (load avg start/end)", "rounds", "torch AdamW(fused) CPU ms",
              "FusedVAdam CPU ms", "NVRM(AdamW fused) CPU ms", "NVRM ÷ FusedVAdam: CPU / wall min / wall median",
              "NVRM ÷ torch fused (CPU)", "FusedVAdam ÷ torch fused (CPU)"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ordered = sorted(records, key=lambda r: (r["numel"], r["machine"].get("bench_date", "")))
    for r in ordered:
        load = r["machine"].get("load_average_1min") or {}
        out.append("| " + " | ".join([
            r["workload_label"], f"{r['numel'] / 1e6:.1f}M / {r['num_tensors']}",
            f"{r['machine'].get('bench_date', '?')} ({_fmt(load.get('start'), '.1f')}/{_fmt(load.get('end'), '.1f')})",
            str(r["rounds"]), _ms(r["torch_fused_cpu_median_s"]), _ms(r["fused_vadam_cpu_median_s"]),
            _ms(r["nvrm_cpu_median_s"]),
            f"{r['nvrm_over_fused_vadam_cpu_time']:.2f}× / {r['nvrm_over_fused_vadam']:.2f}× / "
            f"{r['nvrm_over_fused_vadam_median']:.2f}×",
            f"{r['nvrm_over_torch_fused_cpu_time']:.2f}×", f"{r['fused_vadam_over_torch_fused_cpu_time']:.2f}×"]) + " |")
    out.append("")
    for device in sorted({r["device"] for r in records}):
        of_device = [r for r in ordered if r["device"] == device]
        machine = of_device[-1]["machine"]
        out += [f"Machine ({device}): {machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} logical CPUs, "
                f"{machine.get('memory_gib', '?')} GiB RAM; torch {machine.get('torch_version', '?')}; torch threads "
                f"in the timed steps: {of_device[-1].get('torch_num_threads', '?')}"
                + ("; cuda: " + machine["cuda_device"] if machine.get("cuda_device") else ""), ""]
        loads = [max((r["machine"].get("load_average_1min") or {}).get(k) or 0 for k in ("start", "end"))
                 for r in of_device]
        if max(loads) > 0.5 * (machine.get("usable_cpus") or 1):
            out += [f"Other processes were running (1-minute load average up to {max(loads):.1f} on "
                    f"{machine.get('usable_cpus', '?')} usable CPUs): wall times are inflated and noisy; the "
                    "CPU-time ratios are the ones to read.", ""]
        if device == "cpu":
            ratios = [r["nvrm_over_fused_vadam_cpu_time"] for r in of_device]
            met = all(ratio <= NVRM_GOAL_OVER_FUSED_VADAM_CPU for ratio in ratios)
            out += [f"- Goal on CPU, NVRM(AdamW fused) within {NVRM_GOAL_OVER_FUSED_VADAM_CPU}× FusedVAdam's step "
                    f"(CPU time): {min(ratios):.2f}× to {max(ratios):.2f}× over {len(ratios)} measurements (runs × workloads): "
                    + ("met" if met else "**not met**"), ""]
    return out


def by_device(records: list[dict]) -> dict[str, list[dict]]:
    devices: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        devices[record["device"]].append(record)
    return devices


def _impl_rank(name: str) -> int:
    return IMPLEMENTATION_ORDER.index(name) if name in IMPLEMENTATION_ORDER else len(IMPLEMENTATION_ORDER)


def _cases(records: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(workload, family) -> implementation -> record, workloads by size then family."""
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    for record in sorted(records, key=lambda r: (r["numel"], r["workload"], r["family"] != "sgd",
                                                 _impl_rank(r["implementation"]))):
        cases.setdefault((record["workload"], record["family"]), {})[record["implementation"]] = record
    return cases


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def machine_lines(machine: dict) -> list[str]:
    cpus = machine.get("cpu_count")
    usable = machine.get("usable_cpus")
    cores = f"{cpus} logical CPUs" + (f" ({usable} usable)" if usable and usable != cpus else "")
    lines = [f"- CPU: {machine.get('cpu_model', '?')}, {cores}, {machine.get('memory_gib', '?')} GiB RAM, "
             f"torch threads: {machine.get('torch_num_threads', '?')}"]
    if machine.get("cuda_device"):
        lines.append(f"- GPU: {machine['cuda_device']}")
    lines.append(f"- torch {machine.get('torch_version', '?')}, triton {machine.get('triton_version') or 'not installed'}, "
                 f"Python {machine.get('python_version', '?')}")
    load = machine.get("load_average_1min") or {}
    lines.append(f"- Date: {machine.get('bench_date', '?')}; size profile: `{machine.get('bench_profile', '?')}`; "
                 f"1-minute load average at start / end: {_fmt(load.get('start'), '.1f')} / {_fmt(load.get('end'), '.1f')}"
                 + (" (other processes were running: timings are inflated and noisy)"
                    if max(load.get("start") or 0, load.get("end") or 0) > 0.5 * (machine.get("usable_cpus") or 1) else ""))
    return lines


def device_table(records: list[dict]) -> list[str]:
    gpu = records[0]["device"] == "cuda"
    header = ["workload", "params / tensors", "optimizer [backend]", "ms/step min", "median", "rounds", "speed-up vs original",
              "× torch fused", "state B/param", "step peak MiB"]
    if gpu:
        header += ["launches/step", "% copy BW"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (workload, family), impls in _cases(records).items():
        original = impls.get(ORIGINAL, {}).get("min_s")
        floor = impls.get(TORCH_FUSED, {}).get("min_s")
        for name, r in impls.items():
            row = [r["workload_label"] if name == next(iter(impls)) else "",
                   f"{r['numel'] / 1e6:.1f}M / {r['num_tensors']}" if name == next(iter(impls)) else "",
                   r["label"], _ms(r["min_s"]), _ms(r["median_s"]), str(r["rounds"]),
                   _fmt(_ratio(original, r["min_s"]), ".2f", "×"),
                   _fmt(_ratio(r["min_s"], floor), ".2f", "×"),
                   _fmt(r.get("state_bytes_per_param"), ".2f"),
                   _fmt(_mib(r.get("step_transient_peak_bytes")), ".1f")]
            if gpu:
                row += [_fmt(r.get("kernel_launches_per_step"), ".0f"),
                        _fmt(100 * r["fraction_of_copy_bandwidth"] if "fraction_of_copy_bandwidth" in r else None, ".0f")]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _best_fused(impls: dict[str, dict]) -> dict | None:
    """The fastest nvrm_ext fused backend of a case in its default mode (the reference 'torch'
    backend and capturable=True / CUDA-graph replay, whose counters add state and a commit
    launch, excluded)."""
    fused = [r for name, r in impls.items()
             if name.startswith("nvrm-") and name != "nvrm-torch" and not name.endswith(("-capturable", "-graph"))]
    return min(fused, key=lambda r: r["min_s"]) if fused else None


def goal_lines(records: list[dict]) -> list[str]:
    """The project's stated goals against these numbers (timings are reported, never enforced)."""
    gpu = records[0]["device"] == "cuda"
    cases = _cases(records)
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    for (workload, family), impls in cases.items():
        fused = _best_fused(impls)
        original = impls.get(ORIGINAL)
        floor = impls.get(TORCH_FUSED)
        if fused is None or original is None:
            continue
        name = f"{fused['label']} on {fused['workload_label']}"
        speedup = original["min_s"] / fused["min_s"]
        saved = original["state_bytes_per_param"] - fused["state_bytes_per_param"]
        if gpu:
            parts = [f"{speedup:.1f}× faster than the original (goal ≥ 20× on ResNet-34: "
                     f"{verdict(speedup >= 20)})" if workload == "resnet" else f"{speedup:.1f}× faster than the original"]
            if floor:
                overhead = fused["min_s"] / floor["min_s"]
                parts.append(f"{overhead:.2f}× torch fused (goal ≤ 1.10×: {verdict(overhead <= 1.10)})")
            if "fraction_of_copy_bandwidth" in fused:
                fraction = fused["fraction_of_copy_bandwidth"]
                parts.append(f"{100 * fraction:.0f}% of copy bandwidth (goal ≥ 85%: {verdict(fraction >= 0.85)})")
            if "kernel_launches_per_step" in fused:
                launches = fused["kernel_launches_per_step"]
                copies = fused.get("memcpys_per_step", 0)
                parts.append(f"{launches:g} kernel launches/step (goal 1: {verdict(launches == 1)})"
                             + (f", plus {copies:g} memcpys (launch tables)" if copies else ""))
        else:
            parts = [f"{speedup:.2f}× faster than the original (goal ≥ 2×: {verdict(speedup >= 2)})"]
            if floor:
                parts.append(f"{fused['min_s'] / floor['min_s']:.2f}× torch fused")
            parts.append(f"{saved:.0f} B/param less state (goal 8: {verdict(saved >= 8)})")
        lines.append(f"- {name}: " + "; ".join(parts))
    if not lines:
        lines.append("- No compiled or Triton nvrm_ext backend was measured on this device.")
    return lines


def markdown(records: list[dict], nvrm_records: list[dict] | None = None) -> str:
    out = ["# nvrm_ext benchmark results", "",
           "Generated by `python -m bench.report` from the pytest-benchmark JSON in `bench/results/`; "
           "reproduce with `python -m pytest bench/ --benchmark-json=bench/results/<device>.json`.", "",
           "How to read it:", "",
           "- **ms/step**: wall time of one `optimizer.step()`, fastest and median of the rounds pytest-benchmark "
           "ran (CUDA: synchronized inside the timed call). Ratios and bandwidth use the fastest round, the "
           "figure least distorted by other processes on a shared machine. The same parameters and gradients (fixed seed, `.grad` filled "
           "once and reused) for every optimizer; hyperparameters: SGD lr 0.01, momentum 0.9, weight decay "
           "5e-4; Adam lr 1e-3; noise: Gaussian, variability 0.01.",
           "- **speed-up vs original**: original NVRM (`OriginalVSGD`/`OriginalVAdam`) time ÷ this time. "
           "**× torch fused**: this time ÷ `torch.optim.SGD/Adam(fused=True)` time, i.e. the cost of the noise "
           "over the plain optimizer.",
           "- **state B/param**: bytes of all tensors in `optimizer.state` ÷ parameter count (fp32). torch's Adam "
           "adds a 4-byte step tensor per parameter tensor.",
           "- **step peak MiB**: transient memory of one (steady-state) step above what was live before it. CUDA: "
           "`torch.cuda.max_memory_allocated`. CPU: peak of the running sum of allocations and frees of torch's "
           "CPU allocator recorded by `torch.profiler(profile_memory=True)`; memory a compiled library "
           "allocates outside torch is not seen, and the reference backend (below) is not profiled on CPU "
           "(its ~2,000 small ops per tensor would take minutes to record).",
           "- **% copy BW** (CUDA): minimal bytes the step must move (SGD: 20 B/param, Adam: 28 B/param) ÷ "
           "fastest round, as a fraction of a measured device-to-device `copy_` of 256 MiB.",
           "- FusedV*[torch] is the per-tensor PyTorch *reference* backend (regenerates the noise with int64 "
           "Philox in plain torch ops); it is what `backend='auto'` falls back to when no compiled or "
           "Triton backend can run.", ""]
    for device, records_of_device in sorted(by_device(records).items()):
        machine = records_of_device[0]["machine"]
        out += [f"## {device.upper()}", ""] + machine_lines(machine) + [""]
        out += ["### Goals", ""] + goal_lines(records_of_device) + [""]
        out += ["### Step time, state and memory", ""] + device_table(records_of_device) + [""]
        skipped = machine.get("skipped", [])
        if skipped:
            reasons: dict[str, int] = defaultdict(int)
            for s in skipped:
                reasons[s["reason"].removeprefix("Skipped: ")] += 1
            out += ["Not measured on this device:", ""]
            out += [f"- {reason} ({count} case{'s' if count != 1 else ''})" for reason, count in reasons.items()] + [""]
    if nvrm_records:
        out += nvrm_section(nvrm_records)
    out += ["![step time vs parameter count](step_time.png)", ""]
    return "\n".join(out)


def plot(records: list[dict], path: Path) -> None:
    """Step time vs parameter count, log-log, a line per optimizer/backend; a panel per device
    and family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = by_device(records)
    families = [f for f in FAMILY_TITLE if any(r["family"] == f for r in records)]
    fig, axes = plt.subplots(len(devices), len(families), figsize=(6.5 * len(families), 5.6 * len(devices)),
                             squeeze=False)
    for row, (device, device_records) in enumerate(sorted(devices.items())):
        for col, family in enumerate(families):
            ax = axes[row][col]
            lines: dict[str, list[dict]] = defaultdict(list)
            for r in device_records:
                if r["family"] == family:
                    lines[r["implementation"]].append(r)
            for name in sorted(lines, key=_impl_rank):
                points = sorted(lines[name], key=lambda r: r["numel"])
                ax.plot([r["numel"] for r in points], [r["min_s"] * 1e3 for r in points],
                        label=points[0]["label"], **STYLE.get(name, {}))
            workloads = {r["numel"]: r["workload"] for r in device_records}
            for numel, workload in workloads.items():
                ax.axvline(numel, color="lightgray", linewidth=0.8, zorder=0)
                ax.annotate(workload, (numel, 1), xycoords=("data", "axes fraction"), xytext=(2, -4),
                            textcoords="offset points", ha="left", va="top", fontsize=8, color="dimgray",
                            rotation=90)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("parameters")
            ax.set_ylabel("ms per step (fastest round)")
            ax.set_title(f"{FAMILY_TITLE[family]} — {device.upper()}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kept_sections(path: Path) -> str:
    """Sections of an existing RESULTS.md that other tools own (between `<!-- NAME: begin -->`
    and `<!-- NAME: end -->`, e.g. python -m bench.kernels), carried over verbatim so that
    re-rendering the timings does not drop them."""
    if not path.exists():
        return ""
    text = path.read_text()
    kept = [m.group(0) for m in re.finditer(r"<!-- ([\w.]+): begin -->.*?<!-- \1: end -->", text, re.S)]
    return "".join("\n" + section + "\n" for section in kept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", type=Path, default=DEFAULT_INPUTS,
                        help="pytest-benchmark JSON files (default: bench/results/*.json)")
    parser.add_argument("--markdown", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=BENCH_DIR / "step_time.png")
    args = parser.parse_args(argv)
    if not args.inputs:
        parser.error("no JSON files given and none in bench/results/")
    records = load(args.inputs)
    if not records:
        parser.error("the JSON files hold no benchmarks (was --benchmark-disable set?)")
    args.markdown.write_text(markdown(records, load_nvrm(args.inputs)) + kept_sections(args.markdown))
    plot(records, args.plot)
    print(f"wrote {args.markdown} and {args.plot} from {len(records)} benchmarks")


if __name__ == "__main__":
    main()
