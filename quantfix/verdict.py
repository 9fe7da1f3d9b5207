"""Verdicts: which thresholds a measured plan fails, and the KLD a plan may reach to pass them."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from quantfix.config import ThresholdsConfig
from quantfix.evaluate import Metrics


def nonfinite(m: Metrics) -> List[str]:
    """One failure per metric that is NaN or infinite: no threshold can pass it."""
    return [f"{label} is {v} (non-finite)" for label, v in (("PPL", m.ppl), ("KLD", m.kld_mean), ("top-1", m.top1))
            if not math.isfinite(v)]


def check(m: Metrics, base: Metrics, t: ThresholdsConfig) -> List[str]:
    """The thresholds a metric set fails (empty = passed). A non-finite metric always fails,
    whatever the thresholds (a comparison with NaN is always false)."""
    fails = nonfinite(m)
    if fails:
        return fails
    inc_pct = 100 * (m.ppl / base.ppl - 1)
    if t.max_ppl_increase_pct is not None and inc_pct > t.max_ppl_increase_pct:
        fails.append(f"PPL +{inc_pct:.2f}% > {t.max_ppl_increase_pct}%")
    if t.max_ppl_increase_abs is not None and m.ppl - base.ppl > t.max_ppl_increase_abs:
        fails.append(f"PPL +{m.ppl - base.ppl:.3f} > {t.max_ppl_increase_abs}")
    if t.max_kld_mean is not None and m.kld_mean > t.max_kld_mean:
        fails.append(f"KLD {m.kld_mean:.4f} > {t.max_kld_mean}")
    if t.min_top1 is not None and m.top1 < t.min_top1:
        fails.append(f"top-1 {m.top1:.3f} < {t.min_top1}")
    return fails


def task_checks(base: Dict[str, Any], quant: Dict[str, Any], t: ThresholdsConfig) -> Tuple[Dict[str, dict], List[str]]:
    """Compare every task's metrics with the float baseline; failures name the task and metric."""
    from quantfix import tasks as tasks_mod

    rows, fails = {}, []
    for name, q in quant.items():
        th = t.tasks.get(name) if name in t.tasks else None
        metric = (th.metric if th is not None and th.metric else None) or tasks_mod.PRIMARY_METRIC.get(name) \
            or next(iter(q.metrics))
        max_drop = th.max_drop if th is not None and th.max_drop is not None else float("inf")
        z = th.z if th is not None else 1.96
        c = tasks_mod.compare(base[name], q, metric, max_drop, z)
        c["checked"] = max_drop != float("inf")
        c["seconds"] = round(q.seconds, 1)
        rows[name] = c
        if c["failed"]:
            fails.append(f"{name} {c['reason']}")
    return rows, fails


def ppl_limit(base: Metrics, t: ThresholdsConfig) -> Optional[float]:
    """The largest perplexity the thresholds allow (None when no PPL threshold is set)."""
    lims = []
    if t.max_ppl_increase_pct is not None:
        lims.append(base.ppl * (1 + t.max_ppl_increase_pct / 100))
    if t.max_ppl_increase_abs is not None:
        lims.append(base.ppl + t.max_ppl_increase_abs)
    return min(lims) if lims else None


def nll_per_kld(m: Metrics, base: Metrics) -> float:
    """The measured ratio of NLL increase to mean KLD (floored at 0.2)."""
    return max((m.nll - base.nll) / max(m.kld_mean, 1e-9), 0.2)


def kld_target(t: ThresholdsConfig, base_ppl: float, nll_per_kld: float) -> float:
    """The mean KLD a plan may reach: the KLD threshold, and the PPL thresholds mapped to KLD
    through the measured ratio of NLL increase to KLD (about 1 when the eval text looks like
    what the model would generate)."""
    targets = []
    if t.max_kld_mean is not None:
        targets.append(t.max_kld_mean)
    if t.max_ppl_increase_pct is not None:
        targets.append(math.log1p(t.max_ppl_increase_pct / 100) / nll_per_kld)
    if t.max_ppl_increase_abs is not None:
        targets.append(math.log1p(t.max_ppl_increase_abs / base_ppl) / nll_per_kld)
    return min(targets) if targets else float("inf")


# different_model: how far a checkpoint's metrics may fall behind plain RTN at its own widths on
# the same windows before they say it behaves like another model (measured: see different_model)
OTHER_MODEL_KLD_X = 3.0
OTHER_MODEL_TOP1_X = 3.0


def different_model(m: Metrics, rtn: Metrics) -> Optional[str]:
    """One line when an existing checkpoint's metrics ``m`` are those of another model: KLD more
    than OTHER_MODEL_KLD_X times that of plain RTN at the checkpoint's own widths (``rtn``, on the
    same windows) and top-1 agreement under RTN's divided by OTHER_MODEL_TOP1_X. None otherwise,
    also when either is not finite (``nonfinite`` says that).

    Measured (the checkpoint's KLD and top-1 divided by RTN's at its widths):
    - quantizations of the model, from good to badly calibrated: tiny Llama (hidden 64, 16 x 64
      pydoc tokens; GPTQ on pydoc or random tokens, mse, AWQ, NF4, Q4_0, a Q2_K-like grid; W2g32 ..
      W8): KLD 0.57-1.23x, top-1 0.64-1.90x. SmolLM2-135M (8 x 256 pydoc tokens): at W3g32 / W4g32
      / W4 per channel / W8 KLD 0.51-1.67x (the worst: AWQ with alpha fixed at 1, GPTQ calibrated
      on random tokens 1.57x), top-1 0.70-1.22x.
    - another model's weights at the same widths (tiny: seeds 1 and 2; SmolLM2: every module
      taken from 13 layers on, or re-initialized): at 3 bits and more KLD 6.3-14000x, top-1
      0.00-0.03x.
    - where they meet: at 2 bits RTN itself is about as far as another model (SmolLM2 KLD 9.1 vs
      8.9-24.7; tiny 0.22 vs 0.38), so nothing is flagged there; and a quantization that destroys
      the model looks like another model (SmolLM2, AWQ alpha 1 per channel: KLD 17.5x, top-1
      0.000, flagged: its weights are this model's, formats.parent accepts them).
    3x on both sits about 2x from either side at 3 bits and more. formats.read already refuses a
    checkpoint whose weights are another model's, so a run that gets here more likely holds a
    quantization that destroyed the model: the line names both."""
    if nonfinite(m) or nonfinite(rtn):
        return None
    if m.kld_mean > OTHER_MODEL_KLD_X * rtn.kld_mean and m.top1 < rtn.top1 / OTHER_MODEL_TOP1_X:
        ratio = m.kld_mean / max(rtn.kld_mean, 1e-12)
        return (f"behaves like another model, not a quantization of this one: KLD {m.kld_mean:.4f} is {ratio:.1f}x "
                f"plain RTN's at its widths ({rtn.kld_mean:.4f}) and top-1 {m.top1:.3f} is under a third of RTN's "
                f"{rtn.top1:.3f}: model.name_or_path must be the float model this checkpoint was quantized from, "
                "or this quantization destroys the model")
    return None
