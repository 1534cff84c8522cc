"""Hardware counters of the FlashTPA split kernel beside a plain read of the same bytes (issue 12,
point 2), on a GPU whose runtime lets Nsight Compute read them (the H200 machines: Firecracker).

The parent runs ``ncu --set full --clock-control none`` over a child of this script per point; the
child warms every kernel up (so that compilation stays outside the profile), then opens the
profiler (``cudaProfilerStart``) and makes one decode call (split and merge kernels) or one plain
read. Per point it keeps the raw page (every metric, ``POINT.raw.csv.gz``) and the details page
(``POINT.details.csv``: sections, rule messages), and ``ncu.json`` / ``ncu.md`` gather the metrics
that say what bounds a kernel: DRAM throughput, achieved occupancy, issue slots used, the warp
stall reasons per issued instruction, registers, shared memory and instructions executed.

    python benchmarks/dev/decode_ncu.py --out $OUT/ncu [--points a b ...]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

KB = 1024
POINTS = {  # name: (what, ranks, B, L, config overrides)
    "r16-b1-512k": ("decode", (16, 1, 1), 1, 512 * KB, {}),
    "r6-b8-32k": ("decode", (6, 2, 2), 8, 32 * KB, {}),
    "r16-b4-512k": ("decode", (16, 1, 1), 4, 512 * KB, {}),
    "read-201mb": ("read", None, 201_326_592, 4, {}),  # bytes, programs per SM
}
SUMMARY = {  # label: raw metric name (or names: the first one present)
    "time_us": "gpu__time_duration.sum",
    "dram_pct_peak": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                      "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    "dram_read_MB": "dram__bytes_read.sum",
    "registers": "launch__registers_per_thread",
    "shared_per_block_B": "launch__shared_mem_per_block",
    "block_threads": "launch__block_size",
    "grid": "launch__grid_size",
    "occupancy_theoretical_pct": "sm__maximum_warps_per_active_cycle_pct",
    "occupancy_achieved_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "warp_cycles_per_issue": "smsp__average_warp_latency_per_inst_issued.ratio",
    "inst_executed": "smsp__inst_executed.sum",
    "l1tex_pct_peak": "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "lts_pct_peak": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
}
TO_UNIT = {  # label: (unit it is reported in, factors from ncu's units to it)
    "time_us": {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6,
                "second": 1e6},
    "dram_read_MB": {"byte": 1e-6, "Kbyte": 1e-3, "KB": 1e-3, "Mbyte": 1.0, "MB": 1.0, "Gbyte": 1e3, "GB": 1e3},
}
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def child(name: str) -> None:
    """One profiled call of point ``name`` after warm-up calls outside the profile."""
    import torch

    from tpa.bench.decode.inputs import tpa_inputs
    from tpa.ops.decode import DecodeConfig, tpa_decode

    what, ranks, a, b, overrides = POINTS[name]
    if what == "decode":
        inputs = tpa_inputs(torch, a, b, 32, 64, ranks, torch.bfloat16)
        out = torch.empty(a, 1, 32, 64, dtype=torch.bfloat16, device="cuda")
        cfg = DecodeConfig(**overrides) if overrides else None

        def call():
            tpa_decode(*inputs[:7], out=out, config=cfg)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from decode_gap import _stream_kernel

        stream_read = _stream_kernel()
        n, programs = a // 2, b * torch.cuda.get_device_properties(0).multi_processor_count
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        sink = torch.empty(programs, device="cuda", dtype=torch.float32)
        block = 4096
        chunk = math.ceil(n / programs / block) * block

        def call():
            stream_read[(programs,)](x, sink, n, chunk, BLOCK=block, num_warps=8)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def ncu_page(ncu: str, report: Path, page: str) -> list[dict]:
    text = subprocess.run([ncu, "--import", str(report), "--page", page, "--csv"], check=True,
                          capture_output=True, text=True).stdout
    return list(csv.DictReader(io.StringIO(text[text.find('"'):])))


def number(value: str) -> float | None:
    try:
        return float(value.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def summarise(raw: list[dict]) -> list[dict]:
    """Per profiled kernel: the metrics of SUMMARY (in the units its labels name, converted from the
    units row that follows the raw page's header) and the six largest stall reasons."""
    units = next((r for r in raw if number(r.get("ID", "")) is None), {})
    kernels = []
    for row in (r for r in raw if number(r.get("ID", "")) is not None):
        entry = {"kernel": row.get("Kernel Name", "").split("(")[0][:60]}
        for label, metrics in SUMMARY.items():
            metric = next((m for m in (metrics if isinstance(metrics, tuple) else (metrics,)) if m in row), None)
            value = number(row.get(metric, "")) if metric else None
            if value is not None and label in TO_UNIT:
                factor = TO_UNIT[label].get(units.get(metric, "").strip())
                value = value * factor if factor is not None else None
            entry[label] = round(value, 2) if value is not None else None
        stalls = {k[len(STALL_PREFIX):-len(STALL_SUFFIX)]: number(v) for k, v in row.items()
                  if k.startswith(STALL_PREFIX) and k.endswith(STALL_SUFFIX) and "not_issued" not in k}
        top = sorted(((v, k) for k, v in stalls.items() if v), reverse=True)[:6]
        entry["stalls"] = {k: round(v, 2) for v, k in top}
        kernels.append(entry)
    return kernels


def parent(args) -> None:
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.points:
        report = args.out / f"{name}.ncu-rep"
        cmd = [ncu, "--set", "full", "--clock-control", "none", "--profile-from-start", "off",
               "--target-processes", "all", "-f", "-o", str(report.with_suffix("")),
               sys.executable, __file__, "--child", name]
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        (args.out / f"{name}.log").write_text(run.stdout[-20000:] + run.stderr[-20000:])
        if run.returncode != 0 or not report.exists():
            results[name] = {"error": f"ncu rc {run.returncode}", "tail": (run.stdout + run.stderr)[-2000:]}
            print(json.dumps({name: results[name]}), flush=True)
            continue
        raw = ncu_page(ncu, report, "raw")
        buf = io.StringIO()
        if raw:
            writer = csv.DictWriter(buf, fieldnames=list(raw[0]))
            writer.writeheader()
            writer.writerows(raw)
        with gzip.open(args.out / f"{name}.raw.csv.gz", "wt") as f:
            f.write(buf.getvalue())
        details = subprocess.run([ncu, "--import", str(report), "--page", "details", "--csv"],
                                 capture_output=True, text=True).stdout
        (args.out / f"{name}.details.csv").write_text(details)
        report.unlink()  # large; the two pages above hold what it holds
        results[name] = summarise(raw)
        print(json.dumps({name: results[name]}), flush=True)
        (args.out / "ncu.json").write_text(json.dumps(results, indent=1))
    write_table(args.out / "ncu.md", results)


def write_table(path: Path, results: dict) -> None:
    cols = list(SUMMARY)
    lines = ["| point | kernel | " + " | ".join(cols) + " | top stalls (cycles per issue) |",
             "|" + " --- |" * (len(cols) + 3)]
    for name, kernels in results.items():
        if isinstance(kernels, dict):
            lines.append(f"| {name} | error: {kernels['error']} |")
            continue
        for k in kernels:
            stalls = ", ".join(f"{s} {v}" for s, v in k["stalls"].items())
            lines.append(f"| {name} | {k['kernel']} | " + " | ".join(str(k[c]) for c in cols) + f" | {stalls} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs")) / "ncu")
    p.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    p.add_argument("--child", choices=list(POINTS), help=argparse.SUPPRESS)
    p.add_argument("--from-raw", action="store_true",
                   help="rebuild ncu.json and ncu.md in --out from its POINT.raw.csv.gz files (no GPU, no profiling)")
    args = p.parse_args()
    if args.child:
        return child(args.child)
    if args.from_raw:
        return from_raw(args.out)
    parent(args)


def from_raw(out: Path) -> None:
    """The summary of the raw pages kept in ``out`` (the points in POINTS order)."""
    results = {}
    for name in (n for n in POINTS if (out / f"{n}.raw.csv.gz").exists()):
        with gzip.open(out / f"{name}.raw.csv.gz", "rt") as f:
            results[name] = summarise(list(csv.DictReader(f)))
    (out / "ncu.json").write_text(json.dumps(results, indent=1))
    write_table(out / "ncu.md", results)


if __name__ == "__main__":
    main()
