"""AutoRound's tuning (``quantfix.tune.tune``) with the heap frozen (``tune.frozen_heap``, the default) and without,
on the demo model: the tuning's seconds and its garbage collections (how many, how long). AutoRound calls
``gc.collect()`` about four times per block; unfrozen, each walks every object of the process.

Each variant runs in its own process, alternating (frozen, plain, frozen, plain, ...). A random mixed plan of W3/W4
in groups of 32/64 over the first ``--layers`` decoder layers, ``--iters`` iterations per block on ``--samples`` x
``--seq-len`` random tokens: small, so that the per-block costs show (on a GPU the tuning is launch-bound).

    python scripts/bench_tune_gc.py --runs 2 --out benchmarks/tune_gc_cpu.json
    python scripts/bench_tune_gc.py --device cuda --dtype bfloat16 --iters 100 --seq-len 512 --samples 32   # a GPU row's shape
    python scripts/bench_tune_gc.py --device cuda --dtype bfloat16 --iters 100 --seq-len 512 --samples 32 --alg-ext \
        --variants frozen torch-topk math-sdpa --runs 2     # is the tuning repeatable (the same weights' hash each run)?

Each row gives a hash of the tuned weights: runs of one variant with different hashes mean the tuning is not
repeatable. Two suspects on CUDA: the algorithm extension's outlier loss (its first module is W3 here, so the loss
leaves the largest 0.1% of each block's output errors out, picked by a top-k where hundreds of bfloat16 errors tie:
``torch-topk`` picks them as torch does, the default ``tune.stable_topk`` by index), and attention's fused backward
kernels (``math-sdpa``). The demo's 3.5 plan tuned on an H100 in four runs gave KLD 0.2946-0.3201; AutoScheme's
tuning, without the extension, 0.30768 in twelve runs.

Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r'''
import contextlib, gc, hashlib, json, random, sys, time, torch
from quantfix import source, tune
from quantfix.cache import cache_dir
from quantfix.plan import Plan, Precision
from transformers import AutoModelForCausalLM, AutoTokenizer
a = json.loads(sys.argv[1])
if a["variant"] == "plain":
    tune.frozen_heap = contextlib.nullcontext
if a["variant"] == "torch-topk":  # the outlier loss's top-k as AutoRound calls it (before 2026-12-08)
    tune.stable_outlier_loss = lambda: contextlib.nullcontext(False)
attention = contextlib.nullcontext()
if a["variant"] == "math-sdpa":  # attention's backward in the math kernel (deterministic on CUDA)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    attention = sdpa_kernel([SDPBackend.MATH])
calls, spent, real = [0], [0.0], gc.collect
def timed(*args, **kwargs):
    t = time.perf_counter(); r = real(*args, **kwargs); calls[0] += 1; spent[0] += time.perf_counter() - t; return r
gc.collect = timed
path = source.resolve("demo", cache_dir(), offline=True).path
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, a["dtype"])).to(a["device"])
tok = AutoTokenizer.from_pretrained(path)
model.model.layers = model.model.layers[: a["layers"]]
model.config.num_hidden_layers = a["layers"]
rng = random.Random(0)
shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) and ".layers." in n}
plan = Plan({n: Precision(rng.choice([3, 4]), rng.choice([32, 64]), True, "gptq_imatrix") for n in shapes}, shapes)
first = next(iter(shapes))  # AutoRound's scheme is the first module's width: below 4 bits, the extension's outlier loss
plan = plan.with_changes({first: Precision(3, 64, True, "gptq_imatrix")})
samples = torch.randint(100, 20000, (a["samples"], a["seq_len"]), generator=torch.Generator().manual_seed(0))
settings = tune.TuneSettings(iters=a["iters"], batch_size=min(8, a["samples"]), alg_ext=a["alg_ext"])
t = time.perf_counter()
with attention:
    out = tune.tune(model, tok, tune.tuned_plan(plan), samples, torch.float16, settings)
secs = round(time.perf_counter() - t, 2)
h = hashlib.sha256()
for n in sorted(out):
    for x in out[n]:
        h.update(x.float().numpy().tobytes())
print(json.dumps({"variant": a["variant"], "tune_s": secs, "gc_calls": calls[0], "gc_s": round(spent[0], 2),
                  "objects": len(gc.get_objects()), "modules": len(out), "weights_sha": h.hexdigest()[:16]}))
'''


def run_one(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{args['variant']} run failed (exit {proc.returncode}): {proc.stderr[-800:]}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2, help="runs of each variant")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="the model's (bfloat16 as the GPU rows)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--alg-ext", action="store_true", help="AutoRound's algorithm extension (as loop.tune_alg_ext)")
    ap.add_argument("--variants", nargs="+", default=["frozen", "plain"],
                    choices=["frozen", "plain", "math-sdpa", "torch-topk"],
                    help="math-sdpa: frozen, with attention in the math kernel (is the tuning repeatable on CUDA?); "
                         "torch-topk: frozen, the extension's outlier loss picking its outliers with torch.topk, not "
                         "tune.stable_topk (ties at the k-th error picked as torch's kernel picks them)")
    ap.add_argument("--out", default="benchmarks/tune_gc.json")
    a = ap.parse_args()
    base = dict(device=a.device, dtype=a.dtype, layers=a.layers, iters=a.iters, samples=a.samples, seq_len=a.seq_len, alg_ext=a.alg_ext)
    rows = []
    for i in range(a.runs):
        for variant in a.variants:
            rows.append(run_one(dict(base, variant=variant)))
            print(f"run {i} {variant}: {rows[-1]}", flush=True)
    print("| variant | tuning s | gc.collect calls | their s | objects | tuned weights (sha256) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['tune_s']} | {r['gc_calls']} | {r['gc_s']} | {r['objects']} | {r['weights_sha']} |")
    med = {v: round(statistics.median(r["tune_s"] for r in rows if r["variant"] == v), 2) for v in a.variants}
    same = {v: len({r["weights_sha"] for r in rows if r["variant"] == v}) == 1 for v in a.variants}
    print("median tuning s: " + ", ".join(f"{v} {med[v]}" for v in a.variants))
    print("the same tuned weights in every run: " + ", ".join(f"{v} {same[v]}" for v in a.variants))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "settings": base, "rows": rows,
                                       "median_tune_s": med, "repeatable": same}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
