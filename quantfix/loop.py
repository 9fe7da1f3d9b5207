"""Stage: loop. Baseline -> plan 0 -> quantize -> evaluate -> check -> diagnose -> next plan ...
-> export -> verify.

Each trial applies a plan to the live model in place (simulated quantization; float originals on
the CPU), evaluates it against the cached float reference (and the task baselines), and checks
the thresholds. When plan 0 fails, the diagnosis feeds the planner; after the first passing plan,
the remaining trials bisect toward a smaller passing plan. The smallest passing plan is exported
with the real engine, reloaded from disk with plain transformers, and re-evaluated.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from quantfix.cache import atomic_write
from quantfix import data as data_mod
from quantfix import evaluate as ev
from quantfix import export as exp
from quantfix import model as model_mod
from quantfix import report as rep
from quantfix.config import validate
from quantfix.errors import QuantfixError
from quantfix.plan import Plan
from quantfix.planner import GreedyPlanner, Ladder, PredictivePlanner, initial_plan, kld_target, ladder_options
from quantfix import diagnose as diag_mod
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


def task_checks(base: Dict[str, Any], quant: Dict[str, Any], thresholds) -> Tuple[Dict[str, dict], List[str]]:
    """Compare every task's metrics with the float baseline; failures name the task and metric."""
    from quantfix import tasks as tasks_mod

    rows, fails = {}, []
    for t, q in quant.items():
        th = thresholds.tasks.get(t) if t in thresholds.tasks else None
        metric = (th.metric if th is not None and th.metric else None) or tasks_mod.PRIMARY_METRIC.get(t) \
            or next(iter(q.metrics))
        max_drop = th.max_drop if th is not None and th.max_drop is not None else float("inf")
        z = th.z if th is not None else 1.96
        c = tasks_mod.compare(base[t], q, metric, max_drop, z)
        c["checked"] = max_drop != float("inf")
        c["seconds"] = round(q.seconds, 1)
        rows[t] = c
        if c["failed"]:
            fails.append(f"{t} {c['reason']}")
    return rows, fails


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
        ev.use_compile(cfg.eval.compile)
        self.dtype = model_mod.resolve_dtype(cfg.model.dtype, self.device)
        self.cache = model_mod.cache_dir(cfg.cache_dir)
        self.data_dir = str(data_mod.default_data_dir(cfg.data_dir))
        self.offline = model_mod.is_offline(cfg.offline)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with self.timer("load model"):
            self.resolved = model_mod.resolve(cfg.model.name_or_path, self.cache, offline=self.offline,
                                              revision=cfg.model.revision)
            self.model, self.tokenizer = model_mod.load(
                self.resolved, self.dtype, self.device, cfg.model.revision, cfg.model.trust_remote_code,
                cfg.model.device_map, dict(cfg.model.max_memory) if cfg.model.max_memory else None,
                cfg.model.offload_folder, allow_pickle=cfg.model.allow_pickle, offline=self.offline)
        model_mod.check_positions(self.model.config, {  # the diagnosis (not in mode=baseline) has its own length
            "eval.seq_len": cfg.eval.seq_len, "data.seq_len": cfg.data.seq_len,
            **({} if cfg.mode == "baseline" else {"diagnose.domain_seq_len": cfg.diagnose.domain_seq_len})})
        with self.timer("data"):
            self.windows = data_mod.eval_windows(cfg.eval.source, self.data_dir, self.tokenizer,
                                                 cfg.eval.n_windows, cfg.eval.seq_len, offline=self.offline)
            self.samples = data_mod.calibration_samples(list(cfg.data.domains), self.data_dir, self.tokenizer,
                                                        cfg.data.n_samples, cfg.data.seq_len, cfg.data.seed,
                                                        offline=self.offline)
        self.model_key = f"{self.resolved.path}@{cfg.model.revision or ''}"
        # eval.batch_size=0 (auto): 4 on the CPU; on CUDA as many windows as fit, up to 32
        self.batch_size = cfg.eval.batch_size or (min(cfg.eval.n_windows, 32) if self.device.type == "cuda" else 4)

    def batched(self, fn):
        """fn(batch_size), halving the batch size on a CUDA out-of-memory error (said once in the log
        and kept for the rest of the run); at batch size 1 the error names the fix."""
        while True:
            try:
                return fn(self.batch_size)
            except torch.cuda.OutOfMemoryError as e:
                gc.collect()
                torch.cuda.empty_cache()
                if self.batch_size == 1:
                    raise QuantfixError("out of GPU memory at eval.batch_size=1: lower eval.seq_len, or spread the "
                                        "model over more GPUs / the CPU with model.device_map=auto") from e
                self.batch_size //= 2
                log.warning("out of GPU memory: evaluation batch size lowered to %d", self.batch_size)

    def reference(self) -> ev.Reference:
        e = self.cfg.eval
        key = ev.cache_key(self.model_key, self.windows, e.topk, e.full_max_mb, self.dtype)
        with self.timer("float reference"):
            return self.batched(lambda bs: ev.reference(self.model, self.windows, bs, e.topk, e.full_max_mb,
                                                        cache_path=self.cache / "reference" / f"{key}.pt"))

    def task_results(self) -> Dict[str, Any]:
        """Task metrics of the model as it is now (eval.tasks), with a progress bar per task."""
        from quantfix import tasks as tasks_mod

        e = self.cfg.eval
        with self.timer("tasks"):
            return tasks_mod.score_tasks(self.model, self.tokenizer, list(e.tasks), self.data_dir, e.task_limit,
                                         e.task_seed, e.task_batch_size, dict(e.task_paths))

    def task_baseline(self) -> Dict[str, Any]:
        """Float task metrics, cached on disk per (model, tasks, subset)."""
        from quantfix import tasks as tasks_mod

        e = self.cfg.eval
        out = {}
        todo = []
        for t in e.tasks:
            key = hashlib.sha256(f"tasks-v1|{self.model_key}|{self.dtype}|{t}|{e.task_limit}|{e.task_seed}|"
                                 f"{dict(e.task_paths).get(t)}".encode()).hexdigest()[:16]
            path = self.cache / "tasks" / f"{key}.json"
            if path.exists():
                out[t] = tasks_mod.TaskResult.from_dict(json.loads(path.read_text()))
            else:
                todo.append((t, path))
        if todo:
            with self.timer("tasks"):
                fresh = tasks_mod.score_tasks(self.model, self.tokenizer, [t for t, _ in todo], self.data_dir,
                                              e.task_limit, e.task_seed, e.task_batch_size, dict(e.task_paths))
            for t, path in todo:
                atomic_write(path, lambda tmp, r=fresh[t]: tmp.write_text(json.dumps(r.to_dict(per_doc=True))))
                out[t] = fresh[t]
        return out

    def calib_stats(self, names: List[str]) -> calib_mod.CalibStats:
        key = calib_mod.cache_key(self.model_key + str(self.dtype), self.samples, names)
        with self.timer("calibration stats"):
            return self.batched(lambda bs: calib_mod.collect(self.model, self.samples, names, bs,
                                                             cache_path=self.cache / "calib" / f"{key}.pt"))


def _iteration_record(i: int, plan: Plan, m: ev.Metrics, fails: List[str], seconds: float,
                      changes: Optional[Dict[str, Tuple[str, str]]] = None) -> Dict[str, Any]:
    return {"iter": i, "plan_summary": plan.summary_str(), "note": plan.note, "avg_bits": round(plan.avg_bits, 4),
            "avg_bits_model": round(plan.avg_bits_model, 4), "size_bytes": plan.size_bytes,
            "metrics": m.to_dict(), "passed": not fails, "failed": fails, "seconds": round(seconds, 2),
            "changes": {n: f"{a} -> {b}" for n, (a, b) in (changes or {}).items()}}


class Trials:
    """Runs and records trials: apply a plan in place, evaluate, check the thresholds."""

    def __init__(self, s: Session, bank: WeightBank, ref: ev.Reference, base: ev.Metrics,
                 iterations: List[Dict[str, Any]]):
        self.s, self.bank, self.ref, self.base, self.iterations = s, bank, ref, base, iterations
        self.last_metrics: Optional[ev.Metrics] = None
        self.last_task_fails: List[str] = []
        self.task_base = s.task_baseline() if s.cfg.eval.tasks else {}
        # every trial's metrics are appended to trials.jsonl; with loop.resume=true a rerun in the
        # same run dir replays them instead of evaluating again (the search is deterministic)
        self.journal = s.out_dir / "trials.jsonl"
        self.memo: Dict[str, Dict[str, Any]] = {}
        if s.cfg.loop.resume and self.journal.exists():
            for line in self.journal.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.memo[rec["plan_key"]] = rec
            log.info("resume: %d trials journaled in %s", len(self.memo), self.journal)
        elif self.journal.exists():
            self.journal.unlink()

    @property
    def left(self) -> int:
        return self.s.cfg.loop.max_iters - len(self.iterations)

    def __call__(self, plan: Plan, prev: Optional[Plan] = None, extra: Optional[Dict[str, Any]] = None) -> List[str]:
        s = self.s
        t = time.perf_counter()
        key = plan_key(plan)
        task_rows: Dict[str, dict] = {}
        task_fails: List[str] = []
        if key in self.memo:
            m = ev.Metrics(**self.memo[key]["metrics"])
            task_rows, task_fails = self.memo[key].get("tasks", {}), self.memo[key].get("task_fails", [])
            extra = dict(extra or {}, resumed=True)
        else:
            with s.timer("quantize (simulated)"):
                self.bank.apply(plan)
            with s.timer("evaluate trials"):
                m = s.batched(lambda bs: ev.evaluate(s.model, s.windows, self.ref, bs,
                                                     desc=f"trial {len(self.iterations)}"))
            if self.task_base:
                task_rows, task_fails = task_checks(self.task_base, s.task_results(),
                                                    s.cfg.thresholds)
            with open(self.journal, "a") as f:
                f.write(json.dumps({"plan_key": key, "metrics": asdict(m), "tasks": task_rows,
                                    "task_fails": task_fails}) + "\n")
        self.last_metrics = m
        self.last_task_fails = task_fails
        fails = check(m, self.base, s.cfg.thresholds) + task_fails
        rec = _iteration_record(len(self.iterations), plan, m, fails, time.perf_counter() - t,
                                prev.diff(plan) if prev is not None else None)
        rec.update(extra or {})
        if task_rows:
            rec["tasks"] = task_rows
        self.iterations.append(rec)
        log.info("trial %d: %s | avg bits %.2f | PPL %.3f | KLD %.4f | %s", len(self.iterations) - 1,
                 plan.summary_str(), plan.avg_bits, m.ppl, m.kld_mean, "PASS" if not fails else "; ".join(fails))
        return fails


def plan_key(plan: Plan) -> str:
    body = json.dumps({n: asdict(p) for n, p in sorted(plan.modules.items())}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def bisect(trial: Trials, make: Callable[[int], Plan], lo: int, hi: int, best: Plan, prev: Plan) -> Tuple[Plan, str]:
    """Smallest passing prefix between lo (fails) and hi (passes) while trials are left."""
    while hi - lo > 1 and trial.left > 0:
        mid = (lo + hi) // 2
        cand = make(mid)
        if trial(cand, prev):
            lo = mid
        else:
            hi, best = mid, cand
    return best, ("passed; bisection converged" if hi - lo <= 1 else "passed; loop.max_iters reached while bisecting")


def search_greedy(trial: Trials, plan0: Plan) -> Tuple[Optional[Plan], Plan, str]:
    cfg = trial.s.cfg
    planner = GreedyPlanner(Ladder.parse(list(cfg.loop.ladder)), trial.bank.output_error, cfg.loop.bits_step)
    plan = plan0
    while trial.left > 0:
        with trial.s.timer("plan"):
            step = planner.next_plan(plan)
        if step is None:
            return None, plan, "every module is at the top of loop.ladder and the plan still fails"
        new, changes = step
        if trial(new, plan):
            plan = new
            continue

        def make(k, plan=plan, changes=changes, n=len(changes)):
            return plan.with_changes(dict(changes[:k]), note=f"bisect: first {k} of {n} promotions")

        best, reason = bisect(trial, make, 0, len(changes), new, plan)
        return best, best, reason
    return None, plan, f"loop.max_iters={cfg.loop.max_iters} reached without a passing plan"


def search_predictive(trial: Trials, plan0: Plan, diag: Dict[str, Any], options) -> Tuple[Optional[Plan], Plan, str]:
    """Predict the cheapest passing plan from the diagnosis, verify it, recalibrate on a miss."""
    s, cfg = trial.s, trial.s.cfg
    sens = diag["sensitivity"]
    with s.timer("plan"):
        planner = PredictivePlanner(plan0, sens.get("option_base") or sens["modules"], sens["options"], options,
                                    diag["findings"])
    m0 = trial.last_metrics
    nll_per_kld = max((m0.nll - trial.base.nll) / max(m0.kld_mean, 1e-9), 0.2)
    target = kld_target(cfg.thresholds, trial.base.ppl, nll_per_kld)
    planner.calibrate(0, m0.kld_mean)
    trial.s.frontier = planner
    budget = cfg.plan.budget.avg_bits
    if budget is not None and budget < plan0.avg_bits:
        raise QuantfixError(f"plan.budget.avg_bits={budget} is below plan 0's {plan0.avg_bits:.2f} average bits: "
                            "lower quant.bits or raise the budget")
    if budget is not None:
        # objective (b): the lowest predicted KLD within the budget, verified once
        k = planner.largest_within(budget)
        cand = planner.plan_at(k)
        extra = {"predicted_kld": round(planner.predict(k), 5), "budget_avg_bits": budget,
                 "drivers": {r: len(v) for r, v in planner.drivers(k).items()}}
        fails = trial(cand, plan0, extra)
        reason = f"lowest predicted KLD within plan.budget.avg_bits={budget}" + ("" if not fails else
                                                                                  "; thresholds not met")
        return (cand if not fails else None), cand, reason
    lo, plan = 0, plan0
    while trial.left > 0:
        k = planner.first_passing(target, after=lo)
        if k is None:
            k = len(planner.steps)
            if k <= lo:
                return None, plan, "no plan on loop.ladder is predicted to pass, and the largest one failed"
        cand = planner.plan_at(k)
        predicted = planner.predict(k)
        extra = {"predicted_kld": round(predicted, 5), "kld_target": round(target, 5),
                 "drivers": {r: len(v) for r, v in planner.drivers(k).items()}}
        fails = trial(cand, plan0, extra)
        m = trial.last_metrics
        trial.iterations[-1]["prediction_error_pct"] = round(100 * (predicted / max(m.kld_mean, 1e-12) - 1), 1)
        if not fails:
            best, reason = bisect(trial, planner.plan_at, lo, k, cand, plan0)
            return best, best, reason
        # missed: refit the correction and the NLL/KLD ratio on this measurement, then replan
        planner.calibrate(k, m.kld_mean)
        nll_per_kld = max((m.nll - trial.base.nll) / max(m.kld_mean, 1e-9), 0.2)
        if trial.last_task_fails and len(trial.last_task_fails) == len(fails):
            # only a task failed: the KLD that passes PPL is not enough for the task; ask for less
            target = min(target, m.kld_mean) * 0.7
        else:
            target = kld_target(cfg.thresholds, trial.base.ppl, nll_per_kld)
        lo, plan = k, cand
        if k >= len(planner.steps):
            return None, cand, "every module is at the top of loop.ladder and the plan still fails"
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
    exp.clean_stale_temp(out_dir)
    s = Session(cfg, out_dir)
    if cfg.quant.algorithm == "awq" and cfg.export.enabled and cfg.mode == "repair" and s.device.type != "cuda":
        raise QuantfixError("quant=awq exports through llm-compressor's AWQ, which needs a CUDA device (it fails on "
                            "the CPU): run with device=cuda, pick quant=gptq, or set export.enabled=false")
    ref = s.reference()
    base = ev.baseline_metrics(ref)
    log.info("float baseline: PPL %.3f on %d tokens of %s", base.ppl, base.n_tokens, cfg.eval.source)
    report: Dict[str, Any] = {
        "model": cfg.model.name_or_path, "model_path": s.resolved.path, "device": str(s.device), "dtype": str(s.dtype),
        "config": OmegaConf.to_container(cfg, resolve=True), "baseline": base.to_dict(), "iterations": [],
        "warnings": [],
    }
    placement = getattr(s.model, "hf_device_map", None)
    if placement and len(set(map(str, placement.values()))) > 1:  # spread by accelerate: say where
        report["placement"] = dict(Counter(str(v) for v in placement.values()))
        log.info("device map: %s", ", ".join(f"{n} modules on {d}" for d, n in report["placement"].items()))
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
    trial = Trials(s, bank, ref, base, report["iterations"])
    if trial.task_base:
        report["baseline_tasks"] = {t: r.to_dict() for t, r in trial.task_base.items()}
    s.task_base = trial.task_base
    if cfg.mode == "diagnose":
        if cfg.quantized.name_or_path:
            from quantfix.quantized import load_quantized

            plan0, qweights = load_quantized(cfg.quantized.name_or_path, plan0, s.model)
            bank.use_external(plan0, qweights)
            report["quantized"] = cfg.quantized.name_or_path
        trial(plan0)
        diag = _diagnose(s, bank, plan0, ref, base, trial.last_metrics, stats, None, report)
        bank.restore()
        report["final"] = None
        return _finish(s, report, t_start)
    if not trial(plan0) and cfg.plan.budget.avg_bits is None:
        best, last, reason = plan0, plan0, "plan 0 passed"
    elif cfg.loop.policy == "greedy":
        best, last, reason = search_greedy(trial, plan0)
    else:
        options = ladder_options(plan0, Ladder.parse(list(cfg.loop.ladder)))
        diag = _diagnose(s, bank, plan0, ref, base, trial.last_metrics, stats, options, report)
        best, last, reason = search_predictive(trial, plan0, diag, options)
    chosen = best or last
    if best is None and report["iterations"]:
        reason += "; the last trial failed on: " + "; ".join(report["iterations"][-1]["failed"])
    chosen.save(out_dir / "plan.yaml")
    report["pareto"] = {"measured": [[it["avg_bits"], it["metrics"]["kld_mean"], it["metrics"]["ppl"]]
                                     for it in report["iterations"]]}
    if getattr(s, "frontier", None) is not None:
        report["pareto"]["predicted"] = [[round(b, 4), round(k, 6)] for b, k in s.frontier.frontier()]
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


def _diagnose(s: Session, bank, plan, ref, base, metrics, stats, options, report) -> Dict[str, Any]:
    saved = s.out_dir / "diagnosis_full.json"
    if s.cfg.loop.resume and saved.exists():
        diag = json.loads(saved.read_text())
        log.info("resume: diagnosis loaded from %s", saved)
    else:
        with s.timer("diagnose"):
            diag = diag_mod.run(s, bank, plan, ref, base, metrics, stats, options)
        atomic_write(saved, lambda tmp: tmp.write_text(json.dumps(diag, default=str)))
    (s.out_dir / "diagnosis.json").write_text(json.dumps(_strip_options(diag), indent=2, default=str))
    report["diagnosis"] = {"file": "diagnosis.json", "findings": diag["findings"],
                           "top_layers": sorted(diag["sensitivity"]["layers"],
                                                key=lambda k: -diag["sensitivity"]["layers"][k])[:5],
                           "sensitivity_method": diag["sensitivity"]["method"],
                           "sensitivity_seconds": diag["sensitivity"]["seconds"],
                           "domains": diag["domains"], "plots": diag["plots"]}
    report["_diag"] = diag
    return diag


def _strip_options(diag: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(diag)
    out["sensitivity"] = {k: v for k, v in diag["sensitivity"].items() if k != "options"}
    return out


def _export_and_verify(s: Session, plan: Plan, ref: ev.Reference, base: ev.Metrics, report: Dict[str, Any]) -> None:
    cfg = s.cfg
    export_dtype = None if cfg.export.dtype == "auto" else getattr(torch, cfg.export.dtype)
    existing = s.out_dir / "checkpoint"
    if cfg.loop.resume and (existing / "quantfix_plan.yaml").exists() and \
            Plan.load(existing / "quantfix_plan.yaml").modules == plan.modules:
        ckpt = existing  # exported before the interruption: verify it again
    else:
        with s.timer("export"):
            ckpt = exp.export(s.model, s.tokenizer, plan, s.samples, s.out_dir, s.resolved.path, cfg.quant,
                              export_dtype, trust_remote_code=cfg.model.trust_remote_code)
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
        model = exp.reload(ckpt, s.dtype, s.device, cfg.model.device_map,
                           dict(cfg.model.max_memory) if cfg.model.max_memory else None, cfg.model.offload_folder,
                           trust_remote_code=cfg.model.trust_remote_code)
        m = s.batched(lambda bs: ev.evaluate(model, s.windows, ref, bs, desc="verify checkpoint"))
        task_fails = []
        if getattr(s, "task_base", None):
            s.model = model
            fin["verified_tasks"], task_fails = task_checks(s.task_base, s.task_results(), cfg.thresholds)
            s.model = None
        del model
    fails = check(m, base, cfg.thresholds) + task_fails
    fin["verified_metrics"] = m.to_dict()
    fin["verified_failed"] = fails
    fin["passed"] = fin["search_passed"] and not fails
    if fin["search_passed"] and fails:
        fin["stop_reason"] += "; but the reloaded checkpoint fails: " + "; ".join(fails)


def _finish(s: Session, report: Dict[str, Any], t_start: float) -> Dict[str, Any]:
    report["timings_s"] = dict(s.timer.stages, total=round(time.perf_counter() - t_start, 2))
    report["memory"] = ev.peak_memory_mb(s.device)
    report["eval_batch_size"] = s.batch_size
    rep.write_json(report, s.out_dir)
    if report["iterations"]:
        rep.plot_iterations(report, s.out_dir)
    rep.write_human(report, s.out_dir)
    print("\n" + rep.table(report) if report["iterations"] else f"\nfloat baseline PPL {report['baseline']['ppl']:.3f}")
    fin = report.get("final")
    if fin:
        print(f"\nresult: {'PASSED' if fin.get('passed') else 'FAILED'} ({fin['stop_reason']}); "
              f"{fin['trials']} trials; plan {fin['plan_summary']}")
        if fin.get("checkpoint"):
            print(f"checkpoint: {fin['checkpoint']} ({fin['checkpoint_bytes'] / 1e6:.1f} MB)")
    print(f"run dir: {s.out_dir}")
    return report
