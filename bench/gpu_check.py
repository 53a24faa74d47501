"""The first-GPU check (driven by bench/gpu_check.sh): the cuda-marked tests, the GPU bench rows,
kernel launches per step and achieved bandwidth, written to bench/results/gpu.json with a
one-screen summary. Every part has a time budget, so the whole fits in 8 minutes on one
H100/H200; what a budget cuts is recorded as skipped, never silently dropped.

    python -m bench.gpu_check                # on a GPU (gpu_check.sh builds and installs first)
    python -m bench.gpu_check --dry-run      # on CPU: the same code paths at smoke sizes
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import measure
from .optimizers import IMPLEMENTATIONS, MIN_TRAFFIC_BYTES_PER_FP32_PARAM, skip_reason
from .workloads import Workload, workloads

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu.json"
NO_GPU = ("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
          "run it on a machine with an NVIDIA GPU, or pass --dry-run")

# What each row compares: both nvrm_ext GPU backends against torch's fused and foreach steps
# and the original NVRM implementation; on CPU (--dry-run) the cpu backend stands in.
GPU_IMPLEMENTATIONS = ("nvrm-cuda", "nvrm-triton", "torch-fused", "torch-foreach", "original")
DRY_IMPLEMENTATIONS = ("nvrm-cpu", "torch-foreach", "original")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STEPS, WARMUP, PROFILED = 10, 3, 2


def gpu_workloads(dry_run: bool) -> list[Workload]:
    """A 100M-parameter list (where the step is bandwidth-bound), GPT-2 small (124M),
    ResNet-34 and 2,000 tiny tensors, in that order: a spent budget cuts the small ones last in
    importance; smoke sizes for --dry-run."""
    if dry_run:
        return workloads("smoke")
    by_name = {w.name: w for w in workloads("full")}
    big = Workload("list100m", "100 tensors x 1M (100M)", ((1_000_000,),) * 100)
    return [big, by_name["gpt2"], by_name["resnet"], by_name["tiny"]]


def run_tests(paths: list[str], timeout: float, dry_run: bool) -> dict:
    """Every cuda-marked test under `paths` (--dry-run: only collects them)."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               "-o", "addopts=", *paths]
    if dry_run:
        command.append("--collect-only")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stdout or b"")[-2000:]
        return {"command": " ".join(command), "status": "timeout", "seconds": timeout,
                "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"command": " ".join(command), "status": "passed" if done.returncode == 0 else "failed",
            "returncode": done.returncode, "seconds": round(time.perf_counter() - start, 1),
            "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-40:]) + done.stderr[-2000:]}


def _timed_steps(step, device: torch.device, steps: int) -> list[float]:
    """Seconds of each of `steps` calls (CUDA events on a GPU: no host timer skew)."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    return times


def bench_row(impl_name: str, family: str, workload: Workload, dtype_name: str,
              device: torch.device, copy_bytes_per_s: float | None) -> dict:
    """One row: median step time, launches per step and achieved bandwidth of one optimizer."""
    impl = next(i for i in IMPLEMENTATIONS if i.name == impl_name)
    dtype = DTYPES[dtype_name]
    row = {"implementation": impl_name, "label": impl.label(family), "family": family,
           "workload": workload.name, "tensors": workload.num_tensors, "params": workload.numel,
           "dtype": dtype_name}
    reason = skip_reason(impl, device)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    generator = torch.Generator(device=device).manual_seed(0)  # drawn on the device: 100M in ms
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator, device=device).to(dtype))
              for shape in workload.shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator, device=device) * 1e-2).to(dtype)
    try:
        optimizer = impl.build(family, params)
        step = optimizer.step
        for _ in range(WARMUP):  # lazy state, Triton compilation, cached launch data
            step()
        measure.synchronize(device)
        times = _timed_steps(step, device, STEPS)
        if device.type == "cuda":
            row.update(measure.gpu_activity_per_step(step, device, PROFILED))
    except Exception as error:  # one implementation failing must not hide the others' figures
        return {**row, "status": "error", "reason": f"{type(error).__name__}: {error}"[:500]}
    median = statistics.median(times)

    def figure(x: float) -> float:  # 4 significant digits: smoke sizes give tiny bandwidths
        return float(f"{x:.4g}")

    traffic = MIN_TRAFFIC_BYTES_PER_FP32_PARAM[family] * workload.numel * torch.finfo(dtype).bits / 32
    row.update(status="ok", step_ms=figure(median * 1e3), min_ms=figure(min(times) * 1e3),
               achieved_gb_per_s=figure(traffic / median / 1e9))
    if copy_bytes_per_s:
        row["fraction_of_copy_bandwidth"] = figure(traffic / median / copy_bytes_per_s)
    return row


def run_bench(device: torch.device, budget: float, dry_run: bool) -> dict:
    """Every row within `budget` seconds; rows past it are recorded as skipped."""
    deadline = time.perf_counter() + budget
    copy = measure.copy_bandwidth(device, 1 << 26 if dry_run else 1 << 30)
    implementations = DRY_IMPLEMENTATIONS if dry_run else GPU_IMPLEMENTATIONS
    rows = []
    for workload in gpu_workloads(dry_run):
        for family in ("sgd", "adam"):
            for dtype_name in DTYPES:
                for impl_name in implementations:
                    if time.perf_counter() > deadline:
                        rows.append({"implementation": impl_name, "family": family, "workload": workload.name,
                                     "dtype": dtype_name, "status": "skipped", "reason": "time budget spent"})
                        continue
                    rows.append(bench_row(impl_name, family, workload, dtype_name, device, copy))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return {"copy_gb_per_s": round(copy / 1e9, 1), "rows": rows}


def environment(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    cuda_runtime_of_torch=torch.version.cuda)
    from nvrm_ext.backends import compiled
    info["build_info"] = compiled.build_info()
    return info


def summary(report: dict) -> str:
    """One screen: environment, the tests' verdict, then per workload and family the step
    time of each implementation (fp32 | bf16) and nvrm's launches and share of copy bandwidth."""
    env, tests, bench = report["environment"], report["tests"], report["bench"]
    lines = [f"gpu_check on {env.get('gpu', env['device'])} | torch {env['torch']} | triton {env['triton']}",
             f"tests (pytest -m cuda): {tests['status']} in {tests.get('seconds', '?')} s: {tests.get('summary', '')}",
             f"device-to-device copy: {bench['copy_gb_per_s']} GB/s",
             "step ms (fp32 | bf16); launches/step and fraction of copy bandwidth for fp32"]
    cells: dict = {}
    for row in bench["rows"]:
        key = (row["workload"], row["family"])
        value = f"{row['step_ms']:.3g}" if row.get("status") == "ok" else row.get("status", "?")[:4]
        extra = ""
        if row.get("status") == "ok" and row["dtype"] == "fp32" and "kernel_launches_per_step" in row:
            extra = f" [{row['kernel_launches_per_step']:.0f}L {row.get('fraction_of_copy_bandwidth', 0):.2f}bw]"
        cells.setdefault(key, {}).setdefault(row["implementation"], {})[row["dtype"]] = (value, extra)
    for (workload, family), by_impl in cells.items():
        parts = []
        for impl, by_dtype in by_impl.items():
            fp32, extra = by_dtype.get("fp32", ("-", ""))
            bf16, _ = by_dtype.get("bf16", ("-", ""))
            parts.append(f"{impl} {fp32}|{bf16}{extra}")
        lines.append(f"{workload:>9} {family:<4} " + "  ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, smoke sizes, tests only collected")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tests", nargs="+", default=[str(ROOT / "tests")], help="where the cuda-marked tests are")
    parser.add_argument("--tests-budget", type=float, default=150.0, help="seconds for pytest -m cuda")
    parser.add_argument("--bench-budget", type=float, default=120.0, help="seconds for the bench rows")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    start = time.perf_counter()
    report = {"environment": environment(device), "dry_run": args.dry_run}
    report["tests"] = run_tests(args.tests, args.tests_budget, args.dry_run)
    report["bench"] = run_bench(device, args.bench_budget, args.dry_run)
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    print(f"written: {args.out} ({report['seconds']} s)")
    failed = report["tests"]["status"] != "passed" or any(  # the baselines' own failures do not count
        row.get("status") == "error" and row["implementation"].startswith("nvrm") for row in report["bench"]["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
