"""Trials: apply a plan in place (simulated), measure it, check the thresholds, record it.

Every trial's metrics are appended to ``trials.jsonl``; with ``resume`` a rerun in the same run dir
replays them instead of evaluating again (the search is deterministic). A trial returns its
``TrialRecord``; ``Trials.records`` holds them all, in order, for the recipe's report.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from quantfix import verdict
from quantfix.config import ThresholdsConfig
from quantfix.evaluate import Metrics
from quantfix.plan import Plan
from quantfix.runreport import TrialRecord

log = logging.getLogger(__name__)


def plan_key(plan: Plan, context: str = "") -> str:
    """The journal key of a plan's trial; ``context`` names what else decides its weights (the
    calibration domains after a recalibration)."""
    body = json.dumps({n: asdict(p) for n, p in sorted(plan.modules.items())}, sort_keys=True) + context
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def record(i: int, plan: Plan, m: Metrics, fails: List[str], seconds: float, prev: Optional[Plan] = None) -> TrialRecord:
    """The record of trial ``i``: ``plan`` measured ``m``; ``prev`` is the plan it changed."""
    changes = prev.diff(plan) if prev is not None else {}
    return TrialRecord(i, plan.summary_str(), plan.widths_str(), plan.rounding_str(), plan.note, round(plan.avg_bits, 4),
                       round(plan.avg_bits_model, 4), plan.size_bytes, m, fails, round(seconds, 2),
                       changes={n: f"{a} -> {b}" for n, (a, b) in changes.items()}, plan=plan)


@dataclass
class TrialSetup:
    """What a trial needs besides the plan: how to apply it, measure it and judge it."""

    bank: Any  # bank.WeightBank over the live model
    measure: Callable[[str], Metrics]  # metrics of the live model (argument: progress label)
    base: Metrics  # the float model's
    thresholds: ThresholdsConfig
    max_iters: int
    journal: Path
    resume: bool = False
    timer: Any = None  # timing.Timer
    task_base: Optional[Dict[str, Any]] = None  # float task results (eval.tasks), or None
    score_tasks: Optional[Callable[[], Dict[str, Any]]] = None  # task results of the live model
    fingerprint: str = ""  # of the run's inputs: journal lines of another run are ignored
    locate_nonfinite: Optional[Callable[[], Optional[str]]] = None  # where the live model turns NaN/Inf


class Trials:
    """Runs and records trials. ``records``: every trial, in order; ``warnings``: what the trials
    found that the report must say (a non-finite trial, a journal from another run)."""

    def __init__(self, setup: TrialSetup):
        self.setup, self.bank, self.base = setup, setup.bank, setup.base
        self.records: List[TrialRecord] = []
        self.warnings: List[str] = []
        self._granted = 0  # trials beyond loop.max_iters (grant)
        self._context: List[str] = []  # what changed the weights a plan gets (recalibration, re-rounding)
        self._by_key: Dict[str, TrialRecord] = {}  # this run's trials of plans (not tunings), by journal key
        self.memo: Dict[str, Dict[str, Any]] = self._replay() if setup.resume else {}
        setup.journal.unlink(missing_ok=True)  # rewritten with the trials kept: no foreign lines stay
        if self.memo:
            setup.journal.write_text("".join(json.dumps(r) + "\n" for r in self.memo.values()))

    def vary(self, what: str) -> Tuple[str, ...]:
        """Something besides the plan changed the weights (a recalibration, a checkpoint's modules
        re-rounded): the same plan measures differently from now on, so its journal key changes.
        Returns the context before, for ``revert``."""
        before = tuple(self._context)
        self._context.append(what)
        return before

    def revert(self, context: Tuple[str, ...]) -> None:
        """The weights are what they were in ``context`` again (an undone recalibration): a plan gets
        the journal key it had then."""
        self._context = list(context)

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
            self._warn(f"resume: {foreign} trials in {s.journal.name} were measured by another run (model, data, "
                       "thresholds, config or code differ): ignored, measuring again")
        if damaged:
            log.warning("resume: %d damaged lines in %s ignored", damaged, s.journal)
        log.info("resume: %d trials journaled in %s", len(memo), s.journal)
        return memo

    def _warn(self, msg: str) -> None:
        log.warning("%s", msg)
        self.warnings.append(msg)

    @property
    def left(self) -> int:
        return self.setup.max_iters + self._granted - len(self.records)

    def grant(self, n: int = 1) -> None:
        """``n`` more trials than loop.max_iters, for measurements that are not search steps (a
        recalibration's check of a plan the search will not ship): the search keeps its own count."""
        self._granted += n

    def earlier(self, plan: Plan) -> Optional[TrialRecord]:
        """This run's trial of ``plan`` with the weights it would get now (same plan, same
        calibration context; a tuning never counts), or None: a plan measured once is not measured
        again (a recalibration check's probe that the budget search also proposes)."""
        return self._by_key.get(plan_key(plan, "; ".join(self._context)))

    @property
    def last(self) -> TrialRecord:
        return self.records[-1]

    def __call__(self, plan: Plan, prev: Optional[Plan] = None, *, fresh: bool = False,
                 predicted: Optional[float] = None, **why) -> TrialRecord:
        """Measure ``plan`` and record it. ``prev``: the plan it changes (its changes are listed);
        ``fresh``: measure it even if a resumed journal has it (weights that are not a function of the
        plan: a tuning); ``predicted``: the KLD the planner expects (the record keeps the error);
        ``why``: the record's other fields (action, drivers, actions, kld_target, probe, ...)."""
        t = time.perf_counter()
        key = plan_key(plan, "; ".join(self._context))
        resumed = key in self.memo and not fresh
        if resumed:
            rec = self.memo[key]
            m, task_rows, task_fails = Metrics(**rec["metrics"]), rec.get("tasks", {}), rec.get("task_fails", [])
        else:
            m, task_rows, task_fails = self._measure(plan)
            self._journal(key, m, task_rows, task_fails)
        fails = verdict.check(m, self.base, self.setup.thresholds) + task_fails
        if verdict.nonfinite(m):
            fails += self._nonfinite_cause(plan)
        r = record(len(self.records), plan, m, fails, time.perf_counter() - t, prev)
        for name, value in why.items():
            setattr(r, name, value)
        r.resumed, r.tasks, r.task_failed = resumed, task_rows, task_fails
        if predicted is not None:
            r.predicted_kld = round(predicted, 5)
            r.prediction_error_pct = round(100 * (predicted / max(m.kld_mean, 1e-12) - 1), 1)
        self.records.append(r)
        if not fresh:
            self._by_key[key] = r
        log.info("trial %d: %s | avg bits %.2f | PPL %.3f | KLD %.4f | %s", r.id, plan.summary_str(), plan.avg_bits,
                 m.ppl, m.kld_mean, "PASS" if not fails else "; ".join(fails))
        return r

    def _journal(self, key: str, m: Metrics, task_rows: dict, task_fails: List[str]) -> None:
        with open(self.setup.journal, "a") as f:
            f.write(json.dumps({"plan_key": key, "fingerprint": self.setup.fingerprint, "metrics": asdict(m),
                                "tasks": task_rows, "task_fails": task_fails}) + "\n")

    def _nonfinite_cause(self, plan: Plan) -> List[str]:
        """Where a trial's NaN/Inf comes from (the first module whose simulated weight or output is
        not finite), for the failed list and the report's warnings; needs the plan applied."""
        if self.setup.locate_nonfinite is None:
            return []
        self.bank.apply(plan, progress=False)  # a replayed trial was never applied
        where = self.setup.locate_nonfinite()
        if where is None:
            return []
        self._warn(f"trial {len(self.records)} ({plan.summary_str()}): non-finite values start at {where}")
        return [f"non-finite at {where}"]

    def _measure(self, plan: Plan):
        s = self.setup
        with s.timer("quantize (simulated)"):
            self.bank.apply(plan)
        with s.timer("evaluate trials"):
            m = s.measure(f"trial {len(self.records)}")
        task_rows: Dict[str, dict] = {}
        task_fails: List[str] = []
        if s.task_base:
            task_rows, task_fails = verdict.task_checks(s.task_base, s.score_tasks(), s.thresholds)
        return m, task_rows, task_fails
