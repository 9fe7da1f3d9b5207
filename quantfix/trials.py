"""Trials: apply a plan in place (simulated), measure it, check the thresholds, record it.

Every trial's metrics are appended to ``trials.jsonl``; with ``resume`` a rerun in the same run dir
replays them instead of evaluating again (the search is deterministic).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from quantfix import verdict
from quantfix.config import ThresholdsConfig
from quantfix.evaluate import Metrics
from quantfix.plan import Plan

log = logging.getLogger(__name__)


def plan_key(plan: Plan, context: str = "") -> str:
    """The journal key of a plan's trial; ``context`` names what else decides its weights (the
    calibration domains after a recalibration)."""
    body = json.dumps({n: asdict(p) for n, p in sorted(plan.modules.items())}, sort_keys=True) + context
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def iteration_record(i: int, plan: Plan, m: Metrics, fails: List[str], seconds: float,
                     changes: Optional[Dict[str, Tuple[str, str]]] = None) -> Dict[str, Any]:
    """One row of report.json's ``iterations``."""
    return {"iter": i, "plan_summary": plan.summary_str(), "widths": plan.widths_str(), "rounding": plan.rounding_str(),
            "note": plan.note, "avg_bits": round(plan.avg_bits, 4),
            "avg_bits_model": round(plan.avg_bits_model, 4), "size_bytes": plan.size_bytes,
            "metrics": m.to_dict(), "passed": not fails, "failed": fails, "seconds": round(seconds, 2),
            "changes": {n: f"{a} -> {b}" for n, (a, b) in (changes or {}).items()}}


@dataclass
class TrialSetup:
    """What a trial needs besides the plan: how to apply it, measure it and judge it."""

    bank: Any  # quantize.bank.WeightBank over the live model
    measure: Callable[[str], Metrics]  # metrics of the live model (argument: progress label)
    base: Metrics  # the float model's
    thresholds: ThresholdsConfig
    max_iters: int
    journal: Path
    resume: bool = False
    timer: Any = None  # session.Timer
    task_base: Optional[Dict[str, Any]] = None  # float task results (eval.tasks), or None
    score_tasks: Optional[Callable[[], Dict[str, Any]]] = None  # task results of the live model
    fingerprint: str = ""  # of the run's inputs (Session.fingerprint): journal lines of another run are ignored
    locate_nonfinite: Optional[Callable[[], Optional[str]]] = None  # where the live model turns NaN/Inf
    warnings: List[str] = field(default_factory=list)  # report.json's warnings (appended to)


class Trials:
    """Runs and records trials; ``iterations`` is the list of records (report.json)."""

    def __init__(self, setup: TrialSetup, iterations: List[Dict[str, Any]]):
        self.setup, self.bank, self.base, self.iterations = setup, setup.bank, setup.base, iterations
        self.last_metrics: Optional[Metrics] = None
        self.last_task_fails: List[str] = []
        self.context = ""  # set when the calibration data changes: the same plan then measures differently
        self.memo: Dict[str, Dict[str, Any]] = self._replay() if setup.resume else {}
        setup.journal.unlink(missing_ok=True)  # rewritten with the trials kept: no foreign lines stay
        if self.memo:
            setup.journal.write_text("".join(json.dumps(r) + "\n" for r in self.memo.values()))

    def _replay(self) -> Dict[str, Dict[str, Any]]:
        """The journaled trials of an interrupted run with this run's fingerprint, by plan key; lines
        from another run (other model, data, thresholds, config or code) or damaged are ignored,
        with a warning."""
        s, memo, foreign, damaged = self.setup, {}, 0, 0
        lines = s.journal.read_text().splitlines() if s.journal.exists() else []
        for line in filter(str.strip, lines):
            try:
                rec = json.loads(line)
                key = rec["plan_key"]
            except (ValueError, KeyError, TypeError):
                damaged += 1  # a line cut short by a kill
                continue
            if rec.get("fingerprint") != s.fingerprint:
                foreign += 1
                continue
            memo[key] = rec
        if foreign:
            msg = (f"resume: {foreign} trials in {s.journal.name} were measured by another run (model, data, "
                   "thresholds, config or code differ): ignored, measuring again")
            log.warning("%s", msg)
            s.warnings.append(msg)
        if damaged:
            log.warning("resume: %d damaged lines in %s ignored", damaged, s.journal)
        log.info("resume: %d trials journaled in %s", len(memo), s.journal)
        return memo

    @property
    def left(self) -> int:
        return self.setup.max_iters - len(self.iterations)

    def __call__(self, plan: Plan, prev: Optional[Plan] = None, extra: Optional[Dict[str, Any]] = None,
                 fresh: bool = False) -> List[str]:
        """Measure ``plan``; returns the thresholds it fails (empty: passed). ``fresh``: measure it
        even if a resumed journal has it (weights that are not a function of the plan: a tuning)."""
        t = time.perf_counter()
        key = plan_key(plan, self.context)
        if key in self.memo and not fresh:
            rec = self.memo[key]
            m, task_rows, task_fails = Metrics(**rec["metrics"]), rec.get("tasks", {}), rec.get("task_fails", [])
            extra = dict(extra or {}, resumed=True)
        else:
            m, task_rows, task_fails = self._measure(plan)
            with open(self.setup.journal, "a") as f:
                f.write(json.dumps({"plan_key": key, "fingerprint": self.setup.fingerprint, "metrics": asdict(m),
                                    "tasks": task_rows, "task_fails": task_fails}) + "\n")
        self.last_metrics, self.last_task_fails = m, task_fails
        fails = verdict.check(m, self.base, self.setup.thresholds) + task_fails
        if verdict.nonfinite(m):
            fails += self._nonfinite_cause(plan)
        rec = iteration_record(len(self.iterations), plan, m, fails, time.perf_counter() - t,
                               prev.diff(plan) if prev is not None else None)
        rec.update(extra or {})
        if task_rows:
            rec["tasks"] = task_rows
        self.iterations.append(rec)
        log.info("trial %d: %s | avg bits %.2f | PPL %.3f | KLD %.4f | %s", len(self.iterations) - 1,
                 plan.summary_str(), plan.avg_bits, m.ppl, m.kld_mean, "PASS" if not fails else "; ".join(fails))
        return fails

    def _nonfinite_cause(self, plan: Plan) -> List[str]:
        """Where a trial's NaN/Inf comes from (the first module whose simulated weight or output is
        not finite), for the failed list and the report's warnings; needs the plan applied."""
        if self.setup.locate_nonfinite is None:
            return []
        self.bank.apply(plan, progress=False)  # a replayed trial was never applied
        where = self.setup.locate_nonfinite()
        if where is None:
            return []
        msg = f"trial {len(self.iterations)} ({plan.summary_str()}): non-finite values start at {where}"
        log.warning("%s", msg)
        self.setup.warnings.append(msg)
        return [f"non-finite at {where}"]

    def _measure(self, plan: Plan):
        s = self.setup
        with s.timer("quantize (simulated)"):
            self.bank.apply(plan)
        with s.timer("evaluate trials"):
            m = s.measure(f"trial {len(self.iterations)}")
        task_rows: Dict[str, dict] = {}
        task_fails: List[str] = []
        if s.task_base:
            task_rows, task_fails = verdict.task_checks(s.task_base, s.score_tasks(), s.thresholds)
        return m, task_rows, task_fails
