"""GPU benchmark: quantfix's evaluation vs a bare forward pass (the floor), GPTQ per layer vs
llm-compressor, sensitivity wall time, on the demo model and a larger random-weight Llama.

    python scripts/bench_gpu.py [--big-layers 24 --big-hidden 3072] [--split 4GiB] [--out benchmarks/gpu.json]

Overhead = quantfix's evaluation of a W4 model (NLL, top-k KLD, top-1 per token) over the bare forward
pass of the same batches; eager (the default) and compiled (eval.compile=true). With --split, the random model
is also loaded with device_map=auto and a per-GPU cap, so that it spreads over every GPU; its W4 KLD
must equal the one-GPU run's.

Speed does not depend on the weights, so the large model is a random Llama built on the card.
Prints a table and writes JSON (with the card's name).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from quantfix import data as data_mod
from quantfix import evaluate as ev
from quantfix import cache as cache_mod, loading as loading_mod, source as source_mod
from quantfix.diagnose.sensitivity import PassSettings, fast
from quantfix.plan import Plan, Precision
from quantfix.quantize import fake
from quantfix.bank import WeightBank
from quantfix.calib import collect


def timed(fn, device, repeats=3):
    """Median wall time of fn() over repeats, after one warm-up, synchronized."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eval_variants(model, windows, ref, bs, device, res):
    """quantfix's evaluation in eager mode (the default) and compiled (eval.compile), against the bare
    forward pass of the same batches; the first compiled call's extra time is the compile cost."""
    @torch.no_grad()
    def bare():
        for ids in windows.split(bs):
            model(input_ids=ids.to(device), use_cache=False).logits

    n_tok = windows.numel()
    t_bare = timed(bare, device)
    res.update(bare_forward_tok_s=round(n_tok / t_bare))
    eager, compiled = ev.Evaluator(ref), ev.Evaluator(ref, compile=True)
    m_eager = eager(model, windows, bs, progress=False)
    t_eager = timed(lambda: eager(model, windows, bs, progress=False), device)
    res.update(eager_eval_tok_s=round(n_tok / t_eager), eager_overhead_pct=round(100 * (t_eager / t_bare - 1), 1))
    sync(device)
    t = time.perf_counter()
    m_comp = compiled(model, windows, bs, progress=False)
    sync(device)
    first = time.perf_counter() - t
    t_comp = timed(lambda: compiled(model, windows, bs, progress=False), device)
    res.update(quantfix_eval_tok_s=round(n_tok / t_comp), eval_overhead_pct=round(100 * (t_comp / t_bare - 1), 1),
               compiled=compiled._fn is not None and not compiled._eager, compile_s=round(first - t_comp, 2),
               w4_metrics=m_comp.to_dict(), eager_vs_compiled_max_rel_diff=max(
                   abs(a - b) / max(abs(a), 1e-12) for a, b in
                   ((m_eager.nll, m_comp.nll), (m_eager.kld_mean, m_comp.kld_mean), (m_eager.top1, m_comp.top1))))


def bench_model(name, model, windows, samples, device, bs, with_llmc=False, path=None, tok=None):
    model.eval()
    res = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "eval_tokens": windows.numel(), "batch_size": bs}
    names = [n for n, m in model.named_modules() if n.endswith("proj") and ".layers." in n]
    ref = ev.reference(model, windows, bs, 256, 0, progress=False)
    # evaluation of a quantized model (W4g64 RTN applied), the loop's inner step
    bank = WeightBank(model, names)
    plan = Plan({n: Precision(4, 64, True, "rtn") for n in names},
                {n: tuple(bank.modules[n].weight.shape) for n in names})
    bank.apply(plan, progress=False)
    eval_variants(model, windows, ref, bs, device, res)
    bank.restore()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    stats = collect(model, samples, names, bs, progress=False)
    sync(device)
    res["calibration_stats_s"] = round(time.perf_counter() - t, 2)
    # GPTQ on one layer's seven modules: the bank runs one sweep per shared input (q/k/v, gate/up)
    layer1 = [n for n in names if ".layers.1." in n]
    mods = dict(model.named_modules())
    gplan = Plan({n: Precision(4, 64, True, "gptq") for n in layer1}, {n: tuple(mods[n].weight.shape) for n in layer1})
    res["quantfix_gptq_s_per_layer"] = round(timed(
        lambda: WeightBank(model, layer1, stats).quantized_weights(gplan), device, 2), 3)
    res["quantfix_gptq_s_per_layer_one_module_at_a_time"] = round(timed(lambda: [
        fake.gptq(mods[n].weight.detach().float(), stats.of(n).hessian.to(device), 4, 64, True) for n in layer1],
        device, 2), 3)
    # sensitivity as the loop's diagnosis runs it: fast (Taylor on 8 windows; no option scoring)
    fw = {n: mods[n].weight.detach().cpu().clone() for n in names}
    qd = {n: fake.rtn(w.float(), 4, 64, True) for n, w in fw.items()}
    bank.apply(plan, progress=False)
    sync(device)
    t = time.perf_counter()
    fast(model, windows[:8], ref, fw, qd, PassSettings(batch_size=bs, progress=False))
    sync(device)
    res["sensitivity_fast_s"] = round(time.perf_counter() - t, 2)
    bank.current.clear()  # fast() leaves the float weights live
    if device.type == "cuda":
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


def random_llama(layers, hidden, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=8,
                      vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--big-layers", type=int, default=24)
    ap.add_argument("--big-hidden", type=int, default=3072)
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--split", default="", help="multi-GPU: also load the random model with device_map=auto, "
                    "each GPU capped at this size (e.g. 3GiB) so that it spreads over all of them")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/gpu.json")
    a = ap.parse_args()
    device = torch.device(a.device)
    out = {"gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "gpus": torch.cuda.device_count(), "torch": torch.__version__, "results": []}

    def keep(r):
        out["results"].append(r)
        print(json.dumps(r), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2))

    bs = 16
    if not a.no_demo:
        resolved = source_mod.resolve("demo", cache_mod.cache_dir())
        model, tok = loading_mod.load(resolved, torch.bfloat16, device)
        dd = str(data_mod.default_data_dir())
        windows = data_mod.eval_windows("wikitext2", dd, tok, a.windows, a.seq_len)
        samples = data_mod.calibration_samples(["c4"], dd, tok, 32, a.seq_len, 0)
        keep(bench_model("SmolLM2-135M (demo)", model, windows, samples, device, bs, device.type == "cuda",
                         resolved.path, tok))
        del model
    g = torch.Generator().manual_seed(0)
    bw = torch.randint(0, 32000, (a.windows, a.seq_len), generator=g)
    bsamp = torch.randint(0, 32000, (32, a.seq_len), generator=g)
    big = random_llama(a.big_layers, a.big_hidden, device)
    name = f"random Llama {a.big_layers}x{a.big_hidden}"
    keep(bench_model(name, big, bw, bsamp, device, bs))
    if a.split:
        import tempfile

        from transformers import AutoModelForCausalLM

        tmp = tempfile.mkdtemp(prefix="qf-big-")
        big.save_pretrained(tmp)
        del big
        torch.cuda.empty_cache()
        caps = {i: a.split for i in range(torch.cuda.device_count())}
        split = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device_map="auto", max_memory=caps)
        split.requires_grad_(False)
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
        r = bench_model(name + f" split (device_map=auto, {a.split} per GPU)", split, bw, bsamp, device, bs)
        r["placement"] = {str(d): n for d, n in Counter(str(v) for v in split.hf_device_map.values()).items()}
        r["peak_gpu_mb_each"] = [round(torch.cuda.max_memory_allocated(i) / 2 ** 20)
                                 for i in range(torch.cuda.device_count())]
        one = out["results"][-1]["w4_metrics"]
        r["w4_kld_vs_one_gpu"] = [one["kld_mean"], r["w4_metrics"]["kld_mean"]]
        keep(r)
    print(f"\n{out['gpu']} x{out['gpus']}")
    print(f"{'model':<58} {'bare tok/s':>10} {'eager':>8} {'compiled':>8} {'compile s':>9} "
          f"{'GPTQ s/layer':>12} {'per-module':>10} {'llmc':>6} {'sens s':>7}")
    for r in out["results"]:
        print(f"{r['model']:<58} {r['bare_forward_tok_s']:>10} {r['eager_overhead_pct']:>7}% "
              f"{r['eval_overhead_pct']:>7}% {r['compile_s']:>9} {r['quantfix_gptq_s_per_layer']:>12} "
              f"{r['quantfix_gptq_s_per_layer_one_module_at_a_time']:>10} "
              f"{r.get('llmcompressor_gptq_s_per_layer', '-'):>6} {r['sensitivity_fast_s']:>7}")


if __name__ == "__main__":
    main()
