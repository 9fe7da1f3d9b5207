"""Stage: report. report.json, a console summary table, and plots."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

from quantfix.runreport import RunReport

log = logging.getLogger(__name__)


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(report: RunReport) -> str:
    base = report.baseline.to_dict()
    rows = [("iter", "widths", "rounding", "avg bits", "size MB", "PPL", "dPPL %", "KLD mean", "KLD p99", "top-1",
             "pass")]
    rows.append(("fp", "float baseline", "", "16.00", _fmt(report.baseline_size_bytes / 1e6, ".1f"),
                 _fmt(base["ppl"]), "0.0", "0", "0", "1.000", ""))
    for it in report.trials:
        m = it.metrics.to_dict()
        widths = it.widths or it.plan_summary
        rows.append((str(it.id), widths if len(widths) <= 48 else widths[:45] + "...",
                     (it.rounding or "")[:36], _fmt(it.avg_bits, ".2f"),
                     _fmt(it.size_bytes / 1e6, ".1f"), _fmt(m["ppl"]),
                     _fmt(100 * (m["ppl"] / base["ppl"] - 1), ".1f"), _fmt(m["kld_mean"], ".4f"),
                     _fmt(m["kld_p99"], ".3f"), _fmt(m["top1"]), "yes" if it.passed else "no"))
    fin = report.final
    v = fin.verification if fin is not None else None
    if v is not None and v.metrics is not None:
        vm = v.metrics.to_dict()
        rows.append(("ckpt", "reloaded from disk", "", _fmt(fin.avg_bits, ".2f"),
                     _fmt(v.checkpoint_bytes / 1e6, ".1f"), _fmt(vm["ppl"]),
                     _fmt(100 * (vm["ppl"] / base["ppl"] - 1), ".1f"), _fmt(vm["kld_mean"], ".4f"),
                     _fmt(vm["kld_p99"], ".3f"), _fmt(vm["top1"]), "yes" if fin.passed else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_iterations(run: RunReport, out_dir: Path) -> Path | None:
    """Average bits vs KLD (and PPL) of every evaluated plan; the final one circled."""
    report = run.to_dict()
    its: List[Dict[str, Any]] = report["iterations"]
    if not its:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    base_ppl = report["baseline"]["ppl"]
    for ax, key, label in ((axes[0], "kld_mean", "mean KL divergence vs float"),
                           (axes[1], "ppl", "perplexity")):
        xs = [it["avg_bits"] for it in its]
        ys = [it["metrics"][key] for it in its]
        colors = ["tab:green" if it["passed"] else "tab:red" for it in its]
        ax.scatter(xs, ys, c=colors, zorder=2)
        # measured Pareto frontier: plans no other plan beats on both bits and this metric
        pts = sorted(zip(xs, ys))
        front, best = [], float("inf")
        for x, y in pts:
            if y < best:
                front.append((x, y))
                best = y
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:green", alpha=0.5,
                label="measured frontier")
        pred = (report.get("pareto") or {}).get("predicted")
        if key == "kld_mean" and pred:
            ax.plot([p[0] for p in pred], [p[1] for p in pred], color="tab:purple", ls="--", lw=1,
                    label="predicted (diagnosis)")
            ax.set_yscale("log")
            ax.legend()
        for it, x, y in zip(its, xs, ys):
            ax.annotate(str(it["iter"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if key == "ppl":
            ax.axhline(base_ppl, ls="--", color="tab:blue", label="float")
            lim = report.get("ppl_limit")
            if lim:
                ax.axhline(lim, ls=":", color="tab:orange", label="threshold")
            ax.legend()
        elif report.get("kld_limit"):
            ax.axhline(report["kld_limit"], ls=":", color="tab:orange", label="threshold")
            ax.legend()
        ax.set_xlabel("average bits per weight (planned modules)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"quantfix iterations: {report['model']} (green = passed)")
    fig.tight_layout()
    path = plots / "iterations.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- human-readable report: the same blocks rendered as Markdown and as HTML ------------------

def _blocks(report: Dict[str, Any], out_dir: Path, diag=None) -> List[tuple]:
    """("h", text) | ("p", text) | ("ul", [items]) | ("table", header, rows) | ("img", path, caption)."""
    b: List[tuple] = [("h1", f"quantfix report: {report['model']}")]
    b += _verdict(report)
    q = report.get("quantized")
    if isinstance(q, dict):  # plan 0 is an existing checkpoint
        text = (f"Plan 0 is the existing checkpoint {q['path']} (float parent {report['model']}): {q['summary']}. "
                f"{q['modules_exact_grid']} modules on an integer grid compressed-tensors stores exactly"
                + (f", {q['modules_approx_grid']} re-rounded to one at export" if q["modules_approx_grid"] else "")
                + ". Modules the repair leaves alone keep the checkpoint's own weights (ckpt).")
        b += [("h2", "Existing checkpoint"), ("p", text)] + ([("ul", q["notes"][:8])] if q.get("notes") else [])
        if (report.get("final") or {}).get("llama_quantize_overrides"):
            b.append(("p", f"llama.cpp: the repaired widths as llama-quantize --tensor-type overrides, with the command "
                           f"line, in {Path(report['final']['llama_quantize_overrides']).name}."))
    if diag is not None:
        b += _symptoms(diag) + _causes(diag)
    if report["iterations"]:
        b += _iterations(report, out_dir)
    if report.get("final"):
        b += _final(report)
    return b


def _verdict(report: Dict[str, Any]) -> List[tuple]:
    base, fin, its = report["baseline"], report.get("final") or {}, report["iterations"]
    if fin:
        vm = fin.get("verified_metrics") or {}
        verdict = (f"**{'PASSED' if fin.get('passed') else 'FAILED'}**: {fin['stop_reason']}. Final plan "
                   f"{fin['plan_summary']} ({fin['avg_bits']:.2f} average bits, {fin['size_bytes'] / 1e6:.1f} MB) after "
                   f"{fin['trials']} trials.")
        if vm:
            verdict += (f" The checkpoint reloaded from disk measures PPL {vm['ppl']:.3f} "
                        f"(float {base['ppl']:.3f}, {100 * (vm['ppl'] / base['ppl'] - 1):+.2f}%), "
                        f"mean KLD {vm['kld_mean']:.4f}, top-1 agreement {vm['top1']:.3f}.")
        return [("h2", "Verdict"), ("p", verdict)]
    if its:
        m = its[0]["metrics"]
        result = "passes" if its[0]["passed"] else "fails: " + "; ".join(its[0]["failed"])
        return [("h2", "Verdict"),
                ("p", f"Diagnosis of plan {its[0]['plan_summary']}: PPL {m['ppl']:.3f} vs float {base['ppl']:.3f} "
                      f"({100 * (m['ppl'] / base['ppl'] - 1):+.2f}%), mean KLD {m['kld_mean']:.4f}, "
                      f"top-1 {m['top1']:.3f}; {result}.")]
    return []


def _symptoms(diag) -> List[tuple]:
    q = diag.metrics["quantized"]
    sym = [f"Perplexity {diag.metrics['ppl_increase_pct']:+.2f}%; mean KLD {q['kld_mean']:.4f} "
           f"(p99 {q['kld_p99']:.3f}, max {q['kld_max']:.2f}); top-1 agreement {q['top1']:.3f}."]
    if diag.domains:
        sym.append("Per-domain perplexity increase: " + ", ".join(
            f"{k} {v['ppl_increase_pct']:+.1f}% (PPL {v['ppl_float']} -> {v['ppl_quantized']})"
            for k, v in diag.domains.items()) + ".")
    gens = diag.generations
    if gens:
        loops = sum(g["new_loop"] for g in gens)
        refus = sum(g["new_refusal"] for g in gens)
        div = [g["first_divergence"] for g in gens if g["first_divergence"] is not None]
        sym.append(f"Probes: {len(gens)} prompts; {len(div)} diverge from float greedy output; "
                   f"{loops} new repetition loops; {refus} new refusals.")
    return [("h2", "Symptoms found"), ("ul", sym)]


def _causes(diag) -> List[tuple]:
    b: List[tuple] = [("h2", "Root causes and fixes")]
    rows = [[f.kind, f.finding, f.fix, json.dumps(f.evidence, default=str)[:160]] for f in diag.findings]
    b.append(("table", ["kind", "finding", "fix", "evidence"], rows))
    sens = diag.sensitivity
    top = diag.top_layers(8)
    b.append(("p", f"Sensitivity ({sens.method}, {sens.seconds:.1f} s): most sensitive layers "
                   + ", ".join(f"{i} ({sens.layers[i]:.4f})" for i in top) + "; by module type: "
                   + ", ".join(f"{k} {v:.4f}" for k, v in sorted(sens.types.items(), key=lambda t: -t[1])) + "."))
    for key, cap in (("sensitivity", "Estimated KLD removed by restoring each layer / module type to float"),
                     ("channel_errors", "Output channels with >10% / >50% relative error per layer"),
                     ("domains", "Perplexity increase per domain")):
        if key in diag.plots:
            b.append(("img", diag.plots[key], cap))
    outl = diag.outliers[:6]
    if outl:
        b.append(("h3", "Activation outliers (largest max/median channel ratio)"))
        b.append(("table", ["input of", "top channel", "value", "median", "ratio", "outliers", "quantized max"],
                  [[", ".join(o["input_of"]), o["float"]["top"][0][0], o["float"]["top"][0][1], o["float"]["median"],
                    o["float"]["ratio"], o["float"]["n_outliers"], (o["quantized"] or {}).get("max", "-")] for o in outl]))
        for path in diag.plots.get("histograms", [])[:4]:
            b.append(("img", path, f"Per-channel activation absmax: {Path(path).stem[9:]}"))
    if diag.generations:
        b.append(("h3", "Probe generations (float vs quantized)"))
        b.append(("table", ["domain", "prompt", "float", "quantized", "diverges at", "loop"],
                  [[g["domain"], g["prompt"][:50], g["float"][:90], g["quantized"][:90], g["first_divergence"],
                    "NEW" if g["new_loop"] else ""] for g in diag.generations]))
    return b


def _iterations(report: Dict[str, Any], out_dir: Path) -> List[tuple]:
    its = report["iterations"]
    k0, b0 = its[0]["metrics"]["kld_mean"], its[0]["avg_bits"]
    rows = []
    for it in its:
        m = it["metrics"]
        drivers = ", ".join(f"{k} x{v}" for k, v in (it.get("drivers") or {}).items()) or it.get("note", "")
        action = it.get("action") or "; ".join(f"{k} x{v}" for k, v in (it.get("actions") or {}).items()) or "-"
        added = it["avg_bits"] - b0
        bought = f"{(k0 - m['kld_mean']) / added:.3f}" if added > 1e-6 else "-"
        err = it.get("prediction_error_pct")
        rows.append([it["iter"], it["plan_summary"], f"{it['avg_bits']:.2f}", f"{m['ppl']:.3f}",
                     f"{m['kld_mean']:.4f}", f"{m['top1']:.3f}", it.get("predicted_kld", "-"),
                     "-" if err is None else f"{err:+.0f}%", action, bought,
                     "pass" if it["passed"] else "; ".join(it["failed"]), drivers])
    b: List[tuple] = [("h2", "Fixes applied per iteration"),
                      ("table", ["iter", "plan", "avg bits", "PPL", "KLD", "top-1", "predicted KLD", "prediction error",
                                 "action", "KLD removed per added bit (vs plan 0)", "result", "why (findings)"], rows)]
    errs = sorted(abs(it["prediction_error_pct"]) for it in its if it.get("prediction_error_pct") is not None)
    if errs:
        b.append(("p", f"Prediction error (predicted vs measured KLD) over {len(errs)} predicted trials: median "
                       f"{errs[len(errs) // 2]:.0f}%, largest {errs[-1]:.0f}%."))
    rec = report.get("recalibration")
    if rec:
        before, after = rec.get("domains_before_ppl") or {}, rec.get("domains_after_ppl") or {}
        b.append(("p", f"Recalibration ({rec['finding']}): calibration domains {rec['domains_before']} -> "
                       f"{rec['domains_after']}; plan 0 per-domain PPL increase before -> after: " + ", ".join(
                           f"{d} {before[d]['ppl_increase_pct']:+.1f}% -> {after[d]['ppl_increase_pct']:+.1f}%"
                           for d in before if d in after) + "."))
    task_rows = _task_rows(report)
    if task_rows:
        b.append(("h3", "Task metrics per iteration (float -> quantized, points)"))
        b.append(("table", ["iter", "task", "metric", "delta", "stderr", "verdict", "time"], task_rows))
    if (out_dir / "plots" / "iterations.png").exists():
        b.append(("img", str(out_dir / "plots" / "iterations.png"), "Every plan tried: average bits vs KLD and PPL"))
    return b


def _task_rows(report: Dict[str, Any]) -> List[list]:
    rows = []
    for t, r in (report.get("baseline_tasks") or {}).items():
        rows.append(["fp", t, ", ".join(f"{k} {100 * v:.1f}" if k != "perplexity" else f"ppl {v:.2f}"
                                        for k, v in r["metrics"].items()), "", "", "", f"{r['seconds']:.0f}s"])
    for it in report["iterations"]:
        for t, c in (it.get("tasks") or {}).items():
            status = "FAIL" if c["failed"] else ("within noise" if c["within_noise"] else "ok")
            rows.append([it["iter"], t, f"{c['metric']} {c['base']:.2f} -> {c['quant']:.2f}", f"{c['delta']:+.2f}",
                         f"{c['stderr']:.2f}", status + ("" if c.get("checked") else " (not gated)"),
                         f"{c.get('seconds', 0):.0f}s"])
    return rows


def _final(report: Dict[str, Any]) -> List[tuple]:
    base, fin = report["baseline"], report["final"]
    items = [f"Float baseline: PPL {base['ppl']:.3f} on {base['n_tokens']} tokens"]
    if fin.get("verified_metrics"):
        vm = fin["verified_metrics"]
        items.append(f"Checkpoint `{fin.get('checkpoint')}` ({fin.get('checkpoint_bytes', 0) / 1e6:.1f} MB on disk), "
                     f"reloaded with AutoModelForCausalLM: PPL {vm['ppl']:.3f}, KLD {vm['kld_mean']:.4f} "
                     f"(p99 {vm['kld_p99']:.3f}), top-1 {vm['top1']:.3f}")
    items.append("Wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in report.get("timings_s", {}).items()))
    items.append("Peak memory: " + ", ".join(f"{k} {v}" for k, v in report.get("memory", {}).items()))
    return [("h2", "Final numbers"), ("ul", items)]


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: List[tuple], out_dir: Path) -> str:
    lines: List[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind.startswith("h"):
            lines += ["#" * int(kind[1]) + " " + blk[1], ""]
        elif kind == "p":
            lines += [blk[1], ""]
        elif kind == "ul":
            lines += [f"- {x}" for x in blk[1]] + [""]
        elif kind == "table":
            lines.append("| " + " | ".join(blk[1]) + " |")
            lines.append("|" + "---|" * len(blk[1]))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in blk[2]]
            lines.append("")
        elif kind == "img":
            rel = Path(blk[1]).resolve().relative_to(out_dir.resolve()) if Path(blk[1]).resolve().is_relative_to(out_dir.resolve()) else blk[1]
            lines += [f"![{blk[2]}]({rel})", ""]
    return "\n".join(lines)


def render_html(blocks: List[tuple], out_dir: Path) -> str:
    import base64
    import html
    import re

    def inline(t: str) -> str:
        t = html.escape(str(t))
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", t)

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>quantfix report</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;"
             "padding:3px 6px;vertical-align:top}th{background:#f3f4f6}img{max-width:100%;border:1px solid #eee}"
             "figcaption{font-size:12px;color:#555;margin-bottom:1.5em}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind.startswith("h"):
            parts.append(f"<{kind}>{inline(blk[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{inline(blk[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{inline(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            parts.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in blk[1]) + "</tr>" +
                         "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in blk[2]) +
                         "</table>")
        elif kind == "img":
            p = Path(blk[1])
            if p.exists():  # embedded, so the HTML file stands alone
                data = base64.b64encode(p.read_bytes()).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{inline(blk[2])}"
                             "</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_human(run: RunReport, out_dir: Path, diagnosis=None) -> None:
    """report.md and report.html (plots embedded) from the report and, when there is one, the diagnosis."""
    report = run.to_dict()
    blocks = _blocks(report, out_dir, diagnosis)
    (out_dir / "report.md").write_text(render_markdown(blocks, out_dir))
    (out_dir / "report.html").write_text(render_html(blocks, out_dir))
