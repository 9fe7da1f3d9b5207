"""Stage: report. report.json, a console summary table, and plots."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

log = logging.getLogger(__name__)


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(report: Dict[str, Any]) -> str:
    base = report["baseline"]
    rows = [("iter", "plan", "avg bits", "size MB", "PPL", "dPPL %", "KLD mean", "KLD p99", "top-1", "pass")]
    rows.append(("fp", "float baseline", "16.00", _fmt(report.get("baseline_size_bytes", 0) / 1e6, ".1f"),
                 _fmt(base["ppl"]), "0.0", "0", "0", "1.000", ""))
    for it in report["iterations"]:
        m = it["metrics"]
        rows.append((str(it["iter"]), it["plan_summary"][:46], _fmt(it["avg_bits"], ".2f"),
                     _fmt(it["size_bytes"] / 1e6, ".1f"), _fmt(m["ppl"]),
                     _fmt(100 * (m["ppl"] / base["ppl"] - 1), ".1f"), _fmt(m["kld_mean"], ".4f"),
                     _fmt(m["kld_p99"], ".3f"), _fmt(m["top1"]), "yes" if it["passed"] else "no"))
    fin = report.get("final") or {}
    vm = fin.get("verified_metrics")
    if vm:
        rows.append(("ckpt", "reloaded from disk", _fmt(fin.get("avg_bits"), ".2f"),
                     _fmt(fin.get("checkpoint_bytes", 0) / 1e6, ".1f"), _fmt(vm["ppl"]),
                     _fmt(100 * (vm["ppl"] / base["ppl"] - 1), ".1f"), _fmt(vm["kld_mean"], ".4f"),
                     _fmt(vm["kld_p99"], ".3f"), _fmt(vm["top1"]), "yes" if fin.get("passed") else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(report: Dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def plot_iterations(report: Dict[str, Any], out_dir: Path) -> Path | None:
    """Average bits vs KLD (and PPL) of every evaluated plan; the final one circled."""
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
        ax.plot(xs, ys, color="0.7", zorder=1)
        ax.scatter(xs, ys, c=colors, zorder=2)
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
