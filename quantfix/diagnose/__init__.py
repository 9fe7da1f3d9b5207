"""Stage: diagnose. Where and why a quantized plan breaks, and what fixes it.

``run`` measures (sensitivity, outliers, per-channel error, probes, per-domain perplexity) and
``root_causes`` turns the measurements into findings, each with its evidence numbers and a fix
the planner can act on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from quantfix.cache import atomic_write
from quantfix import data as data_mod
from quantfix.diagnose import activations, probes, sensitivity
from quantfix.plan import Plan, Precision, layer_index, module_type

log = logging.getLogger(__name__)


def _sens_cache_key(model_key: str, plan: Plan, windows: torch.Tensor, dcfg, option_labels: List[str]) -> str:
    h = hashlib.sha256(f"sens-v6|{model_key}|{dcfg.sensitivity.method}|{dcfg.sensitivity.windows}|"
                       f"{dcfg.sensitivity.label_samples}|{dcfg.sensitivity.fisher_windows}|{option_labels}".encode())
    h.update(json.dumps(plan.to_dict()["modules"], sort_keys=True).encode())
    h.update(windows.numpy().tobytes())
    return h.hexdigest()[:16]


def measure_sensitivity(s, bank, plan: Plan, ref, options: Optional[Dict[str, Dict[str, Precision]]] = None,
                        progress: bool = True) -> sensitivity.Sensitivity:
    """Sensitivity of the plan's parts (cached on disk by model, plan, eval set and method).
    ``options``: module -> label -> precision to also score (fisher only). Leaves float weights live."""
    from quantfix import evaluate as ev

    dcfg = s.cfg.diagnose
    labels = sorted({lab for o in (options or {}).values() for lab in o})
    key = _sens_cache_key(s.model_key, plan, s.windows, dcfg, labels)
    path = s.cache / "sensitivity" / f"{key}.json"
    if path.exists():
        log.info("sensitivity: cached (%s)", path.name)
        bank.restore()
        return sensitivity.Sensitivity.from_dict(json.loads(path.read_text()))
    if dcfg.sensitivity.method == "exact":
        def kld(restored):
            bank.apply(plan.with_changes({n: Precision() for n in restored}), progress=False)
            return s.batched(lambda bs: ev.evaluate(s.model, s.windows, ref, bs, progress=False)).kld_mean

        quantized = [n for n, p in plan.modules.items() if not p.is_float]
        result = sensitivity.exact(kld, quantized, dcfg.sensitivity.per_module_exact, progress)
        bank.restore()
    elif dcfg.sensitivity.method in ("fast", "taylor"):
        opt_w = {n: {lab: bank.simulate(n, p).cpu() for lab, p in o.items()} for n, o in (options or {}).items()}
        bank.apply(plan, progress=False)
        fw = {n: bank.originals[n] for n, p in plan.modules.items() if not p.is_float}
        sub = s.windows[: dcfg.sensitivity.windows]
        bs = min(2, s.batch_size)
        if dcfg.sensitivity.method == "fast":
            result = sensitivity.fast(s.model, sub, ref, fw, bank.quantized_weights(plan), opt_w, bs,
                                      dcfg.sensitivity.label_samples, s.cfg.seed, progress=progress,
                                      fisher_windows=s.windows[: dcfg.sensitivity.fisher_windows])
            bank.current.clear()  # fast() leaves the float weights live
        else:
            result = sensitivity.taylor(s.model, sub, ref, fw, opt_w, bs, progress=progress)
        bank.restore()
    else:
        qw = bank.quantized_weights(plan)
        opt_w = {n: {lab: bank.simulate(n, p).cpu() for lab, p in o.items()} for n, o in (options or {}).items()}
        bank.restore()
        result = sensitivity.fisher(s.model, s.windows[: dcfg.sensitivity.windows], qw, opt_w,
                                    batch_size=min(2, s.batch_size),
                                    label_samples=dcfg.sensitivity.label_samples, seed=s.cfg.seed, progress=progress)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result.to_dict())))
    return result


def run(s, bank, plan: Plan, ref, base, qmetrics, stats, options=None, progress: bool = True) -> Dict[str, Any]:
    """Full diagnosis of ``plan`` (applied through ``bank``). Writes plots under the run dir."""
    t0 = time.perf_counter()
    cfg, dcfg = s.cfg, s.cfg.diagnose
    plots = s.out_dir / "plots"
    timings: Dict[str, float] = {}

    def lap(name, t):
        timings[name] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    sens = measure_sensitivity(s, bank, plan, ref, options, progress)
    lap("sensitivity", t)
    qw = bank.quantized_weights(plan)
    names = [n for n, p in plan.modules.items() if not p.is_float]
    absmax_samples = s.samples[: dcfg.absmax_samples]
    bs = s.batch_size

    # float side (bank restored: float weights live)
    t = time.perf_counter()
    fp_absmax = activations.input_absmax(s.model, absmax_samples, names, bs, progress)
    channels = activations.channel_errors(s.model, s.windows[: dcfg.channel_windows], qw, bs, progress)
    lap("activations + channels (float)", t)
    domain_sets = {}
    for label, src in dcfg.domains.items():
        try:
            domain_sets[label] = data_mod.eval_windows(src, s.data_dir, s.tokenizer, dcfg.domain_windows,
                                                       dcfg.domain_seq_len)
        except Exception as e:  # a missing optional corpus should not stop the diagnosis
            log.warning("domain %s (%s) skipped: %s", label, src, e)
    t = time.perf_counter()
    fp_dom = {k: probes.domain_logprobs(s.model, w, bs) for k, w in domain_sets.items()}
    prompts = [dict(p) for p in cfg.probes.prompts] if dcfg.probes else []
    fp_gen = probes.generate(s.model, s.tokenizer, prompts, cfg.probes.max_new_tokens, progress) if prompts else []
    lap("probes + domains (float)", t)

    # quantized side
    t = time.perf_counter()
    bank.apply(plan, progress=False)
    q_absmax = activations.input_absmax(s.model, absmax_samples, names, bs, progress)
    domains = {k: probes.domain_metrics(domain_sets[k], fp_dom[k], probes.domain_logprobs(s.model, w, bs))
               for k, w in domain_sets.items()}
    q_gen = probes.generate(s.model, s.tokenizer, prompts, cfg.probes.max_new_tokens, progress) if prompts else []
    generations = probes.compare_generations(s.tokenizer, prompts, fp_gen, q_gen) if prompts else []
    lap("probes + domains (quantized)", t)

    # outliers per distinct input (q/k/v share one)
    groups = stats.groups() if stats is not None else {n: [n] for n in names}
    outliers = []
    for key, members in groups.items():
        members = [m for m in members if m in fp_absmax]
        if not members:
            continue
        o = activations.outlier_summary(fp_absmax[members[0]], dcfg.outlier_k)
        oq = activations.outlier_summary(q_absmax[members[0]], dcfg.outlier_k) if members[0] in q_absmax else None
        outliers.append({"input_of": members, "layer": layer_index(members[0]), "float": o, "quantized": oq,
                         "sensitivity": sum(sens.modules.get(m, 0.0) for m in members)})
    outliers.sort(key=lambda r: -r["float"]["ratio"])
    hist_names = [r["input_of"][0] for r in outliers[: dcfg.histograms]]
    hist_paths = activations.plot_histograms(fp_absmax, q_absmax, hist_names, plots, dcfg.outlier_k)

    diag: Dict[str, Any] = {
        "plan_summary": plan.summary_str(), "avg_bits": round(plan.avg_bits, 4),
        "metrics": {"baseline": base.to_dict(), "quantized": qmetrics.to_dict(),
                    "ppl_increase_pct": round(100 * (qmetrics.ppl / base.ppl - 1), 3)},
        "sensitivity": sens.to_dict(), "outliers": outliers, "channel_errors": {str(k): v for k, v in channels.items()},
        "domains": domains, "generations": generations, "calibration_domains": list(cfg.data.domains),
        "plots": {"histograms": hist_paths},
    }
    diag["findings"] = root_causes(diag, plan, dcfg)
    diag["plots"].update(plot_diagnosis(diag, plots))
    diag["timings_s"] = dict(timings, total=round(time.perf_counter() - t0, 2))
    return diag


def _share_of_top(values: Dict[Any, float], frac: float = 0.1):
    items = sorted(values.items(), key=lambda kv: -kv[1])
    total = sum(max(v, 0.0) for _, v in items) or 1e-12
    k = max(1, math.ceil(frac * len(items)))
    return [key for key, _ in items[:k]], sum(max(v, 0.0) for _, v in items[:k]) / total


RESIDUAL_INPUTS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # read the (normed) residual stream


def _ranges(xs: List[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10'"""
    parts, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            parts.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ", ".join(parts)


def _group_outliers(raw: List[Dict[str, Any]], keep: int) -> List[Dict[str, Any]]:
    """One finding per residual-stream channel (the same channel index feeds q/k/v and gate/up of
    many layers: one cause, not one finding per layer), the rest per input; beyond ``keep`` findings
    (by outlier ratio) the tail is merged into one, so the report stays readable. The planner
    reads only kind and modules, which the merged findings keep in full."""
    by_channel: Dict[int, List[Dict[str, Any]]] = {}
    rest = []
    for f in raw:
        if {module_type(m) for m in f["modules"]} <= RESIDUAL_INPUTS:
            by_channel.setdefault(f["evidence"]["channel"], []).append(f)
        else:
            rest.append(f)
    grouped = list(rest)
    for ch, fs in by_channel.items():
        if len(fs) == 1:
            grouped.append(fs[0])
            continue
        mods = [m for f in fs for m in f["modules"]]
        layers = sorted({layer_index(m) for m in mods if layer_index(m) is not None})
        ratios = [f["evidence"]["ratio"] for f in fs]
        types = sorted({module_type(m) for m in mods})
        grouped.append({
            "kind": "outlier_channels", "modules": mods,
            "finding": f"residual-stream channel {ch} is an outlier ({min(ratios):g}-{max(ratios):g}x the median "
                       f"channel) in the inputs of {len(layers)} layers ({_ranges(layers)}; {', '.join(types)})",
            "evidence": {"channel": ch, "ratio": max(ratios), "layers": layers,
                         "sensitivity_share": round(sum(f["evidence"]["sensitivity_share"] for f in fs), 4),
                         "per_input": [{"modules": f["modules"], **f["evidence"]} for f in fs]},
            "fix": f"AWQ (scales channel {ch} before rounding), LLM.int8, or INT8 for the {len(mods)} modules that "
                   "read it"})
    grouped.sort(key=lambda f: -f["evidence"]["ratio"])
    if len(grouped) <= keep:
        return grouped
    head, tail = grouped[: keep - 1], grouped[keep - 1:]
    mods = [m for f in tail for m in f["modules"]]
    ratios = [f["evidence"]["ratio"] for f in tail]
    head.append({
        "kind": "outlier_channels", "modules": mods,
        "finding": f"{len(tail)} more inputs with outlier channels ({min(ratios):g}-{max(ratios):g}x the median) "
                   f"feed {len(mods)} sensitive modules",
        "evidence": {"ratio": max(ratios), "findings": [f["finding"] for f in tail]},
        "fix": "AWQ, LLM.int8, or INT8 for those modules (listed in diagnosis.json)"})
    return head


def root_causes(diag: Dict[str, Any], plan: Plan, dcfg) -> List[Dict[str, Any]]:
    """Findings: each has kind, finding (what), evidence (numbers), fix (what to change), and the
    modules/layers the fix applies to. The planner reads kind/modules/layers."""
    out: List[Dict[str, Any]] = []
    sens = diag["sensitivity"]
    layers = {int(k): v for k, v in sens["layers"].items()}
    modules = sens.get("modules") or {}
    total_mod = sum(max(v, 0) for v in modules.values()) or 1e-12
    m = diag["metrics"]

    # 1. concentrated vs spread degradation
    if layers:
        top, share = _share_of_top(layers, 0.1)
        if share >= dcfg.concentrated_share:
            out.append({"kind": "concentrated_layers", "layers": sorted(top),
                        "finding": f"degradation is concentrated: layers {sorted(top)} (top 10%) hold "
                                   f"{100 * share:.0f}% of the layer sensitivity",
                        "evidence": {"share": round(share, 3), "sensitivity": {str(i): layers[i] for i in top}},
                        "fix": f"keep layers {sorted(top)} in higher precision (INT8 or FP16)"})
        else:
            out.append({"kind": "spread_evenly", "layers": [],
                        "finding": f"degradation is spread evenly: the top 10% of layers hold only "
                                   f"{100 * share:.0f}% of the sensitivity",
                        "evidence": {"share": round(share, 3)},
                        "fix": "use a smaller group size for every quantized module (e.g. 64 -> 32)"})
    # 2. outlier channels feeding sensitive modules
    sens_rank = sorted(modules, key=lambda n: -modules[n])
    sensitive = set(sens_rank[: max(1, len(sens_rank) // 10)])
    raw = []
    for r in diag["outliers"]:
        fo = r["float"]
        fed = [x for x in r["input_of"] if x in sensitive]
        if fo["n_outliers"] and fed:
            share = sum(modules.get(x, 0) for x in r["input_of"]) / total_mod
            ch, val = fo["top"][0]
            raw.append({"kind": "outlier_channels", "modules": fed,
                        "finding": f"outlier activation channel {ch} ({val:g} vs median {fo['median']:g}, "
                                   f"{fo['ratio']:g}x) feeds {', '.join(fed)}",
                        "evidence": {"channel": ch, "value": val, "median": fo["median"], "ratio": fo["ratio"],
                                     "n_outliers": fo["n_outliers"], "sensitivity_share": round(share, 4)},
                        "fix": f"AWQ (scales the outlier channel before rounding), LLM.int8, or INT8 for {', '.join(fed)}"})
    out += _group_outliers(raw, dcfg.max_outlier_findings)
    # 3. domain gap
    if diag["domains"]:
        worst = max(diag["domains"], key=lambda k: diag["domains"][k]["ppl_increase_pct"])
        best = min(diag["domains"], key=lambda k: diag["domains"][k]["ppl_increase_pct"])
        w, b = diag["domains"][worst], diag["domains"][best]
        calib_kinds = {data_mod.DOMAIN_KIND.get(d, d) for d in diag["calibration_domains"]}
        if worst not in calib_kinds and w["ppl_increase_pct"] > 1.5 * max(b["ppl_increase_pct"], 0.5):
            src = dcfg.domains[worst]
            out.append({"kind": "domain_gap", "domain": worst, "source": src,
                        "finding": f"the worst domain, {worst} (PPL +{w['ppl_increase_pct']}%), is absent from the "
                                   f"calibration data ({', '.join(diag['calibration_domains'])}); {best}: "
                                   f"+{b['ppl_increase_pct']}%",
                        "evidence": {d: v["ppl_increase_pct"] for d, v in diag["domains"].items()},
                        "fix": f"calibrate on {worst} data too: data.domains=[{', '.join(diag['calibration_domains'])}, {src}]"})
    # 4. embeddings / lm_head
    emb = [n for n in modules if n.endswith("lm_head") or "embed" in n]
    if emb:
        share = sum(modules[n] for n in emb) / total_mod
        if share > 0.05:
            out.append({"kind": "embeddings_sensitive", "modules": emb,
                        "finding": f"lm_head/embeddings hold {100 * share:.0f}% of the sensitivity",
                        "evidence": {"share": round(share, 3)}, "fix": "keep embeddings and lm_head in FP16"})
    # 5. don't trust perplexity alone
    q = m["quantized"]
    if m["ppl_increase_pct"] < dcfg.ppl_ok_pct and (q["kld_mean"] > dcfg.kld_bad or q["top1"] < dcfg.top1_bad):
        out.append({"kind": "ppl_hides_damage",
                    "finding": f"perplexity looks fine (+{m['ppl_increase_pct']:.2f}%) but the distribution moved: "
                               f"KLD {q['kld_mean']:.4f}, top-1 agreement {q['top1']:.3f}",
                    "evidence": {"ppl_increase_pct": m["ppl_increase_pct"], "kld_mean": q["kld_mean"],
                                 "top1": q["top1"]},
                    "fix": "gate on KLD / top-1 and task metrics, not perplexity alone"})
    # 6. symptoms in generations
    loops = [g for g in diag["generations"] if g["new_loop"]]
    refusals = [g for g in diag["generations"] if g["new_refusal"]]
    attn_share = sum(v for n, v in modules.items() if module_type(n) in ("q_proj", "k_proj", "v_proj", "o_proj")) / total_mod
    if loops:
        out.append({"kind": "repetition_loops", "finding": f"{len(loops)} of {len(diag['generations'])} probes loop "
                                                           f"only when quantized ({', '.join(g['domain'] for g in loops)})",
                    "evidence": {"prompts": [g["prompt"][:60] for g in loops], "attention_share": round(attn_share, 3)},
                    "fix": "give the attention projections of the most sensitive layers more precision"})
    if refusals:
        out.append({"kind": "refusals", "finding": f"{len(refusals)} probes refuse only when quantized",
                    "evidence": {"prompts": [g["prompt"][:60] for g in refusals]},
                    "fix": "keep embeddings and the first layers in higher precision"})
    diverged = [g["first_divergence"] for g in diag["generations"] if g["first_divergence"] is not None]
    if diverged:
        out.append({"kind": "divergence", "finding": f"{len(diverged)} of {len(diag['generations'])} greedy "
                                                      f"generations diverge from float; first divergence at token "
                                                      f"{min(diverged)} (median {sorted(diverged)[len(diverged) // 2]})",
                    "evidence": {"first_divergence": diverged}, "fix": "(a symptom: fixed by the findings above)"})
    return out


def plot_diagnosis(diag: Dict[str, Any], plots: Path) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    out = {}
    sens = diag["sensitivity"]
    layers = {int(k): v for k, v in sens["layers"].items()}
    if layers:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 1]})
        ks = sorted(layers)
        axes[0].bar(ks, [layers[k] for k in ks], color="#6366f1")
        axes[0].set_xlabel("decoder layer")
        axes[0].set_ylabel("KLD removed if restored to float")
        axes[0].set_title(f"layer sensitivity ({sens['method']})")
        types = sens["types"]
        axes[1].barh(list(types), list(types.values()), color="#10b981")
        axes[1].set_title("by module type")
        fig.tight_layout()
        p = plots / "sensitivity.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out["sensitivity"] = str(p)
    ch = diag["channel_errors"]
    if ch:
        fig, ax = plt.subplots(figsize=(10, 3.2))
        ks = sorted(ch, key=int)
        ax.bar([int(k) for k in ks], [ch[k]["over_10pct"] for k in ks], color="#f59e0b", label=">10% error")
        ax.bar([int(k) for k in ks], [ch[k]["over_50pct"] for k in ks], color="#dc2626", label=">50% error")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("output channels")
        ax.set_title("per-channel relative error of each layer's update (float input)")
        ax.legend()
        fig.tight_layout()
        p = plots / "channel_errors.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out["channel_errors"] = str(p)
    if diag["domains"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        d = diag["domains"]
        ax.bar(list(d), [v["ppl_increase_pct"] for v in d.values()], color="#0ea5e9")
        ax.set_ylabel("PPL increase %")
        ax.set_title("per-domain perplexity increase")
        fig.tight_layout()
        p = plots / "domains.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out["domains"] = str(p)
    return out
