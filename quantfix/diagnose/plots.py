"""The diagnosis's plots (PNG, embedded in the HTML report)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from quantfix.diagnose.findings import Diagnosis
from quantfix.plotting import figure


def plot_diagnosis(diag: Diagnosis, plots: Path) -> Dict[str, str]:
    """sensitivity.png, channel_errors.png and domains.png; returns {name: path}."""
    plots.mkdir(parents=True, exist_ok=True)
    out = {}
    sens = diag.sensitivity
    layers = sens.layers
    if layers:
        p = plots / "sensitivity.png"
        with figure(p, 1, 2, dpi=100, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 1]}) as (fig, axes):
            ks = sorted(layers)
            axes[0].bar(ks, [layers[k] for k in ks], color="#6366f1")
            axes[0].set_xlabel("decoder layer")
            axes[0].set_ylabel("KLD removed if restored to float")
            axes[0].set_title(f"layer sensitivity ({sens.method})")
            types = sens.types
            axes[1].barh(list(types), list(types.values()), color="#10b981")
            axes[1].set_title("by module type")
        out["sensitivity"] = str(p)
    ch = diag.channel_errors
    if ch:  # the mean and worst channel's relative error: counts over 10% saturate at W4 (every channel)
        p = plots / "channel_errors.png"
        with figure(p, dpi=100, figsize=(10, 3.2)) as (fig, ax):
            ks = sorted(ch, key=int)
            xs = [int(k) for k in ks]
            ax.bar(xs, [ch[k]["mean_rel_error"] for k in ks], color="#f59e0b", label="mean over output channels")
            ax.plot(xs, [ch[k]["max_rel_error"] for k in ks], "v", color="#dc2626", label="worst channel")
            ax.set_yscale("log")
            ax.set_xlabel("decoder layer")
            ax.set_ylabel("relative error (log)")
            ax.set_title("relative error of each layer's update, quantized vs float weights (float input)")
            ax.legend(fontsize=8)
        out["channel_errors"] = str(p)
    if diag.domains:
        p = plots / "domains.png"
        with figure(p, dpi=100, figsize=(5, 3.2)) as (fig, ax):
            d = diag.domains
            ax.bar(list(d), [v["ppl_increase_pct"] for v in d.values()], color="#0ea5e9")
            ax.set_ylabel("PPL increase %")
            ax.set_title("per-domain perplexity increase")
        out["domains"] = str(p)
    return out
