"""Search policies (``quantfix.search``): bisection, greedy and the predictive search's budget mode,
on fake trials where a unit test will do."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from quantfix import search
from quantfix.config import LoopConfig, ThresholdsConfig
from quantfix.evaluate import Metrics
from quantfix.plan import Plan, Precision
from quantfix.timing import Timer


class FakeTrials:
    """Stands in for ``trials.Trials``: a trial of ``plan`` measures ``kld_of(plan)`` and fails above
    ``limit``; ``left`` counts down from ``max_iters``."""

    def __init__(self, kld_of, limit: float, max_iters: int):
        self.kld_of, self.limit, self.records = kld_of, limit, []
        self.setup = SimpleNamespace(max_iters=max_iters)
        self.base = Metrics(10.0, math.log(10.0), 0.0, 0.0, 0.0, 1.0, 100)

    @property
    def left(self) -> int:
        return self.setup.max_iters - len(self.records)

    @property
    def last(self):
        return self.records[-1]

    def __call__(self, plan, prev=None, **why):
        kld = self.kld_of(plan)
        m = Metrics(10.0 * math.exp(kld), math.log(10.0) + kld, kld, kld, kld, 1.0, 100)
        rec = SimpleNamespace(id=len(self.records), plan=plan, metrics=m, why=why, task_failed=[],
                              failed=[f"KLD {kld} > {self.limit}"] if kld > self.limit else [])
        self.records.append(rec)
        return rec


def test_bisection_converges_to_the_smallest_passing_prefix():
    trial = FakeTrials(lambda k: 0.0 if k >= 7 else 1.0, 0.5, max_iters=20)  # prefixes of 7 and more pass
    top = trial(20)
    best, reason = search.bisect(trial, lambda k: k, 0, 20, top, None)
    assert best.plan == 7 and reason == "passed; bisection converged"
    assert [r.plan for r in trial.records] == [20, 10, 5, 7, 6]  # halving, one trial each
    # out of trials on the way: the smallest prefix that passed so far
    trial = FakeTrials(lambda k: 0.0 if k >= 7 else 1.0, 0.5, max_iters=3)
    best, reason = search.bisect(trial, lambda k: k, 0, 20, trial(20), None)
    assert best.plan == 10 and reason == "passed; loop.max_iters reached while bisecting"
    assert [r.plan for r in trial.records] == [20, 10, 5]


def _plan(n=3, p=Precision(4, 64)):
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(n)]
    return Plan({m: p for m in names}, {m: (64, 128) for m in names})


def _greedy(trial, plan0, max_iters, bits_step, err):
    loop = LoopConfig(max_iters=max_iters, ladder=["4/64", "8/0", "16/0"], bits_step=bits_step)
    return search.greedy(trial, plan0, list(loop.ladder), loop, lambda n, p: err[n] / p.bits, Timer())


def test_greedy_stops_at_the_top_of_the_ladder():
    plan0 = _plan()
    err = {n: e for n, e in zip(plan0.modules, (5.0, 1.0, 3.0))}
    trial = FakeTrials(lambda plan: 1.0, 0.5, max_iters=20)  # nothing passes
    trial(plan0)
    res = _greedy(trial, plan0, 20, 1e-4, err)  # one module one rung per trial
    assert res.best is None and res.chosen is res.last is trial.last
    assert res.reason == "every module is at the top of loop.ladder and the plan still fails"
    assert len(trial.records) == 1 + 3 * 2  # plan 0, then each module up two rungs
    assert all(p.is_float for p in res.last.plan.modules.values())
    # out of trials first: said so
    trial = FakeTrials(lambda plan: 1.0, 0.5, max_iters=3)
    trial(plan0)
    res = _greedy(trial, plan0, 3, 1e-4, err)
    assert res.best is None and res.reason == "loop.max_iters=3 reached without a passing plan"


def test_greedy_bisects_its_passing_step_to_the_smallest_prefix():
    """One step promotes all three modules (largest error per bit first: 0, 2, 1) and passes; the
    bisection finds that modules 0 and 2 are enough."""
    plan0 = _plan()
    names = list(plan0.modules)
    err = dict(zip(names, (5.0, 1.0, 3.0)))

    def kld(plan):
        return 0.0 if plan.modules[names[0]].bits > 4 and plan.modules[names[2]].bits > 4 else 1.0

    trial = FakeTrials(kld, 0.5, max_iters=10)
    trial(plan0)
    res = _greedy(trial, plan0, 10, 100.0, err)
    assert res.best is res.last and res.reason == "passed; bisection converged"
    assert {n for n, p in res.chosen.plan.modules.items() if p.bits > 4} == {names[0], names[2]}
    assert res.chosen.plan.note == "bisect: first 2 of 3 promotions"
    assert len(trial.records) == 4  # plan 0, all three, the first one (fails), the first two


def test_search_result_chosen_is_the_best_else_the_last():
    best, last = SimpleNamespace(id=1), SimpleNamespace(id=2)
    assert search.SearchResult(best, last, "passed").chosen is best
    assert search.SearchResult(None, last, "failed").chosen is last


def _predictive_setup(max_iters):
    """Three modules whose KLD adds up: 0.4 each at W4g64, 0.05 at W8, 0 in float; the diagnosis's
    numbers are the truth, so the planner's prediction is exact."""
    plan0 = _plan()
    names = list(plan0.modules)
    options = {n: {"W8ch": Precision(8, 0)} for n in names}
    kld = {"W4g64": 0.4, "W8ch": 0.05, "FP16": 0.0}
    sens = SimpleNamespace(option_base=None, modules={n: 0.4 for n in names},
                           options={n: {"W8ch": 0.05} for n in names})
    trial = FakeTrials(lambda plan: sum(kld[p.label] for p in plan.modules.values()), 0.5, max_iters)
    trial(plan0)
    return plan0, SimpleNamespace(sensitivity=sens, findings=[]), options, trial


def test_predictive_measures_the_cheapest_plan_predicted_to_pass():
    plan0, diagnosis, options, trial = _predictive_setup(max_iters=6)
    t = ThresholdsConfig(max_ppl_increase_pct=None, max_kld_mean=0.5)
    res = search.predictive(trial, plan0, diagnosis, options, search.Goal(t), Timer())
    # 1.2 at plan 0; two modules at W8 give 0.5, which passes; one gives 0.85, which fails
    assert res.best is not None and res.best.metrics.kld_mean == pytest.approx(0.5)
    assert sorted(p.label for p in res.chosen.plan.modules.values()) == ["W4g64", "W8ch", "W8ch"]
    assert res.below is not None and res.below.metrics.kld_mean == pytest.approx(0.85)
    assert res.reason.startswith("passed; converged") and res.frontier
    assert all("predicted" in r.why for r in trial.records[1:])


def test_refinement_stops_where_the_bracket_map_predicts_no_smaller_plan_passes():
    """Eight modules, 0.4 KLD each at W4g64 and 0.05 at W8: plans with 7 or 8 modules at W8 pass
    (0.75 <= 0.8). The first pick (two modules in float, six at W8) passes, then seven at W8; the
    midpoint below it (three at W8, 2.15) fails. The power law through those two measurements
    alone predicts 1.45 and 1.1 for five and six at W8: no smaller plan passes, so with the default
    refine_misses=2 the refinement stops there. refine_misses=null asks for the exhaustive
    refinement: the bisection measures both (both fail) and converges on the same plan;
    refine_misses=1 stops after the first miss by its own rule."""
    def run(misses):
        plan0 = _plan(8)
        names = list(plan0.modules)
        kld = {"W4g64": 0.4, "W8ch": 0.05, "FP16": 0.0}
        sens = SimpleNamespace(option_base=None, modules={n: 0.4 for n in names},
                               options={n: {"W8ch": 0.05} for n in names})
        trial = FakeTrials(lambda plan: sum(kld[p.label] for p in plan.modules.values()), 0.8, 10)
        trial(plan0)
        t = ThresholdsConfig(max_ppl_increase_pct=None, max_kld_mean=0.8)
        res = search.predictive(trial, plan0, SimpleNamespace(sensitivity=sens, findings=[]),
                                {n: {"W8ch": Precision(8, 0)} for n in names}, search.Goal(t, refine_misses=misses),
                                Timer())
        return res, ["".join(p.label[1] for p in r.plan.modules.values()) for r in trial.records]

    full, full_plans = run(None)
    assert full_plans == ["44444444", "PP888888", "88888884", "88844444", "88888444", "88888844"]
    assert full.reason.startswith("passed; converged (one upgrade step")
    short, short_plans = run(2)
    assert short_plans == full_plans[:4]
    assert short.reason.startswith("passed; converged (the map through the smallest passing")
    assert short.best.plan == full.best.plan and short.best.metrics.kld_mean == pytest.approx(0.75)
    assert short.below.metrics.kld_mean == pytest.approx(2.15)  # the largest failing plan below it
    one, one_plans = run(1)
    assert one_plans == full_plans[:4] and "1 smaller plan in a row failed" in one.reason
    assert one.best.plan == full.best.plan
