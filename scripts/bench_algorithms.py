"""Which algorithm rounds best at each width? Uniform plans on the demo model (simulated; the RTN
family equals the exported checkpoint bit for bit): every (bits, group) rung x every
compressed-tensors algorithm in the registry, KLD / PPL / top-1 on WikiText-2 windows held out from
the calibration set, and the simulation time.

    python scripts/bench_algorithms.py [--rungs 3/64 4/64 4/32 5/64 6/64 8/0] [--windows 16]
        [--algorithms rtn mse imatrix gptq gptq_mse gptq_imatrix awq] [--device auto]
        [--out benchmarks/algorithms_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from quantfix import data as data_mod
from quantfix import evaluate as ev
from quantfix import cache as cache_mod, loading as loading_mod, source as source_mod
from quantfix.config import QuantConfig, parse_rung
from quantfix.planner import initial_plan
from quantfix.plan import Precision, valid_group_size
from quantfix.bank import WeightBank
from quantfix.calib import collect


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rungs", nargs="+", default=["3/64", "4/64", "4/32", "5/64", "6/64", "8/0"])
    ap.add_argument("--algorithms", nargs="+", default=["rtn", "mse", "imatrix", "gptq", "gptq_mse", "gptq_imatrix",
                                                          "awq"])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/algorithms_cpu.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    device = loading_mod.resolve_device(a.device)
    dtype = loading_mod.resolve_dtype("auto", device)
    model, tok = loading_mod.load(source_mod.resolve(a.model, cache_mod.cache_dir()), dtype, device)
    dd = str(data_mod.default_data_dir())
    windows = data_mod.eval_windows("wikitext2", dd, tok, a.windows, a.seq_len)
    samples = data_mod.calibration_samples(["c4"], dd, tok, a.calib, a.seq_len, 0)
    bs = 16 if device.type == "cuda" else 4
    ref = ev.reference(model, windows, bs, 256, 0, progress=False)
    base = ev.baseline_metrics(ref)
    plan0, _ = initial_plan(model, QuantConfig(bits=4, group_size=64), {})
    stats = collect(model, samples, list(plan0.modules), bs, progress=False)
    bank = WeightBank(model, list(plan0.modules), stats)
    evaluator = ev.Evaluator(ref)
    rows = []
    print(f"float PPL {base.ppl:.3f}  ({device}, {dtype})")
    print(f"{'rung':<6} {'algorithm':<13} {'bits':>5} {'KLD':>8} {'PPL':>8} {'top-1':>6} {'sim s':>6}", flush=True)
    for rung in a.rungs:
        bits, group = parse_rung(rung)
        for alg in a.algorithms:
            plan = plan0.with_changes({n: Precision(bits, valid_group_size(group, plan0.shapes[n][1], False, n)[0],
                                                    True, alg) for n in plan0.modules})
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            bank.apply(plan, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            sim_s = time.perf_counter() - t
            m = evaluator(model, windows, bs, progress=False)
            row = {"rung": rung, "algorithm": alg, "avg_bits": round(plan.avg_bits, 4), "kld": round(m.kld_mean, 5),
                   "ppl": round(m.ppl, 3), "top1": round(m.top1, 4), "sim_s": round(sim_s, 1)}
            rows.append(row)
            print(f"{rung:<6} {alg:<13} {plan.avg_bits:>5.2f} {m.kld_mean:>8.4f} {m.ppl:>8.3f} {m.top1:>6.3f} "
                  f"{sim_s:>6.1f}", flush=True)
            bank.restore()
            bank.forget_simulations()  # keep host memory flat: one rung x algorithm at a time
    out = {"model": a.model, "device": str(device), "dtype": str(dtype), "machine": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "eval": f"wikitext2 {a.windows}x{a.seq_len}", "calibration": f"c4 {a.calib}x{a.seq_len}",
           "baseline": base.to_dict(), "rows": rows}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
