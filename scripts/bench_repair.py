"""Planner benchmark: quantfix's mixed-precision plans vs uniform RTN / GPTQ / AWQ (llm-compressor)
and AutoRound's AutoScheme at the same average bits, plus trials-to-pass against a one-module-
at-a-time fallback baseline (Intel Neural Compressor's "basic" strategy).

    python scripts/bench_repair.py [--budgets 4.25 4.5 5 6] [--out benchmarks/repair.json]

Every checkpoint scored here is a real one: exported (llm-compressor, compressed-tensors), reloaded
from disk with plain transformers and evaluated on WikiText-2 windows held out from calibration
(calibration: C4). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

from quantfix import data as data_mod
from quantfix import evaluate as ev
from quantfix import export as exp
from quantfix import model as model_mod
from quantfix.config import QuantConfig, ThresholdsConfig
from quantfix.diagnose.sensitivity import fisher
from quantfix.verdict import check, kld_target
from quantfix.plan import Plan, Precision
from quantfix.planner import Ladder, PredictivePlanner, initial_plan, ladder_options
from quantfix.quantize.bank import WeightBank
from quantfix.quantize.calib import collect


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.25, 4.5, 5.0, 6.0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--algorithm", default="gptq", help="quantfix's algorithm for its plans")
    ap.add_argument("--ppl-pct", type=float, default=5.0, help="threshold for trials-to-pass")
    ap.add_argument("--fallback-cap", type=int, default=400)
    ap.add_argument("--skip-autoround", action="store_true")
    ap.add_argument("--skip-trials", action="store_true")
    ap.add_argument("--out", default="benchmarks/repair.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    device = model_mod.resolve_device(a.device)
    dtype = model_mod.resolve_dtype("auto", device)
    resolved = model_mod.resolve(a.model, model_mod.cache_dir())
    model, tok = model_mod.load(resolved, dtype, device)
    dd = str(data_mod.default_data_dir())
    windows = data_mod.eval_windows("wikitext2", dd, tok, a.windows, a.seq_len)
    samples = data_mod.calibration_samples(["c4"], dd, tok, a.calib, a.seq_len, 0)
    bs = 16 if device.type == "cuda" else 4
    ref = ev.reference(model, windows, bs, 256, 0, progress=False)
    base = ev.baseline_metrics(ref)
    rows, results = [], {"model": a.model, "device": str(device), "dtype": str(dtype),
                         "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                         "baseline": base.to_dict(), "eval": f"wikitext2 {a.windows}x{a.seq_len}",
                         "calibration": f"c4 {a.calib}x{a.seq_len}"}
    q = QuantConfig(algorithm=a.algorithm, bits=3, group_size=64)

    def real_eval(plan: Plan, label: str, alg: str, seconds_extra: float = 0.0) -> dict:
        """Export a plan with llm-compressor, reload it, evaluate it."""
        nonlocal model
        out = Path(tempfile.mkdtemp(prefix="bench-"))
        sync(device)
        t = time.perf_counter()
        p = Plan({n: Precision(x.bits, x.group_size, x.symmetric, alg) if not x.is_float else x
                  for n, x in plan.modules.items()}, plan.shapes, plan.other_params)
        try:
            ckpt = exp.export(model, tok, p, samples, out, resolved.path, QuantConfig())
        except Exception:
            model, _ = model_mod.load(resolved, dtype, device)  # the failed engine may leave hooks behind
            raise
        sync(device)
        t_export = time.perf_counter() - t
        del model
        gc.collect()
        qm = exp.reload(ckpt, dtype, device)
        m = ev.evaluate(qm, windows, ref, bs, progress=False)
        size = exp.dir_size(ckpt)
        del qm
        shutil.rmtree(out, ignore_errors=True)
        model, _ = model_mod.load(resolved, dtype, device)  # a fresh float model for the next export
        r = {"method": label, "avg_bits": round(plan.avg_bits, 3), "kld_mean": m.kld_mean, "ppl": m.ppl,
             "top1": m.top1, "checkpoint_mb": round(size / 1e6, 1), "seconds": round(t_export + seconds_extra, 1)}
        print(f"  {label:<34} bits {r['avg_bits']:.3f}  KLD {m.kld_mean:.4f}  PPL {m.ppl:.3f}  "
              f"top1 {m.top1:.3f}  {r['seconds']:.1f}s", flush=True)
        return r

    # ---- quantfix: diagnose once, then one plan per budget ---------------------------------------
    t0 = time.perf_counter()
    plan3, _ = initial_plan(model, q, {"domains": ["c4"]})
    names = list(plan3.modules)
    stats = collect(model, samples, names, bs, progress=False)
    bank = WeightBank(model, names, stats)
    ladder = Ladder.parse(["3/64", "4/64", "4/32", "8/0", "16/0"])
    options = ladder_options(plan3, ladder)
    opt_w = {n: {lab: bank.simulate(n, p).cpu() for lab, p in o.items()} for n, o in options.items()}
    sens = fisher(model, windows[:2], bank.quantized_weights(plan3), opt_w, batch_size=2, progress=False)
    planner = PredictivePlanner(plan3, sens.modules, sens.options, options, [])
    bank.apply(plan3, progress=False)
    m3 = ev.evaluate(model, windows, ref, bs, progress=False)
    planner.calibrate(0, m3.kld_mean)
    bank.restore()
    sync(device)
    t_plan = time.perf_counter() - t0
    results["quantfix_plan_seconds"] = round(t_plan, 1)
    budgets = {}
    for b in a.budgets:
        k = planner.largest_within(b)
        plan = planner.plan_at(k)
        print(f"budget {b}: quantfix plan {plan.summary_str()} ({plan.avg_bits:.3f} bits, "
              f"predicted KLD {planner.predict(k):.4f})", flush=True)
        budgets[str(b)] = {"quantfix": real_eval(plan, f"quantfix ({a.algorithm}, mixed)", a.algorithm,
                                                 t_plan / len(a.budgets)),
                           "quantfix_plan": plan.summary_str()}
    del bank
    gc.collect()

    # ---- uniform baselines at the nearest width within each budget ------------------------------
    widths = {w: bg for w, bg in {"W4g64": (4, 64), "W4g32": (4, 32), "W8": (8, 0)}.items()
              if Precision(*bg).bits_per_weight(576) <= max(a.budgets) + 1e-9}  # only widths some budget admits
    results["budgets"] = budgets
    save(results, a.out)
    uniform = {}
    for wname, (bits, g) in widths.items():
        for alg in ("rtn", "gptq", "awq"):
            p0, _ = initial_plan(model, QuantConfig(algorithm=alg, bits=bits, group_size=g), {})
            try:
                uniform[(wname, alg)] = real_eval(p0, f"uniform {alg.upper()} {wname}", alg)
            except Exception as e:  # an engine failing is a result too
                uniform[(wname, alg)] = {"method": f"uniform {alg.upper()} {wname}", "error": repr(e)[:300]}
                print(f"  uniform {alg} {wname} failed: {e!r}"[:300], flush=True)
    for b, entry in budgets.items():
        fits = [w for w, (bits, g) in widths.items()
                if Precision(bits, g).bits_per_weight(576) <= float(b) + 1e-9]
        nearest = max(fits, key=lambda w: Precision(*widths[w]).bits_per_weight(576)) if fits else None
        entry["uniform_width"] = nearest
        for alg in ("rtn", "gptq", "awq"):
            entry[f"uniform_{alg}"] = uniform.get((nearest, alg)) if nearest else None

    results["uniform"] = {f"{w}/{alg}": r for (w, alg), r in uniform.items()}
    save(results, a.out)
    # ---- AutoRound AutoScheme at the same average bits --------------------------------------------
    if not a.skip_autoround:
        for b, entry in budgets.items():
            entry["autoscheme"] = autoscheme(resolved.path, tok, float(b), samples, windows, ref, dtype, device, bs)
            save(results, a.out)

    # ---- trials to pass: quantfix predictive vs one-module-at-a-time fallback --------------------
    if not a.skip_trials:
        results["trials_to_pass"] = trials_to_pass(model, names, stats, windows, ref, base, a, bs, device)
    save(results, a.out)
    print_table(results)


def save(results: dict, out: str) -> None:
    """Written after every section, so an interrupted run keeps what it measured."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2, default=str))


def autoscheme(path, tok, avg_bits, samples, windows, ref, dtype, device, bs) -> dict:
    """AutoRound's AutoScheme (delta-loss mixed precision) at the same average bits, RTN (iters=0)."""
    try:
        from auto_round import AutoRound, AutoScheme
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        texts = [tok.decode(s) for s in samples]
        data_file = Path(tempfile.mkdtemp(prefix="ar-data-")) / "calib.jsonl"
        data_file.write_text("\n".join(json.dumps({"text": t}) for t in texts))  # the same C4 windows
        scheme = AutoScheme(avg_bits=avg_bits, options=("W4A16", "W8A16"), nsamples=len(texts),
                            seqlen=samples.shape[1], dataset=str(data_file), ignore_scale_zp_bits=False)
        ar = AutoRound(model, tok, scheme=scheme, iters=0, dataset=str(data_file), nsamples=len(texts),
                       seqlen=samples.shape[1], group_size=64)
        out = Path(tempfile.mkdtemp(prefix="ar-"))
        ar.quantize_and_save(str(out), format="llm_compressor")
        secs = time.perf_counter() - t
        del model, ar
        gc.collect()
        cfgs = sorted(out.rglob("config.json"))
        if not cfgs:
            raise RuntimeError(f"AutoRound wrote no config.json under {out}: {[p.name for p in out.rglob('*')][:10]}")
        qm = exp.reload(cfgs[0].parent, dtype, device)
        m = ev.evaluate(qm, windows, ref, bs, progress=False)
        bits = _avg_bits_of(qm)
        size = exp.dir_size(cfgs[0].parent)
        shutil.rmtree(out, ignore_errors=True)
        return {"method": "AutoRound AutoScheme (W4A16/W8A16, iters=0)", "avg_bits": bits, "kld_mean": m.kld_mean,
                "ppl": m.ppl,
                "top1": m.top1, "checkpoint_mb": round(size / 1e6, 1), "seconds": round(secs, 1)}
    except Exception as e:
        return {"method": "AutoRound AutoScheme", "error": "".join(traceback.format_exception_only(e))[-400:]}


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


@torch.no_grad()
def trials_to_pass(model, names, stats, windows, ref, base, a, bs, device) -> dict:
    """Trials (full evaluations) each policy needs to pass +ppl_pct from W4 g64 RTN."""
    thr = ThresholdsConfig(max_ppl_increase_pct=a.ppl_pct)
    bank = WeightBank(model, names, stats)
    plan0, _ = initial_plan(model, QuantConfig(algorithm="rtn", bits=4, group_size=64), {})

    def trial(plan):
        bank.apply(plan, progress=False)
        return ev.evaluate(model, windows, ref, bs, progress=False)

    out = {"threshold": f"PPL +{a.ppl_pct}%", "start": plan0.summary_str()}
    # quantfix: diagnose plan 0, predict, verify, recalibrate on a miss, then bisect
    t = time.perf_counter()
    m0 = trial(plan0)
    n = 1
    ladder = Ladder.parse(["4/64", "4/32", "8/0", "16/0"])
    options = ladder_options(plan0, ladder)
    opt_w = {nm: {lab: bank.simulate(nm, p).cpu() for lab, p in o.items()} for nm, o in options.items()}
    qw = bank.quantized_weights(plan0)
    bank.restore()
    sens = fisher(model, windows[:2], qw, opt_w, batch_size=2, progress=False)
    planner = PredictivePlanner(plan0, sens.modules, sens.options, options, [])
    planner.calibrate(0, m0.kld_mean)
    target = kld_target(thr, base.ppl, max((m0.nll - base.nll) / m0.kld_mean, 0.2))
    lo, first_pass, passing_bits = 0, None, None
    while n < 40:
        k = planner.first_passing(target, after=lo) or len(planner.steps)
        m = trial(planner.plan_at(k))
        n += 1
        if not check(m, base, thr):
            first_pass, passing_bits = n, planner.plan_at(k).avg_bits
            break
        planner.calibrate(k, m.kld_mean)
        target = kld_target(thr, base.ppl, max((m.nll - base.nll) / m.kld_mean, 0.2))
        lo = k
    out["quantfix"] = {"trials_to_first_pass": first_pass, "avg_bits": passing_bits,
                       "seconds": round(time.perf_counter() - t, 1)}
    # Neural Compressor "basic": fall back each module alone (one trial each), then accumulate
    # fallbacks in order of the measured gain until the threshold passes.
    t = time.perf_counter()
    bank.restore()
    gains, n = [], 1  # trial 1 = plan 0
    for nm in names:
        if n >= a.fallback_cap:
            break
        m = trial(plan0.with_changes({nm: Precision(16)}))
        n += 1
        gains.append((m0.kld_mean - m.kld_mean, nm))
    gains.sort(reverse=True)
    fb_pass, fb_bits, changes = None, None, {}
    for g, nm in gains:
        if n >= a.fallback_cap:
            break
        changes[nm] = Precision(16)
        plan = plan0.with_changes(dict(changes))
        m = trial(plan)
        n += 1
        if not check(m, base, thr):
            fb_pass, fb_bits = n, plan.avg_bits
            break
    out["fallback_basic"] = {"trials_to_first_pass": fb_pass, "trials_run": n, "avg_bits": fb_bits,
                             "capped": fb_pass is None, "seconds": round(time.perf_counter() - t, 1)}
    bank.restore()
    return out


def print_table(r: dict) -> None:
    print(f"\nbaseline PPL {r['baseline']['ppl']:.3f}  ({r['device']}, {r.get('gpu') or 'cpu'})")
    print(f"{'budget':>6}  {'method':<40} {'bits':>6} {'KLD':>8} {'PPL':>8} {'top1':>6} {'MB':>6} {'s':>6}")
    for b, e in r["budgets"].items():
        for key in ("quantfix", "uniform_rtn", "uniform_gptq", "uniform_awq", "autoscheme"):
            x = e.get(key)
            if not x:
                continue
            if "error" in x:
                print(f"{b:>6}  {x['method']:<40} error: {x['error'][:60]}")
                continue
            print(f"{b:>6}  {x['method']:<40} {x.get('avg_bits', float('nan')):>6.3f} {x['kld_mean']:>8.4f} "
                  f"{x['ppl']:>8.3f} {x['top1']:>6.3f} {x['checkpoint_mb']:>6.1f} {x['seconds']:>6.1f}")
    t = r.get("trials_to_pass")
    if not t:
        return
    print(f"\ntrials to pass {t['threshold']} from {t['start']}: quantfix {t['quantfix']['trials_to_first_pass']} "
          f"({t['quantfix']['seconds']}s), one-module fallback {t['fallback_basic']['trials_to_first_pass']} "
          f"(ran {t['fallback_basic']['trials_run']}, {t['fallback_basic']['seconds']}s)")


if __name__ == "__main__":
    main()
