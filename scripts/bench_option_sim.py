"""The option simulation (the budget ladder's imatrix and GPTQ options of every module, what the diagnosis
scores) on a random-weight model of the demo's shape: the imatrix scale searches one per module and width,
against one batched search per width (``scales.search_imatrix_many``, the accelerator path since 58a4a33).
Both in one process, alternating, each on a fresh bank; the simulated weights are compared bit for bit.
``--compare gptq``: the GPTQ options one engine call per input and precision, against one batched call per
stack shape and precision (``WeightBank._sweep_together``, the accelerator path), scales batched in both.

    python scripts/bench_option_sim.py [--device cuda] [--layers 30] [--calib 32] [--out benchmarks/option_sim.json]
    python scripts/bench_option_sim.py --device cpu --layers 2 --calib 4 --accelerator-path --out /tmp/o.json  # a smoke run
    python scripts/bench_option_sim.py --compare gptq --out benchmarks/option_sim_gptq.json
    python scripts/bench_option_sim.py --compare gptq --time-calls  # + each GPTQ call's seconds, engine's share

``--time-calls`` synchronizes around every call into the GPTQ engine's paths (``algorithms.gptq_batch`` and
``_gptq_sweep``: CUDA's; the CPU sweeps its GPTQ options in quantfix's own ``gptq.sweep``, not timed) and writes,
per run, their count, seconds, the engine's ``quantize_weight`` share, the first and the median call: the first run
against the second tells compilation from work.

Prints a table and writes JSON (seconds per run, how many searches each made, whether the weights agree).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantfix import bank as bank_module
from quantfix.bank import WeightBank
from quantfix.calib import collect
from quantfix.plan import Precision
from quantfix.quantize import algorithms, scales

# the budget ladder's integer rungs (bits, group, symmetric) in both roundings the loop simulates
RUNGS = [(2, 64, False), (3, 64, False), (3, 32, False), (4, 64, True), (4, 32, True), (5, 64, True), (6, 64, True),
         (8, 0, True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--calib", type=int, default=32, help="calibration windows of 512 random tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--accelerator-path", action="store_true",
                    help="on the CPU too, take the bank's accelerator path (jobs in turn, scales searched first, "
                         "CUDA's GPTQ batches)")
    ap.add_argument("--compare", choices=("scales", "gptq"), default="scales")
    ap.add_argument("--time-calls", action="store_true", help="each GPTQ call's seconds and the engine's share")
    ap.add_argument("--out", default="benchmarks/option_sim.json")
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device(a.device)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=a.layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if n.endswith("proj") and ".layers." in n]
    ids = torch.randint(0, cfg.vocab_size, (a.calib, 512), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    stats = collect(model, ids, names, batch_size=4, progress=False)
    calib_s = time.perf_counter() - t
    options = {n: {f"{alg}-{b}/{g}{'s' if s else 'a'}": Precision(b, g, s, alg) for b, g, s in RUNGS
                   for alg in ("imatrix", "gptq_imatrix")} for n in names}
    modes = ("one per module", "batched") if a.compare == "scales" else ("GPTQ per input", "GPTQ batched")
    counts = {m: 0 for m in modes}
    real_one, real_many = scales.search_qparams, scales.search_imatrix_many

    def one(*args, **kw):
        counts[mode] += 1
        return real_one(*args, **kw)

    def many(*args, **kw):
        counts[mode] += 1
        return real_many(*args, **kw)
    scales.search_qparams, scales.search_imatrix_many = one, many
    calls: list = []
    if a.time_calls:
        _time_gptq_calls(calls, dev)
    seconds: dict = {m: [] for m in modes}
    kept: dict = {}
    together, sweep = WeightBank._search_scales_together, WeightBank._sweep_together
    if a.accelerator_path:
        WeightBank._on_cpu = lambda self, jobs: False
        bank_module.SWEEP_TOGETHER_ON = (dev.type,)  # CUDA's batched GPTQ too
    for _ in range(a.repeats):
        for mode in modes:
            if a.compare == "scales":
                WeightBank._search_scales_together = together if mode == "batched" else (lambda self, jobs: None)
                WeightBank._sweep_together = lambda self, jobs, out: jobs
            else:
                WeightBank._sweep_together = sweep if mode == "GPTQ batched" else (lambda self, jobs, out: jobs)
            bank = WeightBank(model, names, stats)
            counts[mode] = 0
            calls.append({"mode": mode, "calls": []})
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = bank.simulate_options(options)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds[mode].append(round(time.perf_counter() - t, 2))
            kept[mode] = out
            del bank
    WeightBank._search_scales_together, WeightBank._sweep_together = together, sweep
    same = all(torch.equal(kept[modes[1]][n][k], kept[modes[0]][n][k]) for n in names for k in options[n])
    worst = max(float((kept[modes[1]][n][k].float() - kept[modes[0]][n][k].float()).abs().max())
                for n in names for k in options[n])
    result = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
              "model": f"random Llama {a.layers}x576 (the demo's shape)", "modules": len(names),
              "options_per_module": len(RUNGS) * 2, "calibration_s": round(calib_s, 2), "seconds": seconds,
              "searches_per_run": counts, "same_weights": same,
              "largest_difference": worst, "compare": a.compare}
    if a.time_calls:
        result["gptq_calls"] = [call_summary(run) for run in calls]
        for run in result["gptq_calls"]:
            if run["calls"]:
                print(f"{run['mode']}: {run['calls']} calls, {run['seconds']} s (engine {run['engine_seconds']} s), "
                      f"first {run['first_s']} s, median {run['median_s']} s")
            else:
                print(f"{run['mode']}: no call into the GPTQ engine's paths (the CPU sweeps in gptq.sweep)")
    print(f"| {a.compare} | seconds per run | searches per run |\n|---|---|---|")
    for mode in seconds:
        print(f"| {mode} | {' / '.join(map(str, seconds[mode]))} | {counts[mode]} |")
    print(f"same simulated weights, bit for bit: {same} (largest difference {worst:.3g})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


def call_summary(run: dict) -> dict:
    """One run's timed GPTQ calls ({"mode", "calls": [{"s", "engine_s"}]}) summarized."""
    tot = [c["s"] for c in run["calls"]]
    return {"mode": run["mode"], "calls": len(tot), "seconds": round(sum(tot), 2),
            "engine_seconds": round(sum(c["engine_s"] for c in run["calls"]), 2),
            "first_s": tot[0] if tot else None, "median_s": sorted(tot)[len(tot) // 2] if tot else None,
            "first_five_s": tot[:5]}


def _time_gptq_calls(calls: list, dev: torch.device) -> None:
    """Wrap the GPTQ entry points so that each call's seconds (and the engine's share) land in ``calls[-1]``."""
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, key):
        def run(*args, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*args, **kw)
            sync()
            s = time.perf_counter() - t
            if key == "s":
                calls[-1]["calls"].append({"s": round(s, 4), "engine_s": round(calls[-1].pop("_engine", 0.0), 4)})
            else:
                calls[-1]["_engine"] = calls[-1].get("_engine", 0.0) + s
            return out
        return run
    algorithms.gptq_batch = timed(algorithms.gptq_batch, "s")
    algorithms._gptq_sweep = timed(algorithms._gptq_sweep, "s")
    try:
        from llmcompressor.modifiers.gptq import gptq_quantize
        gptq_quantize.quantize_weight = timed(gptq_quantize.quantize_weight, "engine")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
