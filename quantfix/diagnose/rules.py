"""The rule engine: turn a diagnosis's measurements into findings (root causes with their
evidence and a fix the planner can act on). One function per rule; ``root_causes`` runs them all."""
from __future__ import annotations

import math
from typing import Any, Dict, List

from quantfix import data as data_mod
from quantfix.diagnose.findings import Diagnosis, Finding
from quantfix.arch import ATTENTION_ROLES, RESIDUAL_ROLES, module_role
from quantfix.plan import layer_index, module_type


def _share_of_top(values: Dict[Any, float], frac: float = 0.1):
    items = sorted(values.items(), key=lambda kv: -kv[1])
    total = sum(max(v, 0.0) for _, v in items) or 1e-12
    k = max(1, math.ceil(frac * len(items)))
    return [key for key, _ in items[:k]], sum(max(v, 0.0) for _, v in items[:k]) / total




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


def _group_outliers(raw: List[Finding], keep: int) -> List[Finding]:
    """One finding per residual-stream channel (the same channel index feeds the attention and MLP
    inputs (q/k/v, gate/up, c_attn, query_key_value, fc1, experts) of
    many layers: one cause, not one finding per layer), the rest per input; beyond ``keep`` findings
    (by outlier ratio) the tail is merged into one, so the report stays readable. The planner
    reads only kind and modules, which the merged findings keep in full."""
    by_channel: Dict[int, List[Finding]] = {}
    rest = []
    for f in raw:
        if f.modules and {module_role(m) for m in f.modules} <= RESIDUAL_ROLES:  # read the (normed) residual stream
            by_channel.setdefault(f.evidence["channel"], []).append(f)
        else:
            rest.append(f)
    grouped = list(rest)
    for ch, fs in by_channel.items():
        if len(fs) == 1:
            grouped.append(fs[0])
            continue
        mods = [m for f in fs for m in f.modules]
        layers = sorted({layer_index(m) for m in mods if layer_index(m) is not None})
        ratios = [f.evidence["ratio"] for f in fs]
        types = sorted({module_type(m) for m in mods})
        grouped.append(Finding(
            "outlier_channels", modules=mods,
            finding=f"residual-stream channel {ch} is an outlier ({min(ratios):g}-{max(ratios):g}x the median "
                    f"channel) in the inputs of {len(layers)} layers ({_ranges(layers)}; {', '.join(types)})",
            evidence={"channel": ch, "ratio": max(ratios), "layers": layers,
                      "sensitivity_share": round(sum(f.evidence["sensitivity_share"] for f in fs), 4),
                      "per_input": [{"modules": f.modules, **f.evidence} for f in fs]},
            fix=f"AWQ (scales channel {ch} before rounding), LLM.int8, or INT8 for the {len(mods)} modules that "
                "read it"))
    grouped.sort(key=lambda f: -f.evidence["ratio"])
    if len(grouped) <= keep:
        return grouped
    head, tail = grouped[: keep - 1], grouped[keep - 1:]
    mods = [m for f in tail for m in f.modules]
    ratios = [f.evidence["ratio"] for f in tail]
    head.append(Finding(
        "outlier_channels", modules=mods,
        finding=f"{len(tail)} more inputs with outlier channels ({min(ratios):g}-{max(ratios):g}x the median) "
                f"feed {len(mods)} sensitive modules",
        evidence={"ratio": max(ratios), "findings": [f.finding for f in tail]},
        fix="AWQ, LLM.int8, or INT8 for those modules (listed in diagnosis.json)"))
    return head


def root_causes(diag: Diagnosis, dcfg) -> List[Finding]:
    """Every rule's findings, in a fixed order. ``dcfg`` is the DiagnoseConfig (verdict thresholds)."""
    modules = diag.sensitivity.modules or {}
    return (_concentration(diag.sensitivity.layers, dcfg) + _outliers(diag, modules, dcfg) +
            _calibration_mismatch(diag) + _domain_gap(diag, dcfg) + _embeddings(modules) + _ppl_hides_damage(diag, dcfg) +
            _generation_symptoms(diag, modules) + _routing_changes(diag))


ROUTING_CHANGE = 0.05  # share of tokens whose top-k experts change: beyond it the router's choice moved


def _routing_changes(diag: Diagnosis) -> List[Finding]:
    """MoE: quantization changes which experts the tokens go to (the router reads the quantized
    attention output of its layer, and earlier layers' errors)."""
    layers = (diag.routing or {}).get("layers") or {}
    moved = sorted(int(i) for i, share in layers.items() if share > ROUTING_CHANGE)
    if not moved:
        return []
    worst = max(layers.values())
    experts = [e["expert"] for e in diag.routing.get("experts", [])][:3]
    return [Finding("routing_changes", layers=moved,
                    finding=f"quantization re-routes tokens in {len(moved)} MoE layers ({_ranges(moved)}): up to "
                            f"{100 * worst:.0f}% of tokens reach another top-k expert set"
                            + (f"; most sensitive experts: {', '.join(experts)}" if experts else ""),
                    evidence={"layers": layers, "experts": diag.routing.get("experts", [])},
                    fix="more precision for the attention of those layers (the router reads its output) and for "
                        "the experts (one group)")]


def _concentration(layers: Dict[int, float], dcfg) -> List[Finding]:
    """Concentrated (a few layers hold most of the damage) or spread evenly."""
    if not layers:
        return []
    top, share = _share_of_top(layers, 0.1)
    if share >= dcfg.concentrated_share:
        return [Finding("concentrated_layers", layers=sorted(top),
                        finding=f"degradation is concentrated: layers {sorted(top)} (top 10%) hold "
                                f"{100 * share:.0f}% of the layer sensitivity",
                        evidence={"share": round(share, 3), "sensitivity": {str(i): layers[i] for i in top}},
                        fix=f"keep layers {sorted(top)} in higher precision (INT8 or FP16)")]
    return [Finding("spread_evenly", finding=f"degradation is spread evenly: the top 10% of layers hold only "
                                             f"{100 * share:.0f}% of the sensitivity",
                    evidence={"share": round(share, 3)},
                    fix="use a smaller group size for every quantized module (e.g. 64 -> 32)")]


def _outliers(diag: Diagnosis, modules: Dict[str, float], dcfg) -> List[Finding]:
    """Outlier activation channels that feed sensitive modules (grouped per residual channel)."""
    total_mod = sum(max(v, 0) for v in modules.values()) or 1e-12
    sens_rank = sorted(modules, key=lambda n: -modules[n])
    sensitive = set(sens_rank[: max(1, len(sens_rank) // 10)])
    raw = []
    for r in diag.outliers:
        fo = r["float"]
        fed = [x for x in r["input_of"] if x in sensitive]
        if fo["n_outliers"] and fed:
            share = sum(modules.get(x, 0) for x in r["input_of"]) / total_mod
            ch, val = fo["top"][0]
            raw.append(Finding(
                "outlier_channels", modules=fed,
                finding=f"outlier activation channel {ch} ({val:g} vs median {fo['median']:g}, "
                        f"{fo['ratio']:g}x) feeds {', '.join(fed)}",
                evidence={"channel": ch, "value": val, "median": fo["median"], "ratio": fo["ratio"],
                          "n_outliers": fo["n_outliers"], "sensitivity_share": round(share, 4)},
                fix=f"AWQ (scales the outlier channel before rounding), LLM.int8, or INT8 for {', '.join(fed)}"))
    return _group_outliers(raw, dcfg.max_outlier_findings)


def _calibration_mismatch(diag: Diagnosis) -> List[Finding]:
    """A calibrated algorithm (GPTQ, AWQ, imatrix) that does no better than plain RTN at the same
    widths on the deployment text: what it learned from the calibration data does not transfer."""
    c = diag.calibration_check
    # an existing checkpoint may be plain RTN itself: only worse than RTN is evidence there
    bound = 1.05 if not diag.calibration_domains else 0.95
    if not c or c["kld"] < bound * c["rtn_kld"] or diag.eval_source in diag.calibration_domains:
        return []
    kind = data_mod.DOMAIN_KIND.get(diag.eval_source, diag.eval_source)
    evidence = {**c, "per_domain_ppl_increase": {d: v["ppl_increase_pct"] for d, v in diag.domains.items()}}
    pattern = ", ".join(f"{d} {v:+g}%" for d, v in evidence["per_domain_ppl_increase"].items())
    if not diag.calibration_domains:  # an existing checkpoint: its calibration set is unknown
        return [Finding("calibration_mismatch", domain=kind, source=diag.eval_source, evidence=evidence,
                        finding=f"the checkpoint does no better than plain RTN at its own scheme on the "
                                f"{diag.eval_source} text (KLD {c['kld']:.4f} vs {c['rtn_kld']:.4f}); its calibration "
                                f"set is unknown, but a calibrated algorithm worse than none points to calibration "
                                f"data unlike this text" + (f" (per-domain PPL increase: {pattern})" if pattern else ""),
                        fix=f"requantize from the float model with calibration on this text: data.domains=["
                            f"{diag.eval_source}] (quantfix repairs from the float parent)")]
    calib = ", ".join(diag.calibration_domains)
    return [Finding("calibration_mismatch", domain=kind, source=diag.eval_source, evidence=evidence,
                    finding=f"{'/'.join(c['algorithms'])} calibrated on {calib} does no better than plain RTN at the "
                            f"same widths on the {diag.eval_source} text (KLD {c['kld']:.4f} vs {c['rtn_kld']:.4f}): "
                            "the calibration data does not look like the deployment data",
                    fix=f"calibrate on the deployment text too: data.domains=[{calib}, {diag.eval_source}]")]


def _domain_gap(diag: Diagnosis, dcfg) -> List[Finding]:
    """The worst domain is far worse than the best and its text is absent from the calibration
    data. Judged by source, not by kind: Python's docs (pydoc) count as prose but calibrate a model
    for WikiText-2 no better than RTN does."""
    if not diag.domains:
        return []
    worst = max(diag.domains, key=lambda k: diag.domains[k]["ppl_increase_pct"])
    best = min(diag.domains, key=lambda k: diag.domains[k]["ppl_increase_pct"])
    w, b = diag.domains[worst], diag.domains[best]
    src = dcfg.domains[worst]
    if not diag.calibration_domains:  # an existing checkpoint: its calibration data is unknown, not absent
        return []
    if src in diag.calibration_domains or w["ppl_increase_pct"] <= 1.5 * max(b["ppl_increase_pct"], 0.5):
        return []
    calib = ", ".join(diag.calibration_domains)
    return [Finding("domain_gap", domain=worst, source=src,
                    finding=f"the worst domain, {worst} (PPL {w['ppl_increase_pct']:+g}%), is absent from the "
                            f"calibration data ({calib}); {best}: {b['ppl_increase_pct']:+g}%",
                    evidence={d: v["ppl_increase_pct"] for d, v in diag.domains.items()},
                    fix=f"calibrate on {worst} data too: data.domains=[{calib}, {src}]")]


def _embeddings(modules: Dict[str, float]) -> List[Finding]:
    emb = [n for n in modules if n.endswith("lm_head") or "embed" in n]
    if not emb:
        return []
    share = sum(modules[n] for n in emb) / (sum(max(v, 0) for v in modules.values()) or 1e-12)
    if share <= 0.05:
        return []
    return [Finding("embeddings_sensitive", modules=emb, finding=f"lm_head/embeddings hold {100 * share:.0f}% of the "
                                                                 "sensitivity",
                    evidence={"share": round(share, 3)}, fix="keep embeddings and lm_head in FP16")]


def _ppl_hides_damage(diag: Diagnosis, dcfg) -> List[Finding]:
    """Perplexity looks fine while the next-token distribution moved: don't trust PPL alone."""
    m = diag.metrics
    q = m["quantized"]
    if not (m["ppl_increase_pct"] < dcfg.ppl_ok_pct and (q["kld_mean"] > dcfg.kld_bad or q["top1"] < dcfg.top1_bad)):
        return []
    return [Finding("ppl_hides_damage",
                    finding=f"perplexity looks fine ({m['ppl_increase_pct']:+.2f}%) but the distribution moved: "
                            f"KLD {q['kld_mean']:.4f}, top-1 agreement {q['top1']:.3f}",
                    evidence={"ppl_increase_pct": m["ppl_increase_pct"], "kld_mean": q["kld_mean"], "top1": q["top1"]},
                    fix="gate on KLD / top-1 and task metrics, not perplexity alone")]


def _generation_symptoms(diag: Diagnosis, modules: Dict[str, float]) -> List[Finding]:
    """Repetition loops, refusals and divergence in the probes' greedy generations."""
    gens = diag.generations
    out = []
    total_mod = sum(max(v, 0) for v in modules.values()) or 1e-12
    loops = [g for g in gens if g["new_loop"]]
    refusals = [g for g in gens if g["new_refusal"]]
    attn_share = sum(v for n, v in modules.items() if module_role(n) in ATTENTION_ROLES) / total_mod
    if loops:
        out.append(Finding("repetition_loops", finding=f"{len(loops)} of {len(gens)} probes loop only when quantized "
                                                       f"({', '.join(g['domain'] for g in loops)})",
                           evidence={"prompts": [g["prompt"][:60] for g in loops], "attention_share": round(attn_share, 3)},
                           fix="give the attention projections of the most sensitive layers more precision"))
    if refusals:
        out.append(Finding("refusals", finding=f"{len(refusals)} probes refuse only when quantized",
                           evidence={"prompts": [g["prompt"][:60] for g in refusals]},
                           fix="keep embeddings and the first layers in higher precision"))
    diverged = [g["first_divergence"] for g in gens if g["first_divergence"] is not None]
    if diverged:
        out.append(Finding("divergence", finding=f"{len(diverged)} of {len(gens)} greedy generations diverge from float; "
                                                 f"first divergence at token {min(diverged)} (median "
                                                 f"{sorted(diverged)[len(diverged) // 2]})",
                           evidence={"first_divergence": diverged}, fix="(a symptom: fixed by the findings above)"))
    return out
