"""Stage: loop. Baseline -> plan 0 -> quantize -> evaluate -> check -> next plan ... -> export -> verify.

Each trial applies a plan to the live model in place (simulated quantization; float originals on
the CPU), evaluates it against the cached float reference, and checks the thresholds. After the
first passing plan, the remaining trials bisect the last step's promotions to find a smaller
passing plan. The smallest passing plan is exported with the real engine, reloaded from disk
with plain transformers, and re-evaluated.
"""
from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from quantfix import data as data_mod
from quantfix import evaluate as ev
from quantfix import export as exp
from quantfix import model as model_mod
from quantfix import report as rep
from quantfix.config import validate
from quantfix.errors import QuantfixError
from quantfix.plan import Plan
from quantfix.planner import GreedyPlanner, Ladder, initial_plan
from quantfix.quantize import WeightBank
from quantfix.quantize import calib as calib_mod

log = logging.getLogger(__name__)


class Timer:
    def __init__(self):
        self.stages: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - t, 2)


def check(m: ev.Metrics, base: ev.Metrics, t) -> List[str]:
    """The thresholds a metric set fails (empty = passed)."""
    fails = []
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


def ppl_limit(base: ev.Metrics, t) -> Optional[float]:
    lims = []
    if t.max_ppl_increase_pct is not None:
        lims.append(base.ppl * (1 + t.max_ppl_increase_pct / 100))
    if t.max_ppl_increase_abs is not None:
        lims.append(base.ppl + t.max_ppl_increase_abs)
    return min(lims) if lims else None


class Session:
    """Everything the stages share for one run: model, data, caches, timers."""

    def __init__(self, cfg, out_dir: Path):
        validate(cfg)
        self.cfg = cfg
        self.out_dir = out_dir
        self.timer = Timer()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = model_mod.resolve_device(cfg.device)
        self.dtype = model_mod.resolve_dtype(cfg.model.dtype, self.device)
        self.cache = model_mod.cache_dir(cfg.cache_dir)
        self.data_dir = str(data_mod.default_data_dir(cfg.data_dir))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with self.timer("load model"):
            self.resolved = model_mod.resolve(cfg.model.name_or_path, self.cache)
            self.model, self.tokenizer = model_mod.load(self.resolved, self.dtype, self.device, cfg.model.revision,
                                                        cfg.model.trust_remote_code)
        with self.timer("data"):
            self.windows = data_mod.eval_windows(cfg.eval.source, self.data_dir, self.tokenizer,
                                                 cfg.eval.n_windows, cfg.eval.seq_len)
            self.samples = data_mod.calibration_samples(list(cfg.data.domains), self.data_dir, self.tokenizer,
                                                        cfg.data.n_samples, cfg.data.seq_len, cfg.data.seed)
        self.model_key = f"{self.resolved.path}@{cfg.model.revision or ''}"

    def reference(self) -> ev.Reference:
        e = self.cfg.eval
        key = ev.cache_key(self.model_key, self.windows, e.topk, e.full_max_mb, self.dtype)
        with self.timer("float reference"):
            return ev.reference(self.model, self.windows, e.batch_size, e.topk, e.full_max_mb,
                                cache_path=self.cache / "reference" / f"{key}.pt")

    def calib_stats(self, names: List[str]) -> calib_mod.CalibStats:
        key = calib_mod.cache_key(self.model_key + str(self.dtype), self.samples, names)
        with self.timer("calibration stats"):
            return calib_mod.collect(self.model, self.samples, names, self.cfg.eval.batch_size,
                                     cache_path=self.cache / "calib" / f"{key}.pt")


def _iteration_record(i: int, plan: Plan, m: ev.Metrics, fails: List[str], seconds: float,
                      changes: Optional[Dict[str, Tuple[str, str]]] = None) -> Dict[str, Any]:
    return {"iter": i, "plan_summary": plan.summary_str(), "note": plan.note, "avg_bits": round(plan.avg_bits, 4),
            "avg_bits_model": round(plan.avg_bits_model, 4), "size_bytes": plan.size_bytes,
            "metrics": m.to_dict(), "passed": not fails, "failed": fails, "seconds": round(seconds, 2),
            "changes": {n: f"{a} -> {b}" for n, (a, b) in (changes or {}).items()}}


def search(s: Session, bank: WeightBank, plan0: Plan, ref: ev.Reference, base: ev.Metrics,
           iterations: List[Dict[str, Any]]) -> Tuple[Optional[Plan], Plan, str]:
    """Run trials until a plan passes and the bisection converges or the budget runs out.
    Returns (smallest passing plan or None, last plan evaluated, stop reason)."""
    cfg = s.cfg
    planner = GreedyPlanner(Ladder.parse(list(cfg.loop.ladder)), bank.output_error, cfg.loop.bits_step)

    def trial(plan: Plan, changes=None) -> List[str]:
        t = time.perf_counter()
        with s.timer("quantize (simulated)"):
            bank.apply(plan)
        with s.timer("evaluate trials"):
            m = ev.evaluate(s.model, s.windows, ref, cfg.eval.batch_size, desc=f"trial {len(iterations)}")
        fails = check(m, base, cfg.thresholds)
        iterations.append(_iteration_record(len(iterations), plan, m, fails, time.perf_counter() - t, changes))
        log.info("trial %d: %s | avg bits %.2f | PPL %.3f | KLD %.4f | %s", len(iterations) - 1,
                 plan.summary_str(), plan.avg_bits, m.ppl, m.kld_mean, "PASS" if not fails else "; ".join(fails))
        return fails

    plan, best = plan0, None
    if not trial(plan):
        return plan, plan, "plan 0 passed"
    while len(iterations) < cfg.loop.max_iters:
        with s.timer("plan"):
            step = planner.next_plan(plan)
        if step is None:
            return None, plan, "every module is at the top of loop.ladder and the plan still fails"
        new, changes = step
        if trial(new, plan.diff(new)):
            plan = new
            continue
        best = new
        # bisect the promotions of this step (ordered best first) for a smaller passing plan
        lo, hi = 0, len(changes)
        while hi - lo > 1 and len(iterations) < cfg.loop.max_iters:
            mid = (lo + hi) // 2
            cand = plan.with_changes(dict(changes[:mid]), note=f"bisect: first {mid} of {len(changes)} promotions")
            if trial(cand, plan.diff(cand)):
                lo = mid
            else:
                hi, best = mid, cand
        reason = "passed; bisection converged" if hi - lo <= 1 else "passed; loop.max_iters reached while bisecting"
        return best, best, reason
    return None, plan, f"loop.max_iters={cfg.loop.max_iters} reached without a passing plan"


def run(cfg, out_dir: Path) -> Dict[str, Any]:
    t_start = time.perf_counter()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write-test").touch()
        (out_dir / ".write-test").unlink()
    except OSError as e:
        raise QuantfixError(f"cannot write the output directory {out_dir} ({e.strerror}): "
                            "pick a writable hydra.run.dir or output_dir") from e
    s = Session(cfg, out_dir)
    ref = s.reference()
    base = ev.baseline_metrics(ref)
    log.info("float baseline: PPL %.3f on %d tokens of %s", base.ppl, base.n_tokens, cfg.eval.source)
    report: Dict[str, Any] = {
        "model": cfg.model.name_or_path, "model_path": s.resolved.path, "device": str(s.device), "dtype": str(s.dtype),
        "config": OmegaConf.to_container(cfg, resolve=True), "baseline": base.to_dict(), "iterations": [],
        "warnings": [],
    }
    if cfg.mode == "baseline":
        report["final"] = None
        return _finish(s, report, t_start)

    calibration = {"domains": list(cfg.data.domains), "n_samples": cfg.data.n_samples, "seq_len": cfg.data.seq_len,
                   "seed": cfg.data.seed}
    plan0, warnings = initial_plan(s.model, cfg.quant, calibration)
    report["warnings"] += warnings
    report["baseline_size_bytes"] = int(16 * (plan0.n_params + plan0.other_params) / 8)
    report["ppl_limit"] = ppl_limit(base, cfg.thresholds)
    report["kld_limit"] = cfg.thresholds.max_kld_mean
    names = list(plan0.modules)
    stats = s.calib_stats(names)
    bank = WeightBank(s.model, names, stats, cfg.quant.gptq_dampening, cfg.quant.gptq_block_size,
                      cfg.quant.awq_grid, cfg.quant.llm_int8_threshold)
    best, last, reason = search(s, bank, plan0, ref, base, report["iterations"])
    chosen = best or last
    chosen.save(out_dir / "plan.yaml")
    bank.restore()
    del bank
    report["final"] = {"plan": "plan.yaml", "plan_summary": chosen.summary_str(), "avg_bits": round(chosen.avg_bits, 4),
                       "size_bytes": chosen.size_bytes, "search_passed": best is not None, "stop_reason": reason,
                       "trials": len(report["iterations"])}
    if cfg.export.enabled:
        _export_and_verify(s, chosen, ref, base, report)
    else:
        report["final"]["passed"] = best is not None
    return _finish(s, report, t_start)


def _export_and_verify(s: Session, plan: Plan, ref: ev.Reference, base: ev.Metrics, report: Dict[str, Any]) -> None:
    cfg = s.cfg
    export_dtype = None if cfg.export.dtype == "auto" else getattr(torch, cfg.export.dtype)
    with s.timer("export"):
        ckpt = exp.export(s.model, s.tokenizer, plan, s.samples, s.out_dir, s.resolved.path, cfg.quant, export_dtype)
    # free the working model before loading the checkpoint: never two models on the device
    s.model = None
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    fin = report["final"]
    fin["checkpoint"] = str(ckpt)
    fin["checkpoint_bytes"] = exp.dir_size(ckpt)
    if not cfg.export.verify:
        fin["passed"] = fin["search_passed"]
        return
    with s.timer("verify (reload + evaluate)"):
        model = exp.reload(ckpt, s.dtype, s.device)
        m = ev.evaluate(model, s.windows, ref, cfg.eval.batch_size, desc="verify checkpoint")
        del model
    fails = check(m, base, cfg.thresholds)
    fin["verified_metrics"] = m.to_dict()
    fin["verified_failed"] = fails
    fin["passed"] = fin["search_passed"] and not fails
    if fin["search_passed"] and fails:
        fin["stop_reason"] += "; but the reloaded checkpoint fails: " + "; ".join(fails)


def _finish(s: Session, report: Dict[str, Any], t_start: float) -> Dict[str, Any]:
    report["timings_s"] = dict(s.timer.stages, total=round(time.perf_counter() - t_start, 2))
    report["memory"] = ev.peak_memory_mb(s.device)
    rep.write_json(report, s.out_dir)
    if report["iterations"]:
        rep.plot_iterations(report, s.out_dir)
    print("\n" + rep.table(report) if report["iterations"] else f"\nfloat baseline PPL {report['baseline']['ppl']:.3f}")
    fin = report.get("final")
    if fin:
        print(f"\nresult: {'PASSED' if fin.get('passed') else 'FAILED'} ({fin['stop_reason']}); "
              f"{fin['trials']} trials; plan {fin['plan_summary']}")
        if fin.get("checkpoint"):
            print(f"checkpoint: {fin['checkpoint']} ({fin['checkpoint_bytes'] / 1e6:.1f} MB)")
    print(f"run dir: {s.out_dir}")
    return report
