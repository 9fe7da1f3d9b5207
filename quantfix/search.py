"""Search policies: from a failing plan 0 to the smallest plan that passes, one trial at a time.

``predictive`` (the default) predicts the cheapest passing plan from the diagnosis, measures it,
refits on a miss and bisects toward a smaller plan after a pass; ``greedy`` promotes the modules
with the largest calibration output error per added bit, ``loop.bits_step`` bits at a time.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from quantfix import verdict
from quantfix.config import LoopConfig, ThresholdsConfig
from quantfix.plan import Plan, Precision
from quantfix.planner import GreedyPlanner, Ladder, PredictivePlanner
from quantfix.runreport import TrialRecord
from quantfix.trials import Trials


@dataclass
class SearchResult:
    best: Optional[TrialRecord]  # the smallest passing plan's trial (None: none passed)
    last: TrialRecord  # the last plan tried
    reason: str  # why the search stopped
    frontier: List[Tuple[float, float]] = field(default_factory=list)  # predicted (avg bits, KLD)
    below: Optional[TrialRecord] = None  # the largest measured plan below ``best`` that failed (None: plan 0 or none)

    @property
    def chosen(self) -> TrialRecord:
        return self.best or self.last


def bisect(trial: Trials, make, lo: int, hi: int, best: TrialRecord, prev: Plan) -> Tuple[TrialRecord, str]:
    """Smallest passing prefix between lo (fails) and hi (passes) while trials are left. ``make`` is
    a PredictivePlanner (each trial records its prediction and refits it) or a function k -> Plan."""
    planner = make if isinstance(make, PredictivePlanner) else None
    while hi - lo > 1 and trial.left > 0:
        mid = (lo + hi) // 2
        if planner is not None:
            rec = trial(planner.plan_at(mid), prev, **_why(planner, mid))
            planner.calibrate(mid, rec.metrics.kld_mean)
        else:
            rec = trial(make(mid), prev)
        if rec.failed:
            lo = mid
        else:
            hi, best = mid, rec
    return best, ("passed; bisection converged" if hi - lo <= 1 else "passed; loop.max_iters reached while bisecting")


def greedy(trial: Trials, plan0: Plan, ladder: List[str], loop: LoopConfig,
           output_error: Callable[[str, Precision], float], timer) -> SearchResult:
    """``ladder``: the run's rungs (``config.ladder_of``)."""
    planner = GreedyPlanner(Ladder.parse(ladder), output_error, loop.bits_step)
    plan, last = plan0, trial.last
    while trial.left > 0:
        with timer("plan"):
            step = planner.next_plan(plan)
        if step is None:
            return SearchResult(None, last, "every module is at the top of loop.ladder and the plan still fails")
        new, changes = step
        last = trial(new, plan)
        if last.failed:
            plan = new
            continue

        def make(k, plan=plan, changes=changes, n=len(changes)):
            return plan.with_changes(dict(changes[:k]), note=f"bisect: first {k} of {n} promotions")

        best, reason = bisect(trial, make, 0, len(changes), last, plan)
        return SearchResult(best, best, reason)
    return SearchResult(None, last, f"loop.max_iters={loop.max_iters} reached without a passing plan")


@dataclass(frozen=True)
class Goal:
    """What the predictive search aims at: the cheapest plan passing ``thresholds``, or with
    ``budget`` (GGUF mode's plan.budget.avg_bits; other budgets are ``quantfix.budget``'s measured
    candidates) the lowest predicted KLD within it. ``refine_misses``, threshold mode: after a pass,
    stop refining once this many smaller plans in a row have failed, or the map through the last failing
    and passing plan predicts no plan 0.05 bits smaller to pass (None: neither; until converged or out
    of trials)."""

    thresholds: ThresholdsConfig
    budget: Optional[float] = None
    refine_misses: Optional[int] = None


def predictive(trial: Trials, plan0: Plan, diagnosis, options: Dict[str, Dict[str, Precision]], goal: Goal, timer,
               start: Optional[TrialRecord] = None) -> SearchResult:
    """Predict the cheapest passing plan from the diagnosis, verify it, recalibrate on a miss; with
    a budget, the lowest predicted KLD within it, after one probe plan. ``start``: plan 0's trial
    (default: the last one measured)."""
    sens = diagnosis.sensitivity
    with timer("plan"):
        planner = PredictivePlanner(plan0, sens.option_base or sens.modules, sens.options, options, diagnosis.findings)
    start = start or trial.last
    planner.calibrate(0, start.metrics.kld_mean)
    result = _within_budget(trial, planner, plan0, goal.budget) if goal.budget is not None else \
        _cheapest_passing(trial, planner, plan0, goal.thresholds, start, goal.refine_misses)
    result.frontier = planner.frontier()
    return result


def _why(planner: PredictivePlanner, k: int, **more) -> dict:
    """What the record says of a predicted plan: the prediction, the findings that drove its
    changes, and the changes themselves (counted by kind)."""
    return {"predicted": planner.predict(k), **more,
            "drivers": {r: len(v) for r, v in planner.drivers(k).items()}, "actions": planner.actions(k)}


def _within_budget(trial: Trials, planner: PredictivePlanner, plan0: Plan, budget: float) -> SearchResult:
    """The lowest predicted KLD within the budget. First one probe plan halfway (in predicted KLD)
    between plan 0 and it, measured: the power of the map from the additive prediction to the
    measured KLD is then fit on two points of this model instead of extrapolated with the prior
    (from a W3 start the prior's prediction for the budget plan was 57-75% high on the demo)."""
    k = planner.pack_within(budget)
    if k > 1 and trial.left > 1:
        kp = probe_step(planner, k)
        rec = trial(planner.plan_at(kp), plan0, **_why(planner, kp, probe=True))
        planner.calibrate(kp, rec.metrics.kld_mean)
    rec = trial(planner.plan_at(k), plan0, **_why(planner, k, budget_avg_bits=budget))
    reason = f"lowest predicted KLD within plan.budget.avg_bits={budget}" + ("; thresholds not met" if rec.failed else "")
    return SearchResult(None if rec.failed else rec, rec, reason)


def probe_step(planner: PredictivePlanner, k: int) -> int:
    """The first step whose raw prediction is at most the geometric mean of plan 0's and step k's."""
    r0, rk = planner.raw_prediction(0), planner.raw_prediction(k)
    mid = math.sqrt(max(r0, 1e-12) * max(rk, 1e-12))
    return next((j for j in range(1, k) if planner.raw_prediction(j) <= mid), k - 1)


def _refine(trial: Trials, planner: PredictivePlanner, plan0: Plan, thresholds: ThresholdsConfig, target: float,
            lo: Tuple[int, Optional[TrialRecord]], hi: Tuple[int, TrialRecord],
            misses: Optional[int] = None) -> Tuple[TrialRecord, str, Optional[TrialRecord]]:
    """After a pass at ``hi`` (its step and trial; ``lo``: the failing step and its trial, or plan 0's
    step 0): the predictor, refit on every trial, proposes the smallest plan it expects to pass in
    between; it is measured; repeat. Where the prediction would not move, the midpoint is tried
    instead. Once a smaller plan has failed, no plan is tried that the map fit on the failing and the
    passing plan alone predicts to fail (``bracket_floor``; not with ``misses`` None, which asks for
    the exhaustive refinement): on the demo the midpoint tried after the first miss (5.18 bits, where
    the global fit too predicted a miss) missed as well. Stops when the failing and the passing plan
    are within 0.05 average bits, or the smallest plan that map predicts to pass is; when ``misses``
    smaller plans in a row have failed (each miss says the predictor is optimistic this close to the
    threshold, and what is left to win is less than the gap); or when no trial is left.
    Returns (the smallest passing trial, why it stopped, the largest failing trial below it)."""
    base = trial.base
    (lo, lo_rec), (hi, best) = lo, hi
    planner.calibrate(hi, best.metrics.kld_mean)
    missed = 0
    while hi - lo > 1 and trial.left > 0:
        gap = planner.bits_at(hi) - planner.bits_at(lo)
        if gap < 0.05:
            return best, "passed; converged (the smallest passing plan is within 0.05 bits of a failing one)", lo_rec
        if misses is not None and missed >= misses:
            return best, (f"passed; {missed} smaller plan{'s' if missed > 1 else ''} in a row failed "
                          f"(loop.refine_misses={misses}): the smallest passing plan is within {gap:.2f} bits of a "
                          "failing one"), lo_rec
        floor = None
        if lo_rec is not None and misses is not None:  # the map through the bracket bounds the next plan
            floor = planner.bracket_floor((lo, lo_rec.metrics.kld_mean), (hi, best.metrics.kld_mean), target)
        if floor is not None and planner.bits_at(hi) - planner.bits_at(floor) < 0.05:
            return best, ("passed; converged (the map through the smallest passing and the largest failing plan "
                          f"predicts no plan 0.05 bits smaller to pass: the smallest it predicts to pass has "
                          f"{planner.bits_at(floor):.3f} bits, the passing plan {planner.bits_at(hi):.3f})"), lo_rec
        k = planner.first_passing(target, margin=0.97, after=lo)
        if k is None or k >= hi:
            k = (lo + hi) // 2
        k = max(k, floor or 0)
        rec = trial(planner.plan_at(k), plan0, **_why(planner, k, kld_target=round(target, 5)))
        planner.calibrate(k, rec.metrics.kld_mean)
        if not (rec.task_failed and len(rec.task_failed) == len(rec.failed)):
            target = verdict.kld_target(thresholds, base.ppl, verdict.nll_per_kld(rec.metrics, base))
        if rec.failed:
            lo, lo_rec, missed = k, rec, missed + 1
        else:
            hi, best, missed = k, rec, 0
    if hi - lo <= 1:
        return best, "passed; converged (one upgrade step from a failing plan)", lo_rec
    return best, "passed; loop.max_iters reached while refining", lo_rec


def _cheapest_passing(trial: Trials, planner: PredictivePlanner, plan0: Plan,
                      thresholds: ThresholdsConfig, start: TrialRecord,
                      refine_misses: Optional[int] = None) -> SearchResult:
    base = trial.base
    last = start
    target = verdict.kld_target(thresholds, base.ppl, verdict.nll_per_kld(last.metrics, base))
    lo, lo_rec = 0, None
    while trial.left > 0:
        k = planner.first_passing(target, after=lo)
        if k is None:
            k = len(planner.steps)
            if k <= lo:
                return SearchResult(None, last, "no plan on loop.ladder is predicted to pass, and the largest one failed")
        last = trial(planner.plan_at(k), plan0, **_why(planner, k, kld_target=round(target, 5)))
        m = last.metrics
        if not last.failed:
            best, reason, below = _refine(trial, planner, plan0, thresholds, target, (lo, lo_rec), (k, last),
                                          refine_misses)
            return SearchResult(best, best, reason, below=below)
        # missed: refit the prediction and the NLL/KLD ratio on this measurement, then replan
        planner.calibrate(k, m.kld_mean)
        if last.task_failed and len(last.task_failed) == len(last.failed):
            # only a task failed: the KLD that passes PPL is not enough for the task; ask for less
            target = min(target, m.kld_mean) * 0.7
        else:
            target = verdict.kld_target(thresholds, base.ppl, verdict.nll_per_kld(m, base))
        lo, lo_rec = k, last
        if k >= len(planner.steps):
            return SearchResult(None, last, "every module is at the top of loop.ladder and the plan still fails")
    return SearchResult(None, last, f"loop.max_iters={trial.setup.max_iters} reached without a passing plan")
