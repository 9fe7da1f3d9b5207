"""Search policy for a budget (``plan.budget.avg_bits``): the lowest *measured* KLD within the average
bits per weight.

One additive prediction cannot be trusted alone at low widths: modules at 2-3 bits interact, and a
plan that keeps many of them can lose to a plan the loop could as well have built (Gemma-3 at 4.5
bits: 17 modules at W3 measured 0.1775 KLD where every module at W4g64 or wider measured 0.0987).
So the search measures candidates and ships the best one it measured:

1. candidates within the budget, each predicted: the full ladder's plan (each module from the
   cheapest rung up, below plan 0 when the ladder goes there); the same search with a higher floor
   (every module at or above one rung's width); every rung as a uniform plan in each rounding;
2. the best predicted is measured, then the next while trials are left (one kept for tuning) and
   the next one still has a chance: after each measurement the map from the additive prediction to
   the measured KLD is refit on every measured plan, with a learned multiplier of the low-bit (2-3
   bit) options' scores, and the candidates are planned and ranked again; a plan's prediction is
   then corrected by what its measured neighbours missed (the residuals of the measured plans,
   weighted by the share of weights they hold at the same precision): a search plan picked from
   thousands by additive scores reads low for the reasons its measured predecessor read low;
3. the plan shipped is the lowest measured KLD within the budget (plan 0 included).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from quantfix.config import parse_rung, rung_bits
from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision
from quantfix.planner import PRIOR_POWER, Ladder, PredictivePlanner, Space, fit_power, has_calibrated_twin
from quantfix.runreport import TrialRecord
from quantfix.search import SearchResult
from quantfix.trials import Trials, plan_key

log = logging.getLogger(__name__)

LOW_BITS = 3  # options at or below this width get the learned multiplier
WEIGHT_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0)
GIVE_UP = 1.5  # a candidate predicted above this x the best measured KLD is not measured
MAX_CANDIDATES = 5
NEAR_POWER = 3.0  # a measured plan's residual counts by (share of weights at the same precision) ** this
SHRINK = 0.05  # pseudo-weight of a zero residual: one far neighbour does not move the prediction much


@dataclass
class Candidate:
    name: str  # "search", "floor W4g64", "uniform W4g32-gptq-imx"
    plan: Plan
    raw: float  # the additive prediction, weighted
    must: bool = False  # measured whatever its prediction (a simple plan the search must not lose to)


def prune_ladder(ladder: Sequence[str], budget: float, reach: float = 2.0) -> List[str]:
    """The rungs a plan within ``budget`` may use: none more than ``reach`` bits above it or below it
    (their options would be simulated and scored for nothing), but always 8 bits and float (the most
    sensitive modules' way out) and the cheapest rung (the budget's floor)."""
    cheapest = min(ladder, key=rung_bits)
    keep = [r for r in ladder if abs(rung_bits(r) - budget) <= reach or parse_rung(r).bits >= 8 or r == cheapest]
    return keep


class BudgetSearch:
    """The candidates, their predictions (refit on every measurement) and the measuring loop."""

    def __init__(self, trial: Trials, plan0: Plan, diagnosis, options: Dict[str, Dict[str, Precision]],
                 budget: float, ladder: Ladder, reserve: int = 0, start: Optional[TrialRecord] = None):
        sens = diagnosis.sensitivity
        self.trial, self.plan0, self.budget, self.ladder, self.reserve = trial, plan0, budget, ladder, reserve
        self.options = options
        self.anchor: Optional[TrialRecord] = None  # the fit's anchor (``_anchor``), when one was measured
        self._make = lambda space: PredictivePlanner(plan0, sens.option_base or sens.modules, sens.options, options,
                                                     diagnosis.findings, space)
        self.table = self._make(Space(floor=0.0))  # unweighted scores of every scored precision
        if not self.table.fits(budget):
            raise QuantfixError(f"plan.budget.avg_bits={budget} is below the cheapest plan on loop.ladder "
                                f"({self.table.bits_at(0):.2f} bits): add a lower rung or raise the budget")
        self.weight = 1.0
        self.searched = False  # the full search's plan was measured
        # plan 0's trial (after a recalibration, with the new data): by default the last one measured
        self.start = start or trial.last
        self.measured: List[Tuple[Plan, float]] = []
        self.fit: Tuple[float, float] = (1.0, PRIOR_POWER)
        self.residuals: List[Tuple[Plan, float]] = []  # (measured plan, log(measured / fitted prediction))
        self.learn(self.start.plan, self.start.metrics.kld_mean)

    # ---- predictions ------------------------------------------------------------------------
    def weigh(self, weight: float) -> Callable[[Precision], float]:
        return lambda q: weight if not q.is_float and q.bits <= LOW_BITS else 1.0

    def raw(self, plan: Plan, weight: Optional[float] = None) -> float:
        return self.table.raw_of(plan, self.weigh(self.weight if weight is None else weight))

    def predict(self, raw: float) -> float:
        scale, power = self.fit
        return scale * raw ** power if raw > 0 else 0.0

    def predicted(self, plan: Plan, raw: Optional[float] = None) -> float:
        """The fitted prediction of ``plan``, times what its measured neighbours' predictions missed
        (geometric, weighted by likeness, shrunk towards 1)."""
        base = self.predict(self.raw(plan) if raw is None else raw)
        near = [(likeness(plan, other) ** NEAR_POWER, r) for other, r in self.residuals]
        return base * math.exp(sum(w * r for w, r in near) / (sum(w for w, _ in near) + SHRINK))

    def learn(self, plan: Plan, kld: float) -> None:
        """One more measured plan: the map refit on every measured plan, then each one's residual
        under it (once per measurement, not once per candidate predicted)."""
        self.measured.append((plan, kld))
        self.fit = self._refit()
        guesses = [(p, k, self.predict(self.raw(p))) for p, k in self.measured]
        self.residuals = [(p, math.log(k / g)) for p, k, g in guesses if k > 0 and g > 0]

    def _refit(self) -> Tuple[float, float]:
        """The low-bit multiplier and the power law that best explain the measured plans. Two points
        fit the multiplier with the prior power (they cannot fit both); three or more fit both; the
        multiplier moves only when the measured plans differ in their low-bit share. A plan with
        low-bit modules in a rounding no candidate may use (a W3g64 RTN plan 0 beside the ladder's
        W3g64 in imatrix / GPTQ) is no point of the fit: it says nothing of the options the candidates
        are made of, and it sits where the KLD saturates (the demo at 3.43 bits: plan 0 at 2.04 set
        the multiplier to 0.5, from W4g64 it was 3, and the plans from W3g64 measured 0.578 vs 0.535)."""
        pts = [(plan, kld) for plan, kld in self.measured if kld > 0 and self._low_bits_chosen(plan)]
        if not pts:
            return 1.0, PRIOR_POWER
        fixed = PRIOR_POWER if len(pts) < 3 else None
        shares = {round(self.raw(p, 2.0) - self.raw(p, 1.0), 9) for p, _ in pts}
        if len(pts) >= 2 and len(shares) > 1:
            self.weight = min(WEIGHT_GRID, key=lambda w: _log_sse([(self.raw(p, w), k) for p, k in pts], fixed))
        return _fit([(self.raw(p), k) for p, k in pts], fixed)

    def _low_bits_chosen(self, plan: Plan) -> bool:
        """No low-bit module of ``plan`` is at a precision budget mode never chooses (RTN beside a
        calibrated option of its width)."""
        return not any(q.bits <= LOW_BITS and has_calibrated_twin(q, self.options.get(n, {}).values())
                       for n, q in plan.modules.items())

    # ---- candidates -------------------------------------------------------------------------
    def candidates(self) -> List[Candidate]:
        """Every candidate plan within the budget, no plan twice: first the ones the search must
        measure (it must not lose to a plan it could as well have built): the full search, the two
        highest floors that fit, the widest uniform rung in its best rounding; then the rest; each
        group best predicted first."""
        w = self.weigh(self.weight)
        floors = sorted({round(rung_bits(r), 6) for r in self._rungs()})
        searched = []
        for i, floor in enumerate(floors):
            planner = self._make(Space(floor=0.0 if i == 0 else floor, weigh=w))
            if planner.fits(self.budget):
                name = "search" if i == 0 else f"floor {floor:.3g} bits"
                searched.append(Candidate(name, planner.plan_at(planner.largest_within(self.budget)), 0.0))
        uniform = self._unique(self._uniform())
        widest = max((c.plan.avg_bits for c in uniform), default=None)
        best_uniform = [min((c for c in uniform if c.plan.avg_bits == widest), key=lambda c: c.raw)] if uniform else []
        # the search's own plan is a must once: its re-plans after a refit compete by prediction
        must = self._unique(([] if self.searched else searched[:1]) + searched[-2:][::-1] + best_uniform)
        for c in must:
            c.must = True
        rest = [c for c in self._unique(searched + uniform) if plan_key(c.plan) not in {plan_key(m.plan) for m in must}]
        must = [c for c in must if c.name == "search"] + sorted((c for c in must if c.name != "search"), key=lambda c: c.raw)
        return must + sorted(rest, key=lambda c: self.predicted(c.plan, c.raw))

    def _unique(self, cands: List[Candidate]) -> List[Candidate]:
        """The candidates within the budget, each plan once (the first name kept), their raw prediction set."""
        seen, out = set(), []
        for c in cands:
            key = plan_key(c.plan)
            if key not in seen and c.plan.avg_bits <= self.budget + 1e-6:
                seen.add(key)
                c.raw = self.raw(c.plan)
                out.append(c)
        return out

    def _rungs(self) -> List[str]:
        return [f"{r.bits}/{r.group}" + ("" if r.symmetric is None else "s" if r.symmetric else "a")
                for r in self.ladder.rungs if r.bits < 16]

    def _uniform(self) -> List[Candidate]:
        """Each rung in each rounding scored for every module, as a plan of its own."""
        out = []
        algs = sorted({q.algorithm for n in self.table.kld for q in self.table.kld[n] if not q.is_float})
        for rung in self.ladder.rungs:
            if rung.bits >= 16:
                continue
            for a in algs:
                changes = {n: self.ladder.precision(rung, p, self.plan0.shapes[n][1], a)
                           for n, p in self.plan0.modules.items()}
                if all(q in self.table.kld[n] for n, q in changes.items() if n in self.table.kld):
                    plan = self.plan0.with_changes(changes, note=f"uniform {next(iter(changes.values())).label}")
                    out.append(Candidate(f"uniform {next(iter(changes.values())).label}", plan, 0.0))
        return out

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> SearchResult:
        self.anchor = self._anchor()
        tried = {plan_key(p) for p, _ in self.measured}
        recs: List[TrialRecord] = []
        while self.trial.left > self.reserve and len(recs) < MAX_CANDIDATES:
            todo = [c for c in self.candidates() if plan_key(c.plan) not in tried]
            if not todo:
                break
            c, best = todo[0], self._best(recs)
            guess = self.predicted(c.plan, c.raw)
            if not c.must and len(self.measured) >= 3 and best is not None and guess > GIVE_UP * best.metrics.kld_mean:
                log.info("budget search: the next candidate (%s) is predicted %.4f, far above the best measured %.4f: "
                         "stopping", c.name, guess, best.metrics.kld_mean)
                break
            tried.add(plan_key(c.plan))
            self.searched = self.searched or c.name == "search"
            rec = self.trial.earlier(c.plan) or self.trial(  # a recalibration's probe may be a candidate
                c.plan, self.plan0, predicted=guess, budget_avg_bits=self.budget, action=f"budget candidate: {c.name}",
                actions=_kinds(self.plan0, c.plan))
            recs.append(rec)
            self.learn(c.plan, rec.metrics.kld_mean)
        best = self._best(recs)
        if best is None:
            raise QuantfixError(f"plan.budget.avg_bits={self.budget}: no plan within the budget could be measured "
                                "(loop.max_iters too low?): raise loop.max_iters")
        reason = (f"lowest measured KLD within plan.budget.avg_bits={self.budget} ({len(recs)} candidates measured, "
                  f"low-bit multiplier {self.weight:g})" + ("; thresholds not met" if best.failed else ""))
        result = SearchResult(None if best.failed else best, best, reason)
        result.frontier = self._make(Space(floor=0.0, weigh=self.weigh(self.weight))).frontier()
        return result

    def _anchor(self) -> Optional[TrialRecord]:
        """A plan 0 that is no point of the fit (W3g64 RTN) leaves the candidates alone to fit the low-bit
        multiplier, and plans at one budget hold nearly the same low-bit share: fit on them alone it stayed
        at the end of its grid (0.5, demo at 3.43 bits, this CPU: 0.5246) where a W4g64 plan 0 (no low-bit
        module) gave 2-3 and better plans (0.5121). So one plan without low-bit modules is measured first, the
        cheapest such uniform rung in its best predicted rounding (a trial granted: not a candidate; shipped
        like one when it is the best measured within the budget)."""
        if self._low_bits_chosen(self.start.plan):
            return None
        wide = [c for c in self._uniform() if all(q.is_float or q.bits > LOW_BITS for q in c.plan.modules.values())]
        if not wide:
            return None
        bits = min(c.plan.avg_bits for c in wide)
        c = min((c for c in wide if c.plan.avg_bits == bits), key=lambda c: self.raw(c.plan))
        rec = self.trial.earlier(c.plan)  # measured already: by ``opening`` (a recalibration's check)
        if rec is None:
            self.trial.grant(1)
            rec = self.trial(c.plan, self.plan0, action=f"budget search: the fit's anchor, {c.name}")
        self.learn(c.plan, rec.metrics.kld_mean)
        return rec

    def opening(self, action: str) -> List[TrialRecord]:
        """The plans this search measures first, measured now in granted trials: the fit's anchor (when
        plan 0 is no point of the fit) and the first candidate, named ``action: <candidate>``. What budget
        mode judges a recalibration by, under each calibration (its own diagnosis each): the plans the
        search is made of, not plan 0's widths (the demo from W3g64 RTN at 3.92 bits, HumanEval added:
        plan 0's widths 0.873 -> 0.791 in GPTQ, the searched plans 0.277 -> 0.354). A search run after
        this one with the same diagnosis and calibration reuses them (``Trials.earlier``)."""
        anchor = self._anchor()
        tried = {plan_key(p) for p, _ in self.measured}
        c = next((c for c in self.candidates() if plan_key(c.plan) not in tried), None)
        rec = None if c is None else self.trial.earlier(c.plan)
        if c is not None and rec is None:
            self.trial.grant(1)
            rec = self.trial(c.plan, self.plan0, predicted=self.predicted(c.plan, c.raw), budget_avg_bits=self.budget,
                             action=f"{action}: {c.name}", actions=_kinds(self.plan0, c.plan))
        return [r for r in (anchor, rec) if r is not None]

    def _best(self, recs: List[TrialRecord]) -> Optional[TrialRecord]:
        """The lowest measured KLD within the budget among the search's candidates (the fit's anchor
        included) and plan 0."""
        pool = [r for r in list(recs) + [self.start, self.anchor]
                if r is not None and r.avg_bits <= self.budget + 1e-6 and math.isfinite(r.metrics.kld_mean)]
        return min(pool, key=lambda r: r.metrics.kld_mean) if pool else None


def likeness(a: Plan, b: Plan) -> float:
    """The share of ``a``'s weights that ``b`` holds at the same precision (rounding included)."""
    same = sum(o * i for n, (o, i) in a.shapes.items() if b.modules.get(n) == a.modules[n])
    return same / max(a.n_params, 1)


def _kinds(plan0: Plan, plan: Plan) -> Dict[str, int]:
    """The changes from plan 0 by kind: more or fewer bits, another group, another rounding, float."""
    out: Dict[str, int] = {}
    for n, p in plan.modules.items():
        p0 = plan0.modules[n]
        if p == p0:
            continue
        kind = "keep in FP16" if p.is_float else f"{p0.bits} -> {p.bits} bits" if p.bits != p0.bits else \
            f"group {p0.group_size or 'ch'} -> {p.group_size or 'ch'}" if p.group_size != p0.group_size else "same width"
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items(), key=lambda t: -t[1]))


def _fit(pts: List[Tuple[float, float]], power: Optional[float] = None) -> Tuple[float, float]:
    """(scale, power) through ``pts``: ``fit_power``, or with the power given, through the last point."""
    if power is None:
        return fit_power(pts)
    raw, meas = pts[-1]
    return meas / raw ** power, power


def _log_sse(pts: List[Tuple[float, float]], power: Optional[float] = None) -> float:
    """Squared log error of the power law fit through ``pts`` (raw, measured)."""
    scale, power = _fit(pts, power)
    return sum((math.log(max(scale * r ** power, 1e-12)) - math.log(k)) ** 2 for r, k in pts if r > 0)
