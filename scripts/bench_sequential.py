"""Which Hessians GPTQ should round a plan with: the float model's (what the search simulates: one
calibration pass serves every option of every plan), or the plan's own quantized inputs.

Per plan (uniform GPTQ plans, and a loop's own plan.yaml) the KLD on WikiText-2 of the plan rounded
  - "float": the search's simulation, Hessians of the float model;
  - "layer order": ``quantfix.sequential.requantize`` (loop.sequential_gptq): each layer's Hessians on the
    inputs of the quantized layers before it, the layer itself float while they are collected
    (llm-compressor's sequential pipeline);
  - "within-layer order" (--within): also within a layer, each input's Hessian after the modules that
    produce it are rounded ("true sequential");
  - "stats of a quantized model" (--stats-of): every statistic (Hessians, imatrix) collected once with a
    whole plan applied (W4g64 RTN, or the plan itself), then the usual simulation.
Same calibration (C4 32x512) and evaluation (WikiText-2 16x512) as scripts/bench_repair.py.

    python scripts/bench_sequential.py --model demo --uniform W4g64:gptq_imatrix W3g64:gptq_imatrix W4g64:gptq \\
        W3g64:gptq --plans /tmp/b40/plan.yaml --within --stats-of --out benchmarks/sequential_cpu_demo.json

Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantfix import cache as cache_mod, calib, data as data_mod, evaluate as ev, export as exp
from quantfix import loading as loading_mod, sequential, source as source_mod, weights
from quantfix.bank import WeightBank
from quantfix.layerwise import capture_layer0_inputs, iterate_layers, layer_output
from quantfix.plan import Plan, Precision
from quantfix.quantize import algorithms
from quantfix.quantize.stats import InputStats
from quantfix.weights import set_weight


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--uniform", nargs="*", default=[], help="WIDTH:ALGORITHM, e.g. W4g64:gptq_imatrix")
    ap.add_argument("--plans", nargs="*", default=[], help="plan.yaml files of loop runs on the same model")
    ap.add_argument("--within", action="store_true", help="also the within-layer order")
    ap.add_argument("--stats-of", action="store_true", help="also the statistics of a quantized model")
    ap.add_argument("--out", default="benchmarks/sequential.json")
    a = ap.parse_args()
    torch.set_flush_denormal(True)  # as a CPU run of the loop does
    ctx = setup(a.model, torch.device(a.device))
    result = {"model": a.model, "device": a.device, "eval": "wikitext2 16x512", "calibration": "c4 32x512", "rows": []}
    rows = result["rows"]
    plans = []
    for spec in a.uniform:
        width, alg = spec.split(":")
        bits, group = int(width[1:].split("g")[0]), int(width.split("g")[1])
        plans.append((f"uniform {width} {alg}",
                      Plan(modules={n: Precision(bits, group, True, alg) for n in ctx["names"]}, shapes=ctx["shapes"])))
    plans += [(f"loop plan {path}", Plan.load(path)) for path in a.plans]
    for label, plan in plans:
        rows.append(measure(label, plan, ctx, a))
        Path(a.out).write_text(json.dumps(result, indent=1))  # after every row: a run cut short keeps them
    print("| plan | avg bits | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    for r in rows:
        print(f"| {r['plan']} | {r['avg_bits']:.3f} | " + " | ".join(
            f"{r[v]:.4f} ({r[v + ' s']:.0f} s)" if v in r else "-" for v in VARIANTS) + " |")


VARIANTS = ("float", "layer order", "within-layer order", "stats of W4g64 RTN", "stats of the plan itself")


def setup(model_name: str, device: torch.device) -> dict:
    """The model (parameters rounded to the export dtype, as the loop's trials see them), the data, the
    float reference, the float statistics and a bank on them."""
    resolved = source_mod.resolve(model_name, cache_mod.cache_dir())
    model, tok = loading_mod.load(resolved, torch.float32 if device.type == "cpu" else torch.bfloat16, device)
    dd = str(data_mod.default_data_dir())
    windows = data_mod.eval_windows("wikitext2", dd, tok, 16, 512)
    samples = data_mod.calibration_samples(["c4"], dd, tok, 32, 512, 0)
    ref = ev.reference(model, windows, 4, 1024, 8192, progress=False)
    dtype, _ = exp.choose_dtype(model, next(model.parameters()).dtype, "auto")
    if dtype != next(model.parameters()).dtype:
        weights.round_params(model, dtype)
    mods = dict(model.named_modules())
    names = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    stats = calib.collect(model, samples, names, 4, progress=False)
    return dict(model=model, windows=windows, samples=samples, ref=ref, dtype=dtype, names=names, stats=stats,
                shapes={n: tuple(mods[n].weight.shape) for n in names},
                bank=WeightBank(model, names, stats, 0.01, 128, sim_dtype=dtype))


def kld(bank: WeightBank, plan: Plan, ctx: dict) -> float:
    bank.apply(plan, progress=False)
    m = ev.evaluate(ctx["model"], ctx["windows"], ctx["ref"], 4, progress=False)
    bank.restore()
    return m.kld_mean


def measure(label: str, plan: Plan, ctx: dict, a) -> dict:
    bank, row = ctx["bank"], {"plan": label, "avg_bits": plan.avg_bits}
    t = time.perf_counter()
    row["float"], row["float s"] = kld(bank, plan, ctx), time.perf_counter() - t
    print(label, "float", row["float"], flush=True)
    served = sequential.sequential_plan(plan)
    for variant, rerounds in (("layer order", _layer_order), ("within-layer order", _within_layer)):
        if variant == "within-layer order" and not a.within:
            continue
        t = time.perf_counter()
        out = rerounds(bank, plan, ctx)
        bank.use_tuned(served, {n: w for n, (w, _, _) in out.items()}, {n: (s, z) for n, (_, s, z) in out.items()})
        row[variant], row[variant + " s"] = kld(bank, served, ctx), time.perf_counter() - t
        print(label, variant, row[variant], flush=True)
    if a.stats_of:
        rtn = plan.with_changes({n: Precision(4, 64, True, "rtn") for n in plan.modules}, note="W4g64 RTN")
        for variant, under in (("stats of W4g64 RTN", rtn), ("stats of the plan itself", plan)):
            t = time.perf_counter()
            bank.apply(under, progress=False)
            stats = calib.collect(ctx["model"], ctx["samples"], list(plan.modules), 4, progress=False)
            bank.restore()
            other = WeightBank(ctx["model"], list(plan.modules), stats, 0.01, 128, sim_dtype=ctx["dtype"])
            row[variant], row[variant + " s"] = kld(other, plan, ctx), time.perf_counter() - t
            print(label, variant, row[variant], flush=True)
    return row


def _layer_order(bank: WeightBank, plan: Plan, ctx: dict) -> dict:
    return sequential.requantize(bank, plan, ctx["samples"], 4, progress=False)


@torch.no_grad()
def _within_layer(bank: WeightBank, plan: Plan, ctx: dict) -> dict:
    """Each input's Hessian collected after the modules before it in the layer are rounded (q/k/v, then
    o_proj on their output, then gate/up, then down_proj), the layer run once per input."""
    todo = {n: p for n, p in plan.modules.items() if sequential.requantizable(p)}
    stats, owner, out = ctx["stats"], {id(m): n for n, m in bank.modules.items()}, {}
    bank.restore()
    for _, layer, layer_in in iterate_layers(bank.model, capture_layer0_inputs(bank.model, list(ctx["samples"].split(4)))):
        mods = [owner[id(m)] for m in layer.modules() if id(m) in owner]
        for key in dict.fromkeys(stats.module_input[n] for n in mods):
            members = [n for n in mods if stats.module_input[n] == key]
            mine = [n for n in members if n in todo]
            if mine:
                h = _input_hessian(bank.modules[mine[0]], layer, layer_in)
                for p in dict.fromkeys(todo[n] for n in mine):
                    same = [n for n in mine if todo[n] == p]
                    qps = [bank.qparams(n, p) for n in same]
                    qs = algorithms.gptq_options([bank.original(n) for n in same], [p],
                                                 {p: [bank.inputs_with(n, p, h) for n in same]})[p]
                    for n, q, (s, z) in zip(same, qs, qps):
                        out[n] = (q.to(bank.originals[n].dtype).cpu(), s.cpu(), z.cpu())
                        set_weight(bank.modules[n], out[n][0])
            for n in members:
                if n not in out and not plan.modules[n].is_float:
                    set_weight(bank.modules[n], bank.simulate(n, plan.modules[n]))
    for n in bank.modules:
        set_weight(bank.modules[n], bank.originals[n])
    return out


def _input_hessian(module, layer, layer_in) -> InputStats:
    acc = {"h": None, "n": 0}

    def hook(_m, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        acc["h"] = x.T @ x if acc["h"] is None else acc["h"].addmm_(x.T, x)
        acc["n"] += x.shape[0]
    handle = module.register_forward_pre_hook(hook)
    try:
        for hidden, kw in zip(layer_in.hidden, layer_in.kwargs):
            layer_output(layer, hidden, kw)
    finally:
        handle.remove()
    return InputStats(acc["h"], torch.zeros(1), torch.zeros(1), acc["n"])


if __name__ == "__main__":
    main()
