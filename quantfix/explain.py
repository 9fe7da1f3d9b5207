"""What a repair changed and why, in words: the change groups between plan 0 and the shipped plan
(``changes``), the findings that name them, what was applied to the modules a finding names
(``applied``), and a legend for the plan labels that occur (``legend``). Pure functions of plans,
findings and labels; ``report.py`` renders them."""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, Iterable, List, Tuple

from quantfix.arch import layer_index, module_type
from quantfix.diagnose.findings import Finding
from quantfix.plan import Plan
from quantfix.quantize.algorithms import Precision
from quantfix.runreport import ChangeGroup, Reason

# how a module's rounding reads in a sentence (the registry's summaries are for errors and docs)
ROUNDING = {"rtn": "RTN", "mse": "RTN-mse", "imatrix": "RTN-imatrix", "gptq": "GPTQ",
            "gptq_mse": "GPTQ-mse", "gptq_imatrix": "GPTQ-imatrix", "awq": "AWQ",
            "autoround": "AutoRound", "ckpt": "the checkpoint's own weights",
            "ckpt_approx": "the checkpoint's own weights (re-rounded at export)", "llm_int8": "LLM.int8",
            "nf4": "NF4"}
# the order change groups are listed in
KINDS = ("kept in float", "more bits", "smaller group", "other rounding", "larger group", "fewer bits", "other")
# findings that name no module but explain a kind of change (the planner reads them so: planner._step)
MODEL_WIDE = {"spread_evenly": "smaller group"}


def short_module(name: str) -> str:
    """``model.layers.11.mlp.down_proj`` -> ``layer 11 down_proj``; outside the blocks, the name."""
    i = layer_index(name)
    return f"layer {i} {module_type(name)}" if i is not None else name


def ratio_text(ratio: float) -> str:
    """1797.6 -> '1,798x'; 40.8 -> '40.8x'."""
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


def ranges(xs: Iterable[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10'."""
    xs = sorted(set(xs))
    parts, start = [], None
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            parts.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ", ".join(parts)


def short(f: Finding) -> str:
    """A finding in a few words: 'outlier channel 1229 (1,798x the median)'."""
    e = f.evidence
    if f.kind == "outlier_channels":
        if "channel" in e:
            return f"outlier channel {e['channel']} ({ratio_text(e['ratio'])} the median)"
        return f"outlier channels up to {ratio_text(e['ratio'])} the median in {len(e.get('findings', []))} more inputs"
    if f.kind == "concentrated_layers":
        which = f"layer {f.layers[0]} holds" if len(f.layers) == 1 else f"layers {ranges(f.layers)} hold"
        return f"{which} {100 * e['share']:.0f}% of the damage"
    if f.kind == "spread_evenly":
        return f"damage spread evenly (the top 10% of layers hold {100 * e['share']:.0f}%)"
    if f.kind == "embeddings_sensitive":
        return f"lm_head/embeddings hold {100 * e['share']:.0f}% of the damage"
    if f.kind == "routing_changes":
        return f"MoE routing changes in layers {ranges(f.layers)}"
    text = f.finding.split(":")[0]
    return text if len(text) <= 90 else text[:87] + "..."


def named_modules(f: Finding, universe: Iterable[str]) -> List[str]:
    """The modules of ``universe`` a finding names: by name, or through their decoder layer."""
    named, layers = set(f.modules), set(f.layers)
    return [n for n in universe if n in named or (layers and layer_index(n) in layers)]


def _kind(p0: Precision, p1: Precision) -> str:
    if p1.is_float:
        return "kept in float"
    if p1.bits != p0.bits:
        return "more bits" if p1.bits > p0.bits else "fewer bits"
    g0, g1 = p0.group_size or 1 << 30, p1.group_size or 1 << 30  # per channel: the largest group
    if g1 != g0:
        return "smaller group" if g1 < g0 else "larger group"
    return "other rounding" if p1.algorithm != p0.algorithm else "other"


def _what(p0: Precision, p1: Precision) -> str:
    """The change in words: '4 -> 5 bits, RTN -> GPTQ-imatrix'."""
    if p1.is_float:
        return "kept in float (16-bit)"
    parts = []
    if p1.bits != p0.bits:
        parts.append(f"{p0.bits}→{p1.bits} bits" if not p0.is_float else f"float→{p1.bits} bits")
    if p1.group_size != p0.group_size and not p0.is_float:
        parts.append(f"group {p0.group_size or 'per channel'}→{p1.group_size or 'per channel'}")
    if p1.symmetric != p0.symmetric:
        parts.append("symmetric→asymmetric" if p0.symmetric else "asymmetric→symmetric")
    if p1.algorithm != p0.algorithm:
        parts.append(f"{ROUNDING.get(p1.algorithm, p1.algorithm)} rounding (was {ROUNDING.get(p0.algorithm, p0.algorithm)})")
    return ", ".join(parts) or "same precision"


def changes(plan0: Plan, shipped: Plan, findings: List[Finding]) -> List[ChangeGroup]:
    """The modules the shipped plan stores otherwise than plan 0, grouped by (plan-0 label ->
    shipped label), each with the findings that name its modules or their layers (and a model-wide
    finding that explains its kind of change: spread_evenly for smaller groups)."""
    by_pair: Dict[Tuple[str, str], List[str]] = {}
    precisions: Dict[Tuple[str, str], Tuple[Precision, Precision]] = {}
    for name, p1 in shipped.modules.items():
        p0 = plan0.modules.get(name)
        if p0 is None or p0 == p1:
            continue
        key = (p0.label, p1.label)
        by_pair.setdefault(key, []).append(name)
        precisions[key] = (p0, p1)
    groups = []
    for key, names in by_pair.items():
        p0, p1 = precisions[key]
        kind = _kind(p0, p1)
        in_f = shipped.shapes[names[0]][1]
        saves = p1.bits_per_weight(in_f) < p0.bits_per_weight(in_f) - 1e-9
        groups.append(ChangeGroup(key[0], key[1], kind, _what(p0, p1), names, _reasons(names, kind, findings), saves))
    groups.sort(key=lambda g: (KINDS.index(g.kind), -g.count, g.after))
    return groups


def _reasons(names: List[str], kind: str, findings: List[Finding]) -> List[Reason]:
    out = []
    for f in findings:
        hit = named_modules(f, names)
        if not hit and MODEL_WIDE.get(f.kind) == kind:
            hit = list(names)
        if hit:
            out.append(Reason(f.kind, short(f), hit))
    return out


def unexplained(group: ChangeGroup) -> int:
    """How many of a group's modules no finding names (the planner chose them by sensitivity)."""
    named = {m for r in group.reasons for m in r.modules}
    return sum(1 for m in group.modules if m not in named)


def applied(modules: List[str], groups: List[ChangeGroup]) -> str:
    """What the shipped plan did to ``modules``: '12 of them to W6g64-gptq-imx, 3 to W8ch-imx, 2 unchanged'; a
    label with fewer bits per weight than plan 0's (a budget below it) says so: 'to W3g64a-gptq-imx (fewer bits
    than plan 0)'."""
    if not modules:
        return "-"
    after = {m: g.after + (" (fewer bits than plan 0)" if g.saves else "") for g in groups for m in g.modules}
    counts = Counter(after.get(m) for m in modules)
    parts = [f"{c} to {label}" for label, c in sorted(((k, v) for k, v in counts.items() if k), key=lambda t: -t[1])]
    if counts.get(None):
        parts.append(f"{counts[None]} unchanged")
    if len(modules) == 1:
        label = after.get(modules[0])
        return f"{short_module(modules[0])} " + (f"to {label}" if label else "unchanged")
    if len(counts) == 1:
        label = next(iter(counts))
        return f"all {len(modules)} modules " + (f"to {label}" if label else "unchanged")
    return f"{len(modules)} modules: " + ", ".join(parts)


# ---- the legend ---------------------------------------------------------------------------------

_LABEL = re.compile(r"^W(\d+)(?:g(\d+)|ch)(a?)(?:-(.+))?$")
_TAGS = {
    "": "round to nearest (RTN) with min/max scales",
    "mse": "round to nearest, clipping searched for the least weight error (mse)",
    "imx": "round to nearest, clipping searched on the calibration data's E[x^2] (imatrix)",
    "gptq": "GPTQ: rounding that compensates each column's error on the calibration data's Hessian",
    "gptq-mse": "GPTQ with the mse clipping search",
    "gptq-imx": "GPTQ with the imatrix clipping search (E[x^2] of the calibration data)",
    "awq": "AWQ: activation-aware per-channel scales, then round to nearest",
    "ar": "AutoRound: rounding and scales tuned per decoder block on the calibration data",
    "ckpt": "the existing checkpoint's own weights (exported exactly)",
    "ckpt~": "the existing checkpoint's own weights, re-rounded to an integer grid at export",
}
_OTHER = {"FP16": "kept in float (16-bit), not quantized",
          "LLM.int8": "bitsandbytes LLM.int8: int8 rows, outlier input columns computed in float"}


def parse_labels(summary: str) -> List[str]:
    """The labels of a plan summary: 'W4g64 x2, W8ch-imx x22' -> ['W4g64', 'W8ch-imx']."""
    return [part.strip().rsplit(" x", 1)[0] for part in summary.split(",") if part.strip()]


def legend(labels: Iterable[str]) -> List[str]:
    """One line per width (W4g64, W8ch, W4g64a) and per rounding suffix that occurs in ``labels``."""
    widths: Dict[str, str] = {}
    tags: Dict[str, str] = {}
    other: Dict[str, str] = {}
    for label in labels:
        m = _LABEL.match(label)
        if m is None:
            other[label] = _other(label)
            continue
        bits, group, asym, tag = int(m.group(1)), m.group(2), m.group(3), m.group(4) or ""
        width = label.split("-")[0]
        widths[width] = _width(bits, int(group) if group else 0, bool(asym))
        tags["(no suffix)" if not tag else f"-{tag}"] = _TAGS.get(tag, tag)
    return [f"{k}: {v}" for k, v in sorted(widths.items(), key=lambda kv: _width_order(kv[0]))] + \
        [f"{k}: {v}" for k, v in tags.items()] + [f"{k}: {v}" for k, v in other.items()]


def _width(bits: int, group: int, asym: bool) -> str:
    zero = f" and a {bits}-bit zero point (asymmetric)" if asym else ""
    if group:
        per_weight = bits + (16 + (bits if asym else 0)) / group
        return (f"{bits}-bit integers, one 16-bit scale per group of {group} input weights{zero} "
                f"({per_weight:.3g} bits per weight)")
    return f"{bits}-bit integers, one 16-bit scale per output channel{zero}"


def _width_order(width: str) -> Tuple[int, int]:
    m = re.match(r"W(\d+)(?:g(\d+))?", width)
    return (int(m.group(1)), -(int(m.group(2)) if m.group(2) else 1 << 30)) if m else (99, 0)


def _other(label: str) -> str:
    if label in _OTHER:
        return _OTHER[label]
    m = re.match(r"^NF4g(\d+)$", label)
    if m:
        return f"bitsandbytes NF4: 4-bit normal-float values, one scale per block of {m.group(1)}"
    return "see plan.yaml"
