"""GPU benchmark: quantfix's evaluation vs a bare forward pass (the floor), GPTQ per layer vs
llm-compressor, sensitivity wall time, on the demo model and a larger random-weight Llama.

    python scripts/bench_gpu.py [--big-layers 16] [--out benchmarks/gpu.json]

Speed does not depend on the weights, so the large model is a random Llama built on the card.
Prints a table and writes JSON (with the card's name).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantfix import data as data_mod
from quantfix import evaluate as ev
from quantfix import model as model_mod
from quantfix.diagnose.sensitivity import fast
from quantfix.quantize import fake
from quantfix.quantize.calib import collect


def timed(fn, device, repeats=3):
    """Median wall time of fn() over repeats, after one warm-up, synchronized."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_model(name, model, windows, samples, device, bs, with_llmc=False, path=None, tok=None):
    model.eval()
    n_tok = windows.numel()
    res = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "eval_tokens": n_tok, "batch_size": bs}

    @torch.no_grad()
    def bare():
        for ids in windows.split(bs):
            model(input_ids=ids.to(device), use_cache=False).logits

    t_bare = timed(bare, device)
    ref = ev.reference(model, windows, bs, 256, 0, progress=False)
    t_eval = timed(lambda: ev.evaluate(model, windows, ref, bs, progress=False), device)
    res.update(bare_forward_tok_s=round(n_tok / t_bare), quantfix_eval_tok_s=round(n_tok / t_eval),
               eval_overhead_pct=round(100 * (t_eval / t_bare - 1), 1))
    torch.cuda.reset_peak_memory_stats(device)
    names = [n for n, m in model.named_modules() if n.endswith("proj") and ".layers." in n]
    t = time.perf_counter()
    stats = collect(model, samples, names, bs, progress=False)
    torch.cuda.synchronize(device)
    res["calibration_stats_s"] = round(time.perf_counter() - t, 2)
    # GPTQ on one layer's modules (the simulated quantizer the search uses)
    layer0 = [n for n in names if ".layers.1." in n]
    mods = dict(model.named_modules())

    def gptq_layer():
        for n in layer0:
            fake.gptq(mods[n].weight.detach().float(), stats.of(n).hessian.to(device), 4, 64, True)

    res["quantfix_gptq_s_per_layer"] = round(timed(gptq_layer, device, 2), 3)
    fw = {n: mods[n].weight.detach().cpu().clone() for n in names}
    with torch.no_grad():
        for n in names:
            mods[n].weight.copy_(fake.rtn(mods[n].weight, 4, 64, True))
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    qd = {n: mods[n].weight.detach().cpu().clone() for n in names}
    fast(model, windows[:2], ref, fw, qd, batch_size=2, progress=False)
    torch.cuda.synchronize(device)
    res["sensitivity_fast_s"] = round(time.perf_counter() - t, 2)
    res["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    if with_llmc:
        res["llmcompressor_gptq_s_per_layer"] = llmc_gptq_per_layer(path, tok, samples, device)
    return res


def llmc_gptq_per_layer(path, tok, samples, device):
    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    ds = datasets.Dataset.from_dict({"input_ids": samples.tolist(),
                                     "attention_mask": [[1] * samples.shape[1]] * samples.shape[0]})
    recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups={"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                           "group_size": 64}}})
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=samples.shape[0],
            max_seq_length=samples.shape[1], processor=tok, shuffle_calibration_samples=False)
    torch.cuda.synchronize(device)
    n_layers = model.config.num_hidden_layers
    del model
    return round((time.perf_counter() - t) / n_layers, 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--big-layers", type=int, default=16)
    ap.add_argument("--big-hidden", type=int, default=2048)
    ap.add_argument("--out", default="benchmarks/gpu.json")
    a = ap.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": []}
    resolved = model_mod.resolve("demo", model_mod.cache_dir())
    model, tok = model_mod.load(resolved, torch.bfloat16, device)
    dd = str(data_mod.default_data_dir())
    windows = data_mod.eval_windows("wikitext2", dd, tok, a.windows, a.seq_len)
    samples = data_mod.calibration_samples(["c4"], dd, tok, 32, a.seq_len, 0)
    out["results"].append(bench_model("SmolLM2-135M (demo)", model, windows, samples, device, 16, True,
                                      resolved.path, tok))
    print(json.dumps(out["results"][-1]), flush=True)
    del model
    torch.cuda.empty_cache()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=a.big_hidden, intermediate_size=int(a.big_hidden * 2.75) // 64 * 64,
                      num_hidden_layers=a.big_layers, num_attention_heads=a.big_hidden // 64, num_key_value_heads=8,
                      vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        big = LlamaForCausalLM(cfg).to(torch.bfloat16)
    big.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    bw = torch.randint(0, 32000, (a.windows, a.seq_len), generator=g)
    bsamp = torch.randint(0, 32000, (32, a.seq_len), generator=g)
    out["results"].append(bench_model(f"random Llama {a.big_layers}x{a.big_hidden}", big, bw, bsamp, device, 16))
    print(json.dumps(out["results"][-1]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"\n{out['gpu']}")
    print(f"{'model':<26} {'params M':>8} {'bare tok/s':>11} {'eval tok/s':>11} {'overhead':>8} "
          f"{'GPTQ s/layer':>12} {'llmc s/layer':>12} {'sens s':>7}")
    for r in out["results"]:
        print(f"{r['model']:<26} {r['params_m']:>8} {r['bare_forward_tok_s']:>11} {r['quantfix_eval_tok_s']:>11} "
              f"{r['eval_overhead_pct']:>7}% {r['quantfix_gptq_s_per_layer']:>12} "
              f"{r.get('llmcompressor_gptq_s_per_layer', '-'):>12} {r['sensitivity_fast_s']:>7}")


if __name__ == "__main__":
    main()
