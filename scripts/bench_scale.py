"""The whole loop at real sizes: Llama-3-shaped models with random weights, stage by stage.

    python scripts/bench_scale.py [--sizes 1b 3b 8b] [--trials 3] [--budget-s 1500]
        [--work /tmp/quantfix-scale] [--out benchmarks/scale.json]
    python scripts/bench_scale.py --sizes 70b --layers 2 4 model.device_map=auto   # 70B-shaped slices, extrapolated
    python scripts/bench_scale.py --sizes small --device cpu --profile   # 8B's proportions at 1/8 width: CPU profiling
    python scripts/bench_scale.py --merge a.json b.json --out benchmarks/scale.json  # one table, one growth fit

Each size is built directly on the GPU (no download; random weights, so only time and memory mean
anything), saved as an HF directory (bf16 safetensors, the demo's tokenizer: any token ids below
the vocabulary size do), then ``python -m quantfix`` runs on it as a user would: float reference,
calibration statistics, diagnosis, ``--trials`` trials (loop.max_iters), llm-compressor export,
reload and verify. Per size the table gives seconds per stage (report.json's timings), peak GPU
memory (torch's allocator, from report.json) and peak host memory (the run's max RSS), and the JSON
a log-log fit of each stage's seconds against parameters (the growth exponent). ``--layers N`` keeps
N decoder layers of the shape (a slice of a larger model): per-layer costs to extrapolate from.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# Llama-3.x shapes (hidden, layers, intermediate, heads, kv heads), vocabulary 128,256
SHAPES = {
    "1b": (2048, 16, 8192, 32, 8),
    "3b": (3072, 28, 8192, 24, 8),
    "8b": (4096, 32, 14336, 32, 8),
    "70b": (8192, 80, 28672, 64, 8),
    "tiny": (256, 2, 512, 4, 2),  # a smoke test of the script itself (CPU)
    "small": (512, 4, 1792, 8, 2),  # 8B's proportions at 1/8 width: CPU profiling
}
VOCAB = 128256


def build(size: str, layers, path: Path, tokenizer_dir: str, device: str) -> dict:
    """A random-weight Llama of the given shape, saved to ``path`` (bf16); returns its facts."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, n_layers, inter, heads, kv = SHAPES[size]
    n_layers = layers or n_layers
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=size in ("1b", "3b"), torch_dtype="bfloat16",
                      bos_token_id=0, eos_token_id=1)
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    model.config._name_or_path = str(path)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"size": size, "layers": n_layers, "params": n_params, "bf16_gb": round(2 * n_params / 1e9, 2),
            "build_s": round(time.perf_counter() - t, 1)}


def run_loop(model_dir: Path, run_dir: Path, trials: int, timeout: int, extra: list, device: str,
             profile: bool = False) -> dict:
    """``python -m quantfix`` on the model as a user runs it; returns report.json's timings and memory.
    ``profile``: under cProfile, the top functions by cumulative time written beside the run."""
    prof = run_dir.parent / f"{run_dir.name}.prof"
    cmd = [sys.executable, *(["-m", "cProfile", "-o", str(prof)] if profile else []), "-m", "quantfix", f"model.name_or_path={model_dir}", f"device={device}",
           f"loop.max_iters={trials}", f"hydra.run.dir={run_dir}",
           f"cache_dir={run_dir.parent / (run_dir.name + '-cache')}",  # cold: nothing from an earlier run
           # budget mode from W3g64: plan 0, one probe plan, the plan within the budget (3 trials), a
           # real mixed-precision export (a threshold search on random weights could end on FP16)
           # (random weights make every domain-gap finding spurious: no recalibration pass)
           "quant.bits=3", "quant.group_size=64", "plan.budget.avg_bits=4.5", "loop.recalibrate=false", *extra]
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # interrupt: the run writes report.json with what it measured
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            rc = "timeout"
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    row = {"rc": rc, "wall_s": round(wall, 1), "peak_host_gb": round(rss / 2 ** 20, 2) if rss > before else None}
    # (RUSAGE_CHILDREN only grows: a smaller later child leaves it unchanged, and a child's figure
    # includes this process's own peak, carried across exec: an upper bound used only when the run
    # wrote no report.json, whose figure is the run's own, from VmHWM)
    rep = run_dir / "report.json"
    if rep.exists():
        r = json.loads(rep.read_text())
        fin = r.get("final") or {}
        row.update(timings_s=r.get("timings_s"), memory=r.get("memory"), trials=len(r.get("iterations", [])),
                   stop_reason=fin.get("stop_reason"), peak_host_gb_run=round(
                       (r.get("memory") or {}).get("host_rss_peak_mb", 0) / 1024, 2), checkpoint_gb=round(fin.get("checkpoint_bytes", 0) / 1e9, 2),
                   verified=fin.get("verified_metrics") is not None,
                   reload_problems=[f for f in fin.get("verified_failed", []) if "missing" in f or "unexpected" in f])
    if profile and prof.exists():
        import pstats

        with open(run_dir.parent / f"{run_dir.name}.prof.txt", "w") as f:
            pstats.Stats(str(prof), stream=f).sort_stats("cumulative").print_stats(60)
            pstats.Stats(str(prof), stream=f).sort_stats("tottime").print_stats(30)
    dg = run_dir / "diagnosis.json"
    if dg.exists():  # the diagnosis's own parts: seconds and memory at each part's end
        d = json.loads(dg.read_text())
        row.update(diagnose_timings_s=d.get("timings_s"), diagnose_memory_gb=d.get("memory_gb"))
    return row


def lsq(xs: list, ys: list):
    """Least-squares line through (xs, ys): (slope, mean x, mean y); slope None when xs are equal."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    vx = sum((x - mx) ** 2 for x in xs)
    return (sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / vx if vx > 0 else None), mx, my


def fit(rows: list) -> dict:
    """Per stage, the exponent b of seconds = a * params^b (least squares in log-log), 2+ sizes."""
    stages = sorted({s for r in rows for s in (r.get("timings_s") or {})})
    out = {}
    for s in stages:
        pts = [(math.log(r["params"]), math.log(r["timings_s"][s])) for r in rows
               if (r.get("timings_s") or {}).get(s, 0) > 0.05]
        b = lsq([x for x, _ in pts], [y for _, y in pts])[0] if len(pts) >= 2 else None
        if b is not None:
            out[s] = round(b, 2)
    return out


def table(res: dict) -> str:
    rows = res["rows"]
    stages = [s for s in ("load model", "float reference", "calibration stats", "diagnose", "quantize (simulated)",
                          "evaluate trials", "export", "verify (reload + evaluate)", "total")
              if any(s in (r.get("timings_s") or {}) for r in rows)]
    head = "| size | params | layers | " + " | ".join(stages) + " | peak GPU GB | peak host GB | trials | rc |"
    lines = [head, "|" + "---|" * (len(stages) + 7)]
    for r in rows:
        t = r.get("timings_s") or {}
        gpu = (r.get("memory") or {}).get("device_peak_mb")
        cells = [f"{t[s]:.0f}" if s in t else "-" for s in stages]
        label = " ".join([r["size"]] + [o for o in r.get("overrides") or [] if not o.startswith("threads=")])
        lines.append(f"| {label} | {r['params'] / 1e9:.2f}B | {r['layers']} | " + " | ".join(cells)
                     + (f" | {gpu / 1024:.1f}" if gpu else " | -")
                     + f" | {r.get('peak_host_gb_run') or r.get('peak_host_gb')} | {r.get('trials')} | {r.get('rc')} |")
    mem = [r for r in rows if (r.get("memory") or {}).get("stages")]
    if mem:  # where the memory goes: the snapshot at each stage's end (peak so far / now)
        lines.append("\nhost GB at each stage's end, peak so far / now (+ how much the stage raised the peak); "
                     "device peak so far (+ raised):")
        for r in mem:
            parts = dict(r["memory"]["stages"], **{f"diagnose: {k}": v for k, v in (r.get("diagnose_memory_gb") or {}).items()})
            lines.append(f"- {r['size']}: " + "; ".join(
                f"{k} {v.get('host_peak_gb')}/{v.get('host_now_gb')}"
                + (f" (+{v['host_peak_gb_rise']})" if v.get("host_peak_gb_rise") else "")
                + (f" gpu {v['device_peak_gb']}" if "device_peak_gb" in v else "")
                + (f" (+{v['device_peak_gb_rise']})" if v.get("device_peak_gb_rise") else "")
                for k, v in parts.items()))
    parts = [r for r in rows if r.get("diagnose_timings_s")]
    if parts:  # the diagnosis's own parts (sensitivity: Taylor, option simulation, Fisher passes)
        lines.append("\ndiagnosis parts, seconds:")
        for r in parts:
            lines.append(f"- {r['size']}{'-L' + str(r['layers']) if r.get('slice_of') else ''}: "
                         + "; ".join(f"{k} {v:g}" for k, v in r["diagnose_timings_s"].items()))
    if res.get("growth"):
        lines.append("\ngrowth exponent (seconds ~ params^b): "
                     + ", ".join(f"{s} {b}" for s, b in res["growth"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["1b", "3b", "8b"], choices=list(SHAPES))
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help="keep this many decoder layers (a slice); two or more counts: per-layer costs "
                         "fitted and extrapolated to the full depth")
    ap.add_argument("--merge", nargs="+", default=None, help="combine the rows of earlier JSON files into --out")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--budget-s", type=int, default=1500, help="time limit of one size's loop")
    ap.add_argument("--work", default="/tmp/quantfix-scale")
    ap.add_argument("--tokenizer", default=None, help="HF dir whose tokenizer is saved with the models (default: demo)")
    ap.add_argument("--out", default="benchmarks/scale.json")
    ap.add_argument("--keep", action="store_true", help="keep the built models and run dirs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true", help="run each loop under cProfile (a .prof.txt beside it)")
    ap.add_argument("extra", nargs="*", help="more quantfix overrides, e.g. model.device_map=auto")
    a = ap.parse_args()
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        for p in parts:  # each row keeps the overrides of the run that measured it
            for r in p["rows"]:
                r.setdefault("overrides", p.get("overrides") or [])
        res = {**{k: v for k, v in parts[0].items() if k != "rows"}, "merged_from": a.merge,
               "rows": [r for p in parts for r in p["rows"]]}
        finish(res, a.out)
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_scale needs a CUDA GPU (the models are built on it); --device cpu for a smoke test")
    sys.path.insert(0, str(ROOT))
    from quantfix import cache as cache_mod, source as source_mod

    tok_dir = a.tokenizer or source_mod.resolve("demo", cache_mod.cache_dir()).path
    work = Path(a.work)
    res = {"gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None, "n_gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "trials": a.trials, "overrides": a.extra, "rows": []}
    for size in a.sizes:
        for layers in a.layers or [None]:
            d = work / f"{size}{'-L' + str(layers) if layers else ''}"
            facts = build(size, layers, d / "model", tok_dir, a.device)
            if layers:
                facts["slice_of"] = SHAPES[size][1]
            print(f"{size}: {facts['params'] / 1e9:.2f}B params built and saved in {facts['build_s']} s", flush=True)
            row = {**facts, **run_loop(d / "model", d / "run", a.trials, a.budget_s, a.extra, a.device, a.profile)}
            res["rows"].append(row)
            finish(res, a.out, quiet=True)
            print(f"{size}: rc {row['rc']} in {row['wall_s']} s; stages {row.get('timings_s')}", flush=True)
            if not a.keep:
                shutil.rmtree(d / "model", ignore_errors=True)
                shutil.rmtree(d / "run" / "checkpoint", ignore_errors=True)
                shutil.rmtree(d / "run-cache", ignore_errors=True)
    finish(res, a.out)


def finish(res: dict, out: str, quiet: bool = False) -> None:
    """Growth fit over the full-depth rows, extrapolation of the slices, JSON and table."""
    res["growth"] = fit([r for r in res["rows"] if not r.get("slice_of") and r.get("rc") == 0])
    res["extrapolated"] = extrapolate(res["rows"])
    res["table"] = table(res)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2, default=str))
    if not quiet:
        print(res["table"])
        print(f"plot: {plot(res, Path(out).with_suffix('.png'))}")


PLOT_STAGES = [("load model", "load"), ("float reference", "float reference"), ("calibration stats", "calibration"),
               ("sensitivity: taylor", "diagnose: Taylor"), ("sensitivity: option simulation", "diagnose: option simulation"),
               ("sensitivity: fisher passes", "diagnose: Fisher passes"), ("diagnose (rest)", "diagnose: activations, probes"),
               ("trials", "trials"), ("export", "export"), ("verify (reload + evaluate)", "reload + verify"),
               ("other", "other (data, plan, ...)")]


def _plot_seconds(r: dict) -> dict:
    """A row's seconds by the plot's stages (the diagnosis split into its parts where recorded)."""
    t, d = dict(r.get("timings_s") or {}), r.get("diagnose_timings_s") or {}
    out = {k: t.get(k, 0.0) for k in ("load model", "float reference", "calibration stats", "export",
                                      "verify (reload + evaluate)")}
    out["trials"] = t.get("quantize (simulated)", 0.0) + t.get("evaluate trials", 0.0)
    parts = {k: d.get(k, 0.0) for k in ("sensitivity: taylor", "sensitivity: option simulation", "sensitivity: fisher passes")}
    out.update(parts)
    out["diagnose (rest)"] = max(0.0, t.get("diagnose", 0.0) - sum(parts.values()))
    out["other"] = max(0.0, t.get("total", 0.0) - sum(out.values()))
    return out


def plot(res: dict, path: Path) -> Path:
    """Stacked bars: seconds per stage for every measured row and each extrapolated full depth."""
    import matplotlib

    from quantfix.plotting import figure

    bars = []
    for r in res["rows"]:
        if r.get("rc") != 0 or not r.get("timings_s"):
            continue
        label = " ".join([r["size"] + (f" ({r['layers']} of {r['slice_of']} layers)" if r.get("slice_of") else "")]
                         + [o for o in r.get("overrides") or [] if not o.startswith(("threads=", "model.device_map"))])
        bars.append((label, _plot_seconds(r), r["timings_s"].get("total")))
    for size, e in (res.get("extrapolated") or {}).items():
        sec = {k: v["at_full_depth"] for k, v in e["seconds"].items()}
        parts = {k: v["at_full_depth"] for k, v in (e.get("diagnose_parts") or {}).items()}
        bars.append((f"{size} extrapolated to {e['full_layers']} layers",
                     _plot_seconds({"timings_s": sec, "diagnose_timings_s": parts}), sec.get("total")))
    with figure(path, figsize=(10, 0.55 * len(bars) + 2.6)) as (fig, ax):
        colors = list(matplotlib.colormaps["tab10"].colors) + ["#bbbbbb"]
        for j, (key, name) in enumerate(PLOT_STAGES):
            left = [sum(b[1][k] for k, _ in PLOT_STAGES[:j]) for b in bars]
            ax.barh(range(len(bars)), [b[1][key] for b in bars], left=left, color=colors[j % len(colors)],
                    label=name)
        for i, (_, sec, total) in enumerate(bars):  # the label: the run's (or the fitted) total
            ax.text(sum(sec.values()), i, f" {total or sum(sec.values()):.0f} s", va="center", fontsize=8)
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (whole loop: 3 trials, export, reload, verify)")
        ax.set_title(f"quantfix at real sizes, {res.get('gpu') or 'CPU'}", fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
    return path


def extrapolate(rows: list) -> dict:
    """Per size measured as slices of 2+ depths: each stage's seconds and the peak memory fitted as
    a + b * layers (least squares) and evaluated at the full depth (the slice's ``slice_of``)."""
    out = {}
    for size in sorted({r["size"] for r in rows if r.get("slice_of")}):
        rs = [r for r in rows if r["size"] == size and r.get("slice_of") and r.get("rc") == 0]
        if len({r["layers"] for r in rs}) < 2:
            continue
        full = rs[0]["slice_of"]

        def line(ys):
            # a stage whose seconds fall with depth (noise around a fixed cost: loading, compiling) is
            # taken as fixed at its largest measurement rather than extrapolated below zero
            b, mx, my = lsq([r["layers"] for r in rs], ys)
            if b < 0:
                return {"per_layer": 0.0, "fixed": round(max(ys), 2), "at_full_depth": round(max(ys), 1)}
            return {"per_layer": round(b, 3), "fixed": round(my - b * mx, 2), "at_full_depth": round(my + b * (full - mx), 1)}
        stages = sorted(set.intersection(*[set(r.get("timings_s") or {}) for r in rs]))
        out[size] = {"layers_measured": sorted(r["layers"] for r in rs), "full_layers": full,
                     "params_full": round(rs[0]["params"] + (full - rs[0]["layers"]) * (rs[-1]["params"] - rs[0]["params"])
                                          / max(1, rs[-1]["layers"] - rs[0]["layers"])),
                     "seconds": {st: line([r["timings_s"][st] for r in rs]) for st in stages},
                     "diagnose_parts": {st: line([r["diagnose_timings_s"][st] for r in rs]) for st in sorted(
                         set.intersection(*[set(r.get("diagnose_timings_s") or {}) for r in rs])) if st != "sensitivity: passes"},
                     "peak_host_gb": line([r.get("peak_host_gb_run") or 0 for r in rs]),
                     "peak_gpu_gb": line([((r.get("memory") or {}).get("device_peak_mb") or 0) / 1024 for r in rs])}
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
