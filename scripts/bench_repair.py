"""quantfix vs its peers at the same average bits: the lowest KLD within each budget.

    python scripts/bench_repair.py [--model demo|<gguf or dir>] [--budgets 3 3.5 4 4.5 5] [--starts W3g64 W4g64]
        [--sections uniform quantfix autoscheme0 autoscheme200] [--out benchmarks/repair.json]
    python scripts/bench_repair.py --merge a.json b.json ... --out benchmarks/repair_h200.json   # one table

Rows (every one a real checkpoint: written by its engine, reloaded from disk with plain
transformers, evaluated on WikiText-2 windows held out from the C4 calibration set):
- quantfix: the real loop (`python -m quantfix plan.budget.avg_bits=B`) from each start (W3g64 or
  W4g64 RTN as plan 0), the budget ladder (2- to 8-bit rungs, 2/3 bits asymmetric) in imatrix /
  gptq_imatrix rounding; the lowest measured KLD within B is exported (llm-compressor) and verified.
  "quantfix + AutoRound tuning": the same with loop.tune=autoround (iters=200 on the chosen plan).
- AutoRound AutoScheme with W2A16/W3A16/W4A16/W8A16 options (group 64: the demo's 576-wide modules
  take no 128) at iters=0 and at AutoRound's default tuning (iters=200), exported in llm-compressor
  format. quantfix is compared with a peer at matched bits: when the peer lands below B, quantfix
  is also run at the peer's bits (its sensitivity cached: seconds), and that row is the comparison.
- uniform RTN / GPTQ / AWQ (llm-compressor) at every width some budget admits.
Sections can run in separate processes and be merged with --merge.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

from quantfix import data as data_mod
from quantfix import evaluate as ev
from quantfix import export as exp
from quantfix import cache as cache_mod, loading as loading_mod, source as source_mod
from quantfix import tune as tune_mod
from quantfix.plan import Precision
from quantfix.plotting import figure

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = {"W3g64": (3, 64), "W4g64": (4, 64), "W4g32": (4, 32), "W8": (8, 0)}
STARTS = {"W3g64": (3, 64), "W4g64": (4, 64)}
# row label -> extra overrides (the ladder: the budget default, loop.ladder=null)
LADDERS = {"quantfix": [], "quantfix + AutoRound tuning": ["loop.tune=autoround"]}
AS_OPTIONS = ("W2A16", "W3A16", "W4A16", "W8A16")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.0, 3.5, 4.0, 4.5, 5.0])
    ap.add_argument("--starts", nargs="+", default=list(STARTS), help="plan 0 of the quantfix rows: " + ", ".join(STARTS))
    ap.add_argument("--sections", nargs="+", default=["uniform", "autoscheme0", "autoscheme200", "quantfix"])
    ap.add_argument("--as-options", nargs="+", default=list(AS_OPTIONS), help="AutoScheme's options")
    ap.add_argument("--ladders", nargs="+", default=list(LADDERS), help="which quantfix rows: " + ", ".join(LADDERS))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--topk", type=int, default=1024, help="reference log-probs kept per token when not stored whole")
    ap.add_argument("--full-max-mb", type=int, default=8192,
                    help="store the float reference whole (exact KL) up to this size; the loop gets the same")
    ap.add_argument("--eval-bs", type=int, default=0, help="windows per forward pass (0: 16 on CUDA, 4 on the CPU)")
    ap.add_argument("--override", nargs="*", action="extend", default=[],
                    help="extra Hydra overrides for the quantfix rows (repeatable: the flags add up)")
    ap.add_argument("--peers-from", nargs="*", default=[],
                    help="other streams' part JSON holding the AutoScheme rows: quantfix is also run at each "
                         "peer's bits (waited for up to --peer-wait s after the budget's own row)")
    ap.add_argument("--peer-wait", type=float, default=600.0)
    ap.add_argument("--at-peer-accounting", type=float, default=None, metavar="MARGIN",
                    help="run quantfix at the bits AutoScheme reaches within each budget (autoscheme_bits, less "
                         "MARGIN) instead of the budget: the matched-bits row without waiting for the peer")
    ap.add_argument("--algs", nargs="+", default=["rtn", "gptq", "awq"], help="uniform rows' roundings")
    ap.add_argument("--widths", nargs="+", default=list(WIDTHS), help="uniform rows' widths: " + ", ".join(WIDTHS))
    ap.add_argument("--out", default="benchmarks/repair.json")
    ap.add_argument("--merge", nargs="+", help="combine the JSON of several runs and print one table")
    a = ap.parse_args()
    if a.merge:
        merged = merge([json.loads(Path(p).read_text()) for p in a.merge])
        save(merged, a.out)
        print_table(merged)
        plot(merged, Path(a.out).with_suffix(".png"))
        return
    torch.manual_seed(0)
    device = loading_mod.resolve_device(a.device)
    dtype = loading_mod.resolve_dtype("auto", device)
    resolved = source_mod.resolve(a.model, cache_mod.cache_dir())
    model, tok = loading_mod.load(resolved, dtype, device)
    dd = str(data_mod.default_data_dir())
    windows = data_mod.eval_windows("wikitext2", dd, tok, a.windows, a.seq_len)
    samples = data_mod.calibration_samples(["c4"], dd, tok, a.calib, a.seq_len, 0)
    bs = a.eval_bs or (16 if device.type == "cuda" else 4)
    ref = ev.reference(model, windows, bs, a.topk, a.full_max_mb, progress=False)
    base = ev.baseline_metrics(ref)
    results = {"model": a.model, "device": str(device), "dtype": str(dtype),
               "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "baseline": base.to_dict(),
               "eval": f"wikitext2 {a.windows}x{a.seq_len}", "calibration": f"c4 {a.calib}x{a.seq_len}",
               "reference": "exact" if ref.full_logp is not None else f"top-{a.topk}", "rows": []}
    ctx = dict(a=a, resolved=resolved, tok=tok, windows=windows, samples=samples, ref=ref, dtype=dtype, device=device,
               bs=bs)
    if "uniform" in a.sections:
        for row in uniform_rows(model, ctx):
            add(results, row, a.out)
    del model
    gc.collect()
    for b in a.budgets:
        peers = []
        for iters in (0, 200):
            if f"autoscheme{iters}" in a.sections:
                with tune_mod.torch_globals_kept():  # AutoRound leaves torch's deterministic mode on for the process
                    peers.append(autoscheme_row(b, iters, ctx))
                add(results, peers[-1], a.out)
        if "quantfix" not in a.sections:
            continue
        for start in a.starts:
            for label in a.ladders:
                done: list = []
                # the budget, each in-process peer's bits below it, then (waited for) other streams' peers'
                first = b if a.at_peer_accounting is None else round(autoscheme_bits(b) - a.at_peer_accounting, 3)
                for wait in (False, True):
                    for target in [first] * (not wait) + peer_bits(b, peers, a, wait):
                        if target in done or target > min(done, default=b) + 1e-9:
                            continue  # a row at fewer bits than the peer's already compares
                        done.append(target)
                        row = quantfix_row(b, target, start, label, ctx)
                        add(results, row, a.out)
                        if row.get("tuned_from"):
                            add(results, row.pop("tuned_from"), a.out)
    print_table(results)


def autoscheme_bits(budget: float) -> float:
    """The average bits (counted as quantfix counts them: a 16-bit scale per group of 64) that AutoScheme
    reaches within ``budget``: it also charges each group a zero point of the weight's width, so its
    budget B buys w = (B - 0.25) / (1 + 1/64) weight bits. Measured: 2.957, 3.450, 3.942, 4.433 and
    4.925 at 3.0-5.0 on the demo (repair_h100_demo.json); the formula gives 2.958, 3.450, 3.942, 4.435,
    4.927 (AutoScheme lands at or just below it)."""
    return (budget - 0.25) / (1 + 1 / 64) + 0.25


def peer_bits(budget: float, peers: list, a, wait: bool) -> list:
    """The bits each AutoScheme row of ``budget`` landed at, where below the budget: this process's
    peers, and with ``wait`` the rows of other streams' part JSON (``--peers-from``), polled until one
    row per AutoScheme section named there has arrived or ``--peer-wait`` seconds have passed."""
    rows = list(peers)
    if wait and a.peers_from:
        deadline = time.time() + a.peer_wait
        while True:
            found = []
            for f in a.peers_from:
                try:
                    found += [r for r in json.loads(Path(f).read_text()).get("rows", []) if r.get("budget") == budget]
                except (OSError, ValueError):
                    pass
            if len(found) >= len(a.peers_from) or time.time() > deadline:
                break
            time.sleep(10)
        rows += found
    return sorted({round(r["avg_bits"], 3) for r in rows
                   if r.get("method", "").startswith("AutoRound AutoScheme") and "avg_bits" in r
                   and r["avg_bits"] < budget - 0.01})


def add(results: dict, row: dict, out: str) -> None:
    results["rows"].append(row)
    save(results, out)
    if "error" in row:
        print(f"  {row.get('budget', '-')!s:>5} {row['method']:<44} error: {row['error'][-200:]}", flush=True)
    else:
        print(f"  {row.get('budget', '-')!s:>5} {row['method']:<44} bits {row['avg_bits']:.3f}  KLD {row['kld_mean']:.4f}"
              f"  PPL {row['ppl']:.3f}  top1 {row['top1']:.3f}  {row['checkpoint_mb']:.1f} MB  {row['seconds']:.0f}s",
              flush=True)


def save(results: dict, out: str) -> None:
    """Written after every row, so an interrupted run keeps what it measured."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2, default=str))


def measure(ckpt: Path, ctx: dict) -> dict:
    from quantfix.config import ModelConfig
    from quantfix.verify import ReloadSpec, reload

    qm = reload(ckpt, ReloadSpec(ctx["dtype"], ctx["device"], ModelConfig()))
    m = ev.evaluate(qm, ctx["windows"], ctx["ref"], ctx["bs"], progress=False)
    bits = _avg_bits_of(qm)
    del qm
    gc.collect()
    return {"avg_bits": bits, "kld_mean": m.kld_mean, "ppl": m.ppl, "top1": m.top1,
            "checkpoint_mb": round(exp.dir_size(ckpt) / 1e6, 1)}


def quantfix_row(budget: float, target: float, start: str, label: str, ctx: dict) -> dict:
    """The real loop in budget mode at ``target`` bits (the budget, or a peer's bits below it) from
    ``start``: diagnose plan 0, measure candidates within the budget, export the best, verify."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from quantfix.config import register
    from quantfix.recipe import run

    a = ctx["a"]
    bits, group = STARTS[start]
    method = f"{label} from {start}" + (f" at the peer's {target:g} bits" if target != budget else "")
    out = Path(tempfile.mkdtemp(prefix="bench-qf-"))
    overrides = [f"model.name_or_path={a.model}", f"device={a.device}", f"eval.n_windows={a.windows}",
                 f"eval.seq_len={a.seq_len}", "data.domains=[c4]", f"data.n_samples={a.calib}",
                 f"data.seq_len={a.seq_len}", f"eval.topk={a.topk}", f"eval.full_max_mb={a.full_max_mb}", f"quant.bits={bits}", f"quant.group_size={group}",
                 f"plan.budget.avg_bits={target}", "export.dtype=auto", *LADDERS[label], *a.override]
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        t = time.perf_counter()
        report = run(cfg, out)
        secs = time.perf_counter() - t
        row = _quantfix_fields(report, budget, method, secs, ctx)
        diag = out / "diagnosis_full.json"  # where the diagnosis's seconds went (option simulation, passes, sides)
        if diag.exists():
            row["diagnosis_timings_s"] = json.loads(diag.read_text()).get("timings_s", {})
    except Exception as e:  # an engine failing is a result too
        row = {"budget": budget, "method": method, "error": "".join(traceback.format_exception_only(e))[-600:]}
    finally:
        GlobalHydra.instance().clear()
        shutil.rmtree(out, ignore_errors=True)
    return row


def _quantfix_fields(report, budget: float, method: str, secs: float, ctx: dict) -> dict:
    """A quantfix row from its RunReport: the reloaded checkpoint measured here, its trial's
    prediction and simulation, and (tuned) the plan before tuning."""
    fin = report.final
    chosen = report.trial(fin.chosen_trial)
    v = fin.verification
    row = {"budget": budget, "method": method, **measure(Path(v.checkpoint), ctx), "seconds": round(secs, 1),
           "plan": fin.plan_summary, "planned_bits": fin.avg_bits, "trials": len(report.trials),
           "predicted_kld": chosen.predicted_kld, "simulated_kld": chosen.metrics.kld_mean,
           "verified_kld": v.metrics.kld_mean, "prediction_error_pct": chosen.prediction_error_pct,
           "candidates": [{"action": t.action, "bits": t.avg_bits, "kld": t.metrics.kld_mean,
                           "predicted": t.predicted_kld} for t in report.trials],
           "timings_s": report.timings_s}
    if ctx["a"].override:  # --override flags (e.g. a ladder): what else this row ran with
        row["overrides"] = list(ctx["a"].override)
    if chosen.tuned_from is not None and "AutoRound tuning" not in method:  # sequential GPTQ of the search's plan
        src = report.trial(chosen.tuned_from)
        row["sequential_gptq_from"] = {"kld_mean": src.metrics.kld_mean, "plan": src.plan_summary}
    elif chosen.tuned_from is not None:  # the plan before tuning: its own trial, exact-export path
        src = report.trial(chosen.tuned_from)
        row["tuned_from"] = {"budget": budget, "method": method.replace(" + AutoRound tuning", "") + " (its trial)",
                             "avg_bits": row["avg_bits"], "kld_mean": src.metrics.kld_mean, "ppl": src.metrics.ppl,
                             "top1": src.metrics.top1, "checkpoint_mb": row["checkpoint_mb"],
                             "seconds": round(secs, 1), "plan": src.plan_summary,
                             "note": "trial of the same run (not exported)"}
    elif "AutoRound tuning" in method:  # the tuned plan measured worse: the search's own plan shipped
        row["tuning_kept"] = False
    return row


def uniform_rows(model, ctx: dict) -> list:
    """Uniform RTN / GPTQ / AWQ at each width some budget admits (llm-compressor export)."""
    a, rows = ctx["a"], []
    for wname, (bits, g) in WIDTHS.items():
        if wname not in a.widths or Precision(bits, g).bits_per_weight(4096) > max(a.budgets) + 1e-9:
            continue
        for alg in a.algs:
            label = f"uniform {alg.upper()} {wname}"
            out = Path(tempfile.mkdtemp(prefix="bench-u-"))
            try:
                fresh, _ = loading_mod.load(ctx["resolved"], ctx["dtype"], ctx["device"])
                t = time.perf_counter()
                ckpt = stock_export(fresh, ctx["tok"], alg, bits, g, ctx["samples"], out)
                secs = time.perf_counter() - t
                del fresh
                gc.collect()
                rows.append({"method": label, "width": wname, **measure(ckpt, ctx), "seconds": round(secs, 1)})
            except Exception as e:
                rows.append({"method": label, "width": wname,
                             "error": "".join(traceback.format_exception_only(e))[-600:]})
            finally:
                shutil.rmtree(out, ignore_errors=True)
            print(f"  uniform {label}: {rows[-1].get('kld_mean', rows[-1].get('error'))}", flush=True)
    return rows


def stock_export(model, tok, alg: str, bits: int, group: int, samples, out: Path) -> Path:
    """llm-compressor's own flow for one uniform scheme (the peer baseline): QuantizationModifier
    (RTN, min/max), GPTQModifier, or AWQModifier + QuantizationModifier, C4 calibration."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group" if group else "channel"}
    if group:
        weights["group_size"] = group
    groups = {"g": {"targets": [r"re:.*layers\.\d+\..*proj$"], "weights": weights}}
    recipe = {"rtn": [QuantizationModifier(config_groups=groups, ignore=["lm_head"])],
              "gptq": [GPTQModifier(config_groups=groups, ignore=["lm_head"])],
              "awq": [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]}[alg]
    kwargs = {}
    if alg != "rtn":
        exp._cpu_safe_llmcompressor()
        kwargs = dict(dataset=exp._calibration_dataset(samples), num_calibration_samples=samples.shape[0],
                      max_seq_length=samples.shape[1], processor=tok, shuffle_calibration_samples=False)
    oneshot(model=model, recipe=recipe, **kwargs)
    ckpt = out / "checkpoint"
    model.save_pretrained(ckpt, save_compressed=True)
    tok.save_pretrained(ckpt)
    return ckpt


def autoscheme_row(budget: float, iters: int, ctx: dict) -> dict:
    """AutoRound's AutoScheme (delta-loss mixed precision over its options, group 64) at the same
    average bits, with iters=0 (optimized RTN) or AutoRound's default tuning (iters=200)."""
    opts = tuple(ctx["a"].as_options)
    label = f"AutoRound AutoScheme ({'/'.join(o.split('A16')[0] for o in opts)} g64, iters={iters})"
    try:
        from auto_round import AutoRound, AutoScheme
        from transformers import AutoModelForCausalLM

        tok, samples = ctx["tok"], ctx["samples"]
        os.environ.setdefault("AR_AUTO_SCHEME_CACHE", tempfile.mkdtemp(prefix="ar-cache-"))
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ctx["resolved"].path, dtype=ctx["dtype"]).to(ctx["device"])
        texts = [tok.decode(s) for s in samples]
        data_file = Path(tempfile.mkdtemp(prefix="ar-data-")) / "calib.jsonl"
        data_file.write_text("\n".join(json.dumps({"text": t}) for t in texts))  # the same C4 windows
        scheme = AutoScheme(avg_bits=budget, options=opts, nsamples=len(texts),
                            seqlen=samples.shape[1], dataset=str(data_file), ignore_scale_zp_bits=False)
        ar = AutoRound(model, tok, scheme=scheme, iters=iters, dataset=str(data_file), nsamples=len(texts),
                       seqlen=samples.shape[1], group_size=64)
        out = Path(tempfile.mkdtemp(prefix="ar-"))
        ar.quantize_and_save(str(out), format="llm_compressor")
        secs = time.perf_counter() - t
        del model, ar
        gc.collect()
        cfgs = sorted(out.rglob("config.json"))
        if not cfgs:
            raise RuntimeError(f"AutoRound wrote no config.json under {out}")
        row = {"budget": budget, "method": label, **measure(cfgs[0].parent, ctx), "seconds": round(secs, 1)}
        shutil.rmtree(out, ignore_errors=True)
        return row
    except Exception as e:
        return {"budget": budget, "method": label, "error": "".join(traceback.format_exception_only(e))[-600:]}


def _avg_bits_of(model) -> float:
    """Average storage bits of the decoder's linear weights in a loaded compressed-tensors model,
    counted as quantfix counts them (16-bit scales per group)."""
    total_bits, total = 0.0, 0
    for name, mod in model.named_modules():
        if not (name.endswith("proj") and ".layers." in name):
            continue
        scheme = getattr(mod, "quantization_scheme", None)
        w = getattr(scheme, "weights", None) if scheme is not None else None
        shape = tuple(getattr(mod, "weight_shape", torch.tensor([mod.out_features, mod.in_features])).tolist())
        n = shape[0] * shape[1]
        p = Precision(w.num_bits, w.group_size or 0, w.symmetric) if w is not None else Precision(16)
        total_bits += p.bits_per_weight(shape[1]) * n
        total += n
    return round(total_bits / max(total, 1), 3)


def merge(parts: list) -> dict:
    out = {k: v for k, v in parts[0].items() if k != "rows"}
    out["rows"] = [r for p in parts for r in p["rows"]]
    out["gpus"] = sorted({str(p.get("gpu")) for p in parts})
    return out


def label_of(x: dict) -> str:
    """A row's method, with the --override flags it ran with (rows that differ only in those are told apart)."""
    label = x["method"] + (" (tuning not kept)" if x.get("tuning_kept") is False else "")
    if x.get("overrides"):
        label += " [" + " ".join(o.strip("'") for o in x["overrides"]) + "]"
    return label


def plot(r: dict, png: Path) -> None:
    """KLD (log) against average bits, one marker per method family: the table, to be seen."""
    families = {"quantfix": "o", "AutoRound AutoScheme": "s", "uniform": "x"}
    groups: dict = {}
    for x in r["rows"]:
        if "error" in x or "kld_mean" not in x:
            continue
        name = label_of(x) if not x["method"].startswith("uniform") else x["method"].rsplit(" ", 1)[0]
        name = re.sub(r" at the peer's [\d.]+ bits", "", name)  # one line per method, whatever bits it ran at
        groups.setdefault(name, []).append((x["avg_bits"], x["kld_mean"]))
    with figure(png, figsize=(7, 4.5)) as (fig, ax):
        for name, pts in sorted(groups.items()):
            pts = sorted(set(pts))
            marker = next((m for f, m in families.items() if name.startswith(f)), ".")
            ax.plot([b for b, _ in pts], [k for _, k in pts], marker=marker, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("average bits per weight (quantized modules)")
        ax.set_ylabel("mean KLD vs float (log)")
        ax.set_title(f"{r['model']}: {r.get('gpu') or r['device']}, eval {r['eval']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)


def best_uniform(rows: list, budget: float, alg: str):
    fits = [r for r in rows if r["method"].startswith(f"uniform {alg.upper()} ") and "error" not in r
            and r["avg_bits"] <= budget + 1e-9]
    return max(fits, key=lambda r: r["avg_bits"]) if fits else None


def print_table(r: dict) -> None:
    print(f"\nfloat PPL {r['baseline']['ppl']:.3f}  ({r['device']}, {r.get('gpu') or 'cpu'}); eval {r['eval']}, "
          f"calibration {r['calibration']}")
    print("| budget | method | bits | KLD | PPL | top-1 | ckpt MB | s |\n|---|---|---|---|---|---|---|---|")
    budgets = sorted({x["budget"] for x in r["rows"] if "budget" in x})
    for b in budgets:
        rows = [x for x in r["rows"] if x.get("budget") == b]
        rows += [u for u in (best_uniform(r["rows"], b, alg) for alg in ("rtn", "gptq", "awq")) if u]
        for x in rows:
            if "error" in x:
                print(f"| {b} | {x['method']} | error: {x['error'][-80:]} |")
                continue
            print(f"| {b} | {label_of(x)} | {x['avg_bits']:.3f} | {x['kld_mean']:.4f} | {x['ppl']:.3f} | "
                  f"{x['top1']:.3f} | {x['checkpoint_mb']:.1f} | {x['seconds']:.0f} |")


if __name__ == "__main__":
    main()
