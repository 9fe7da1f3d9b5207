"""The README's demo run (`python -m quantfix`) against its own float-reference pass, cold.

Issue 23's target: the CPU demo within 12 float-reference passes. Each run gets a fresh cache directory
that keeps only the demo download and its converted model (links into the user's cache: the conversion is
not what is measured), so the float reference, the calibration statistics and the sensitivity are computed
again. Per run: the stages' seconds from the run's report, the total against the float-reference pass
and against the median search trial (a trial is one evaluation pass over the same windows, of a
quantized model: a steadier yardstick than the first forward pass of the process, which also writes the
reference to the cache), wall time, the process's peak host memory, the verdict and the bits shipped.

    python scripts/bench_demo_cpu.py --runs 2 --out benchmarks/demo_cpu.json

Prints a table and writes JSON. Extra arguments after ``--`` go to ``python -m quantfix``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantfix.cache import cache_dir

KEPT = ("demo", "converted")  # the download and its conversion: linked, not rebuilt
STAGES = ("float reference", "calibration stats", "evaluate trials", "diagnose", "shipped plan: domains and probes",
          "verify (reload + evaluate)", "total")


def run_once(runs_dir: Path, i: int, extra: list) -> dict:
    """One cold run of the demo: its report's timings, the ratios, wall time and peak memory."""
    cache = Path(tempfile.mkdtemp(prefix="qf_cache_", dir=runs_dir))
    user = cache_dir()
    for name in KEPT:
        if (user / name).exists():
            (cache / name).symlink_to(user / name)
    out = runs_dir / f"run{i}"
    cmd = [sys.executable, "-m", "quantfix", f"cache_dir={cache}", f"hydra.run.dir={out}", *extra]
    t0 = time.perf_counter()
    with open(runs_dir / f"run{i}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, TQDM_DISABLE="1"))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0 or not (out / "report.json").exists():
        raise SystemExit(f"run {i} failed (exit {os.waitstatus_to_exitcode(status)}): see {runs_dir / f'run{i}.log'}")
    return row(json.loads((out / "report.json").read_text()), wall, usage.ru_maxrss / 2 ** 20)


def row(report: dict, wall: float, peak_gb: float) -> dict:
    """A run's report as one benchmark row."""
    t = report["timings_s"]
    trials = [it["seconds"] for it in report["iterations"]]
    search = trials[1:] or trials  # trial 0 is the process's first quantized pass (and plan 0's)
    final = report["final"]
    return {"stages_s": {k: t.get(k) for k in STAGES}, "trials": len(trials), "trial_s": trials,
            "x_float_reference": round(t["total"] / t["float reference"], 2),
            "x_median_search_trial": round(t["total"] / statistics.median(search), 2),
            "wall_s": round(wall, 1), "peak_host_gb": round(peak_gb, 2), "status": report["status"],
            "passed": final.get("passed"), "avg_bits": final.get("avg_bits"), "stop_reason": final.get("stop_reason")}


def table(rows: list) -> str:
    head = ["run", *STAGES, "trials", "x float reference", "x median search trial", "wall s", "peak GB", "bits",
            "passed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [str(i), *(f"{r['stages_s'][k]:.1f}" for k in STAGES), str(r["trials"]), f"**{r['x_float_reference']}**",
                 str(r["x_median_search_trial"]), str(r["wall_s"]), str(r["peak_host_gb"]), str(r["avg_bits"]),
                 str(r["passed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--work", default=None, help="where the runs' caches and run dirs go (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/demo_cpu.json")
    ap.add_argument("extra", nargs="*", help="overrides for python -m quantfix (after --)")
    a = ap.parse_args()
    runs_dir = Path(a.work or tempfile.mkdtemp(prefix="qf_bench_demo_"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(a.runs):
        rows.append(run_once(runs_dir, i, a.extra))
        print(f"run {i}: {rows[-1]['stages_s']['total']:.1f} s, {rows[-1]['x_float_reference']}x the float reference",
              flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "cpus": os.cpu_count(), "overrides": a.extra, "target_x_float_reference": 12,
              "runs": rows, "work_dir": str(runs_dir)}
    print(table(rows))
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
