"""Fast (Fisher, one pass) vs exact (restore-one-at-a-time) sensitivity on the demo model.

    python scripts/bench_sensitivity.py [--windows 16] [--fast-windows 1 2 4] [--methods fast taylor fisher]
    python scripts/bench_sensitivity.py --methods taylor fisher --fast-windows 4 8 --pass-dtype bfloat16 \
        --exact-from benchmarks/sensitivity_cpu.json --out benchmarks/sensitivity_bf16_cpu.json

Prints a table (wall time, Spearman rank correlation of the layer ranking with exact, top-5
overlap) and writes JSON. Every method diagnoses the same plan (W4 g64 RTN by default) against
the same float reference; exact uses all eval windows, the others --fast-windows of them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from quantfix import data as data_mod
from quantfix import evaluate as ev
from quantfix import cache as cache_mod, loading as loading_mod, source as source_mod
from quantfix.diagnose import sensitivity as sens
from quantfix.planner import initial_plan
from quantfix.plan import layer_index
from quantfix.bank import WeightBank
from quantfix.config import QuantConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--fast-windows", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--label-samples", type=int, nargs="+", default=[2])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--algorithm", default="rtn")
    ap.add_argument("--methods", nargs="+", default=["fast", "fisher"])
    ap.add_argument("--pass-dtype", default="model", choices=["model", "bfloat16"],
                    help="the one-pass methods under autocast to bfloat16 (diagnose.sensitivity.dtype)")
    ap.add_argument("--exact-from", default=None,
                    help="a JSON this script wrote for the same model, plan and windows: its exact scores, not re-measured")
    ap.add_argument("--out", default="benchmarks/sensitivity.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    cache = cache_mod.cache_dir()
    resolved = source_mod.resolve(a.model, cache)
    device = loading_mod.resolve_device(a.device)
    dtype = loading_mod.resolve_dtype(a.dtype, device)
    model, tok = loading_mod.load(resolved, dtype, device)
    windows = data_mod.eval_windows("wikitext2", str(data_mod.default_data_dir()), tok, a.windows, a.seq_len)
    q = QuantConfig(algorithm=a.algorithm, bits=a.bits, group_size=a.group_size)
    plan, _ = initial_plan(model, q, {})
    bank = WeightBank(model, list(plan.modules))
    ref = ev.reference(model, windows, 4, 256, 0, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()

    # exact: one evaluation per layer and per module type, on all windows
    def kld_with_restored(restored):
        bank.apply(plan.with_changes({n: plan.modules[n].__class__() for n in restored}), progress=False)
        return ev.evaluate(model, windows, ref, 4, progress=False).kld_mean

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if a.exact_from:  # the stored exact measurement (its plan and windows must be these)
        stored = json.loads(Path(a.exact_from).read_text())
        same = stored["plan"].replace(" ", "") == plan.summary_str().replace(" ", "")
        if not same or stored["windows_exact"] != a.windows or stored["seq_len"] != a.seq_len:
            raise SystemExit(f"{a.exact_from} measured another plan or other windows")
        ex, t_exact = sens.Sensitivity.from_dict(stored["exact"]), stored["exact_seconds"]
    else:
        sync()
        t = time.perf_counter()
        ex = sens.exact(kld_with_restored, list(plan.modules))
        sync()
        t_exact = time.perf_counter() - t
    bank.restore()
    pass_dtype = sens.pass_dtype(a.pass_dtype, model)
    # the fast methods, each on a prefix of the eval windows
    qweights = bank.quantized_weights(plan)
    fweights = {n: bank.originals[n] for n in plan.modules}
    layers = sorted(ex.layers)
    variants = []

    def run_variant(method, fw, ls=0):
        bank.apply(plan, progress=False) if method != "fisher" else bank.restore()
        sync()
        t = time.perf_counter()
        if method == "fast":
            fa = sens.fast(model, windows[:fw], ref, fweights, qweights,
                           sens.PassSettings(batch_size=2, progress=False, dtype=pass_dtype))
            bank.current.clear()
        elif method == "taylor":
            fa = sens.taylor(model, windows[:fw], ref, fweights, None,
                             sens.PassSettings(batch_size=2, progress=False, dtype=pass_dtype))
        else:
            fa = sens.fisher(model, windows[:fw], qweights, None,
                            sens.PassSettings(batch_size=2, label_samples=ls, progress=False, dtype=pass_dtype))
        sync()
        t_fast = time.perf_counter() - t
        rho = spearmanr([ex.layers[i] for i in layers], [fa.layers[i] for i in layers]).statistic
        rho_t = spearmanr([ex.types[k] for k in ex.types], [fa.types[k] for k in ex.types]).statistic
        # the layer scores as the sum of the layer's module scores (no rerun of the layers)
        summed = {i: sum(v for n, v in fa.modules.items() if layer_index(n) == i) for i in layers}
        rho_sum = spearmanr([ex.layers[i] for i in layers], [summed[i] for i in layers]).statistic \
            if fa.modules else float("nan")
        v = {"method": method, "fast_windows": fw, "label_samples": ls, "fast_seconds": round(t_fast, 2),
             "speedup": round(t_exact / t_fast, 1), "spearman_layers": round(float(rho), 3),
             "spearman_types": round(float(rho_t), 3),
             "spearman_layers_module_sum": round(float(rho_sum), 3),
             "top5_overlap": len(set(ex.ranked_layers()[:5]) & set(fa.ranked_layers()[:5])),
             "fast_top5": fa.ranked_layers()[:5], "layers": {str(k): v for k, v in fa.layers.items()}}
        variants.append(v)
        print(f"{method:>7} {fw:>7} {ls:>6} {v['fast_seconds']:>8.2f} {v['speedup']:>7.1f}x "
              f"{v['spearman_layers']:>8.3f} {v['spearman_layers_module_sum']:>8.3f} {v['spearman_types']:>6.3f} "
              f"{v['top5_overlap']:>4}/5", flush=True)

    print(f"\nexact: {t_exact:.1f} s, {len(ex.layers) + len(ex.types) + 1} evaluations of {a.windows}x{a.seq_len} "
          f"tokens, top5 {ex.ranked_layers()[:5]}")
    print(f"{'method':>7} {'windows':>7} {'labels':>6} {'seconds':>8} {'speedup':>8} {'spearman':>8} {'mod-sum':>8} {'types':>6} {'top5':>5}")
    for fw in a.fast_windows:
        for method in a.methods:
            if method == "fisher":
                for ls in a.label_samples:
                    run_variant(method, fw, ls)
            else:
                run_variant(method, fw)
    res = {"model": a.model, "plan": plan.summary_str(), "device": str(device), "dtype": str(dtype),
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "threads": torch.get_num_threads(), "exact_seconds": round(t_exact, 2), "exact_from": a.exact_from,
           "pass_dtype": str(pass_dtype or dtype),
           "exact_evaluations": len(ex.layers) + len(ex.types) + 1, "exact_top5": ex.ranked_layers()[:5],
           "exact": ex.to_dict(), "windows_exact": a.windows, "seq_len": a.seq_len, "variants": variants}
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
