"""The repair recipe's larger steps, each given the run's Session by the loop: diagnose a plan and
record it for the report, recalibrate on a domain the calibration data lacks (a repair action),
export the chosen plan with the real engine, reload it from disk and verify it."""
from __future__ import annotations

import gc
import json
import math
import logging
from typing import Any, Dict, Optional

import torch

from quantfix import diagnose as diag_mod
from quantfix import evaluate as ev
from quantfix import export as exp
from quantfix import verdict
from quantfix.cache import atomic_write
from quantfix.errors import QuantfixError
from quantfix.plan import Plan
from quantfix.quantize import algorithms
from quantfix.session import Session

log = logging.getLogger(__name__)


def diagnose(s: Session, bank, plan, ref, base, metrics, stats, options, report,
             journal: str = "diagnosis_full.json") -> diag_mod.Diagnosis:
    """The diagnosis of ``plan`` (replayed from ``journal`` on resume); summary into the report."""
    saved = s.out_dir / journal
    diag = _resumed_diagnosis(saved, s.fingerprint, report) if s.cfg.loop.resume else None
    if diag is None:
        key = diag_mod.sensitivity_cache_key(s.model_fp, plan, s.data.windows, s.cfg.diagnose.sensitivity, options,
                                             s.weights_key())
        with s.timer("diagnose"):
            diag = diag_mod.run(s.rt, s.data, bank, plan, ref, base, metrics, stats, s.cfg.diagnose, s.cfg.probes,
                                s.out_dir, options, s.sensitivity_cache(key))
        body = dict(diag.to_dict(), fingerprint=s.fingerprint)
        atomic_write(saved, lambda tmp: tmp.write_text(json.dumps(body, default=str)), checksum=False,
                     setting="hydra.run.dir")
    (s.out_dir / "diagnosis.json").write_text(json.dumps(diag.to_dict(with_options=False), indent=2, default=str))
    report["diagnosis"] = {"file": "diagnosis.json", "findings": [f.to_dict() for f in diag.findings],
                           "top_layers": diag.top_layers(5), "sensitivity_method": diag.sensitivity.method,
                           "sensitivity_seconds": diag.sensitivity.seconds, "domains": diag.domains,
                           "plots": diag.plots}
    return diag


def _resumed_diagnosis(saved, fingerprint: str, report) -> Optional[diag_mod.Diagnosis]:
    """The diagnosis journaled in ``saved`` by an interrupted run with the same fingerprint, or None
    (absent, unreadable, or written by another run: then said in the log and the report)."""
    if not saved.exists():
        return None
    try:
        d = json.loads(saved.read_text())
    except ValueError as e:  # written atomically, but it may have been damaged since
        log.warning("resume: %s is unreadable (%s): diagnosing again", saved, e)
        return None
    if d.pop("fingerprint", None) != fingerprint:
        msg = (f"resume: {saved.name} was written by another run (model, data, thresholds, config or code "
               "differ): ignored, diagnosing again")
        log.warning("%s", msg)
        report["warnings"].append(msg)
        return None
    log.info("resume: diagnosis loaded from %s", saved)
    return diag_mod.Diagnosis.from_dict(d)


def recalibrate_on_domain_gap(s: Session, bank, trial, plan0, options, diagnosis, ref, base, report):
    """The action for a calibration_mismatch or domain_gap finding: calibrate on the deployment text
    (held out from the eval windows) or the missing domain too, re-measure plan 0 when its
    algorithm learns from the calibration data, and diagnose again (the options' scores depend on
    the statistics). Returns the diagnosis to plan from."""
    gap = next((f for f in diagnosis.findings if f.kind == "calibration_mismatch"), None) or \
        next((f for f in diagnosis.findings if f.kind == "domain_gap"), None)
    calibrated = any(algorithms.get(p.algorithm).calibrated for o in [plan0.modules] + list(options.values())
                     for p in o.values() if not p.is_float)
    if gap is None or not s.cfg.loop.recalibrate or not calibrated or gap.source in s.data.calibration_domains:
        return diagnosis
    before = list(s.data.calibration_domains)
    log.info("domain gap (%s): recalibrating on %s too", gap.domain, gap.source)
    stats = s.recalibrate(gap.source)
    bank.use_stats(stats)
    action = f"recalibrate: data.domains {before} + {gap.source}"
    report["recalibration"] = {"finding": gap.finding, "domains_before": before,
                               "domains_after": list(s.data.calibration_domains), "domains_before_ppl": diagnosis.domains}
    trial.context = "calibration: " + ", ".join(s.data.calibration_domains)
    if any(algorithms.get(p.algorithm).calibrated for p in plan0.modules.values() if not p.is_float):
        trial(plan0.with_changes({}, note=action), extra={"action": action, "drivers": {gap.kind: 1}})
    diagnosis = diagnose(s, bank, plan0, ref, base, trial.last_metrics, stats, options, report,
                         journal="diagnosis_full_recalibrated.json")
    report["recalibration"]["domains_after_ppl"] = diagnosis.domains
    return diagnosis


def _same_checkpoint(ckpt, plan: Plan, fingerprint: str) -> bool:
    """Whether ``ckpt`` is this plan exported by a run with this fingerprint (same model, data, config)."""
    fp = ckpt / exp.FINGERPRINT_FILE
    return (ckpt / "quantfix_plan.yaml").exists() and fp.exists() and fp.read_text().strip() == fingerprint \
        and Plan.load(ckpt / "quantfix_plan.yaml").modules == plan.modules


def tune(s: Session, bank, trial, result, budget: Optional[float]):
    """loop.tune=autoround, the search's last step: AutoRound tunes the rounding and scales of a
    measured plan (its widths kept) and the result is measured as one more trial. Threshold mode:
    first the largest failing plan below the passing one (tuning may make the smaller plan pass),
    then the passing plan itself (a lower KLD at the same size); with no passing plan, the last one.
    Budget mode: the plan within the budget. A tuned plan replaces its source when it passes (or,
    in budget mode, measures a lower KLD). Returns the (possibly updated) SearchResult."""
    from quantfix import tune as autoround

    cfg = s.cfg.loop
    if cfg.tune == "none":
        return result
    if budget is not None:
        sources = [result.chosen]
    elif result.best is not None:
        sources = [p for p in (result.below, result.best) if p is not None]
    else:
        sources = [result.last]
    by_summary = {it["plan_summary"]: i for i, it in enumerate(trial.iterations)}
    for src in sources:
        tuned_plan = autoround.tuned_plan(src)
        if tuned_plan == src:
            continue
        src_it = by_summary.get(src.summary_str())
        src_kld = trial.iterations[src_it]["metrics"]["kld_mean"] if src_it is not None else math.inf
        bank.restore()
        with s.timer("autoround tuning"):
            tuned = autoround.tune(s.rt.model, s.rt.tokenizer, src, s.data.samples, cfg.tune_iters, s.sim_dtype,
                                   batch_size=cfg.tune_batch_size, seed=s.cfg.data.seed)
        bank.use_tuned(tuned_plan, {n: w for n, (w, _, _) in tuned.items()},
                          {n: (sc, z) for n, (_, sc, z) in tuned.items()})
        action = f"AutoRound tuning ({cfg.tune_iters} iterations per block) of trial {src_it}"
        fails = trial(tuned_plan, src, {"action": action, "tuned_from": src_it, "drivers": {"tune": 1}}, fresh=True)
        kld = trial.last_metrics.kld_mean
        better = kld < src_kld if budget is not None else not fails and (src is not result.best or kld < src_kld)
        log.info("AutoRound tuning of trial %s: KLD %.5f -> %.5f (%s)", src_it, src_kld, kld,
                 "kept" if better else "not kept")
        if better:
            result.reason += f"; {action}: KLD {src_kld:.5f} -> {kld:.5f}"
            if budget is not None:
                result.best = None if fails else tuned_plan
                result.last = tuned_plan
            else:
                result.best = result.last = tuned_plan
            return result
    return result


def _nonfinite_checkpoint(model, ids, report: Dict[str, Any]) -> list:
    """Name where the reloaded checkpoint turns NaN/Inf (a weight the export dtype could not hold,
    or the first module with a non-finite output), in the failed list and the warnings."""
    where = ev.locate_nonfinite(model, ids)
    if where is None:
        return []
    msg = f"the reloaded checkpoint gives non-finite values, starting at {where}"
    log.warning("%s", msg)
    report["warnings"].append(msg)
    return [f"checkpoint non-finite at {where}"]


def export_and_verify(s: Session, plan: Plan, base, task_base, report: Dict[str, Any], static=None) -> None:
    cfg, fin = s.cfg, report["final"]
    export_dtype = s.sim_dtype  # decided before the trials (Session.export_dtype), which measured it
    existing = s.out_dir / "checkpoint"
    if cfg.loop.resume and _same_checkpoint(existing, plan, s.fingerprint):
        ckpt = existing  # exported before the interruption: verify it again
    else:
        with s.timer("export"):
            ckpt = exp.export(s.rt.model, s.rt.tokenizer, plan, s.data.samples, s.out_dir, s.resolved.path, cfg.quant,
                              export_dtype, trust_remote_code=cfg.model.trust_remote_code, static=static,
                              warnings=report["warnings"], fingerprint=s.fingerprint)
    if static:
        static.clear()  # the exported weights (kept simulations: up to the model's size) are written
    s.rt.model = None  # free the working model before loading the checkpoint: never two models on the device
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    fin["checkpoint"], fin["checkpoint_bytes"] = str(ckpt), exp.dir_size(ckpt)
    if not cfg.export.verify:
        fin["passed"] = fin["search_passed"]
        return
    load_fails: list = []
    with s.timer("verify (reload + evaluate)"):
        try:
            model = exp.reload(ckpt, s.dtype, s.device, cfg.model.device_map,
                               dict(cfg.model.max_memory) if cfg.model.max_memory else None, cfg.model.offload_folder,
                               trust_remote_code=cfg.model.trust_remote_code, problems=load_fails)
        except Exception as e:  # a checkpoint plain transformers cannot load is a failed run, said in one line
            if isinstance(e, QuantfixError):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise QuantfixError(f"transformers could not reload the exported checkpoint {ckpt} ({type(e).__name__}: "
                                f"{first}): it is not usable as written; run with export.enabled=false for this model") from e
        m = s.evaluate(model, desc="verify checkpoint")
        task_fails = []
        if task_base:
            fin["verified_tasks"], task_fails = verdict.task_checks(task_base, s.task_results(model), cfg.thresholds)
        fails = load_fails + verdict.check(m, base, cfg.thresholds) + task_fails + _agreement(plan, m, report)
        if verdict.nonfinite(m):
            fails += _nonfinite_checkpoint(model, s.data.windows[:1], report)
        del model
    fin["verified_metrics"], fin["verified_failed"] = m.to_dict(), fails
    fin["passed"] = fin["search_passed"] and not fails
    if fin["search_passed"] and fails:
        fin["stop_reason"] += "; but the reloaded checkpoint fails: " + "; ".join(fails)


# a checkpoint whose every module the export writes exactly as simulated must measure what its
# trial did: beyond this gap (relative KLD, plus an absolute floor for near-float plans) the run fails
EXACT_EXPORT_GAP = 0.02
INEXACT_EXPORT_WARN = 0.25


def _agreement(plan: Plan, m, report: Dict[str, Any]) -> list:
    """The reloaded checkpoint against the trial that measured its plan. Where every quantized
    module exports exactly as simulated (min/max or searched RTN through the engine's observers,
    GPTQ/imatrix packed as simulated) the KLDs must agree within EXACT_EXPORT_GAP, else the run
    fails naming both; otherwise (AWQ smoothing and bitsandbytes quantize again at export) the gap
    is recorded and a large one is warned about."""
    trial = [it for it in report["iterations"] if it["plan_summary"] == plan.summary_str()
             and abs(it["avg_bits"] - round(plan.avg_bits, 4)) < 1e-3]
    if not trial or not math.isfinite(m.kld_mean):
        return []
    sim = trial[-1]["metrics"]["kld_mean"]
    gap = abs(m.kld_mean - sim) / max(sim, 1e-4)
    report["final"]["export_gap_pct"] = round(100 * gap, 2)
    exact = all(algorithms.get(p.algorithm).family == algorithms.COMPRESSED_TENSORS and
                algorithms.get(p.algorithm).exact_export and
                (algorithms.get(p.algorithm).static_export or not algorithms.get(p.algorithm).calibrated)
                for p in plan.modules.values() if not p.is_float)
    if exact and gap > EXACT_EXPORT_GAP:
        return [f"the reloaded checkpoint's KLD {m.kld_mean:.5f} differs from its trial's {sim:.5f} by "
                f"{100 * gap:.1f}% (> {100 * EXACT_EXPORT_GAP:.0f}% for an exact export): the checkpoint is not what "
                "was measured"]
    if not exact and gap > INEXACT_EXPORT_WARN:
        msg = (f"the reloaded checkpoint's KLD {m.kld_mean:.5f} differs from its trial's {sim:.5f} by {100 * gap:.0f}% "
               f"({plan.rounding_str()}: not all exported as simulated)")
        log.warning("%s", msg)
        report["warnings"].append(msg)
    return []
