"""The budget search on hand-made numbers: the planner's floors and cheapest start, the candidates,
the learned low-bit multiplier, and that the shipped plan is the best one measured within the
budget, also when the additive prediction prefers a plan that measures worse."""
from types import SimpleNamespace

import pytest

from quantfix.budget import BudgetSearch, prune_ladder
from quantfix.config import rung_bits
from quantfix.evaluate import Metrics
from quantfix.plan import Plan, Precision
from quantfix.planner import Ladder, PredictivePlanner, Space, ladder_options
from quantfix.trials import plan_key, record
from tests.conftest import run_report as run
from tests.conftest import tiny_overrides

W3, W4, W8 = Precision(3, 64, False, "imatrix"), Precision(4, 64, True, "imatrix"), Precision(8, 0, True, "imatrix")
RUNGS = ["3/64a", "4/64", "8/0", "16/0"]


def _plan(n=4, shape=(128, 256)):
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(n)]
    return Plan({m: Precision(4, 64, True, "rtn") for m in names}, {m: shape for m in names})


def _diagnosis(plan, kld_of):
    """A diagnosis whose option scores are ``kld_of(precision)`` for every module."""
    ladder = Ladder.parse(RUNGS)
    options = ladder_options(plan, ladder, ["imatrix"], below=True)
    scores = {n: {lab: kld_of(p) for lab, p in o.items()} for n, o in options.items()}
    sens = SimpleNamespace(option_base={n: kld_of(p) for n, p in plan.modules.items()}, modules={}, options=scores)
    return SimpleNamespace(sensitivity=sens, findings=[]), options, ladder


class FakeTrials:
    """Trials whose measured KLD is ``truth(plan)``; records like the real ones."""

    def __init__(self, truth, max_iters=6):
        self.truth, self.records, self.max_iters = truth, [], max_iters

    @property
    def left(self):
        return self.max_iters - len(self.records)

    @property
    def last(self):
        return self.records[-1]

    def grant(self, n=1):
        self.max_iters += n

    def earlier(self, plan):
        return next((r for r in self.records if plan_key(r.plan) == plan_key(plan)), None)

    def __call__(self, plan, prev=None, predicted=None, **why):
        k = self.truth(plan)
        m = Metrics(ppl=10.0, nll=2.3, kld_mean=k, kld_p99=k, kld_max=k, top1=0.9, n_tokens=100)
        r = record(len(self.records), plan, m, [], 0.0, prev)
        for key, v in why.items():
            setattr(r, key, v)
        r.predicted_kld = predicted
        self.records.append(r)
        return r


def _kld(p):
    return 0.0 if p.is_float else {3: 0.35, 4: 0.3, 8: 0.01}[p.bits]


def test_the_cheapest_start_goes_below_plan_0_and_a_floor_keeps_every_module_above_it():
    plan = _plan()
    diag, options, _ = _diagnosis(plan, _kld)
    sens = diag.sensitivity
    full = PredictivePlanner(plan, sens.option_base, sens.options, options, [], Space(floor=0.0))
    assert all(p.bits == 3 for p in full.plan_at(0).modules.values())  # below plan 0's 4 bits
    assert full.bits_at(0) == pytest.approx(W3.bits_per_weight(256))
    floor4 = PredictivePlanner(plan, sens.option_base, sens.options, options, [], Space(floor=rung_bits("4/64")))
    assert all(p.bits >= 4 for p in floor4.plan_at(floor4.largest_within(5.0)).modules.values())
    assert not floor4.fits(3.5) and full.fits(3.5)
    # the plan's note says where it started, in words a report reads (not "at or above 0 bits", not "3.29688 bits")
    assert full.plan_at(0).note.endswith("; from each module's cheapest rung")
    assert floor4.plan_at(0).note.endswith(f"; from the cheapest rung at or above {rung_bits('4/64'):.3g} bits per weight")
    # plan 0's own precision is a point like the others: the threshold search still starts there
    plain = PredictivePlanner(plan, sens.option_base, sens.options, options, [])
    assert plain.plan_at(0).modules == plan.modules


def test_the_search_ships_the_best_measured_plan_not_the_best_predicted():
    """The additive scores say W3 is cheap; measured, modules at W3 interact (each one costs 3x its
    score once two are at W3). The search measures the full plan, learns, and ships a floor plan
    or a uniform plan that measures lower, all within the budget."""
    plan = _plan()

    def truth(p):
        low = sum(1 for q in p.modules.values() if not q.is_float and q.bits <= 3)
        return sum(_kld(q) * (3.0 if q.bits <= 3 and low > 1 else 1.0) for q in p.modules.values())

    diag, options, ladder = _diagnosis(plan, _kld)
    trials = FakeTrials(truth)
    trials(plan)  # plan 0, measured by the recipe before the search
    result = BudgetSearch(trials, plan, diag, options, 4.6, ladder).run()
    measured = [r for r in trials.records if r.avg_bits <= 4.6 + 1e-9]
    assert result.chosen.metrics.kld_mean == min(r.metrics.kld_mean for r in measured)
    assert result.chosen.avg_bits <= 4.6 + 1e-9
    assert len(trials.records) >= 3  # more than one candidate measured
    first = trials.records[1]
    assert first.action == "budget candidate: search" and result.chosen.metrics.kld_mean < first.metrics.kld_mean


def test_the_low_bit_multiplier_is_learned_from_the_measurements():
    plan = _plan(6)

    def truth(p):  # every W3 module costs 4x its single score
        return sum(_kld(q) * (4.0 if not q.is_float and q.bits <= 3 else 1.0) for q in p.modules.values())

    diag, options, ladder = _diagnosis(plan, _kld)
    trials = FakeTrials(truth, max_iters=7)
    trials(plan)
    search = BudgetSearch(trials, plan, diag, options, 3.8, ladder)
    search.run()
    assert search.weight > 1.0
    # once learned, the prediction of a measured plan with W3 modules is close to its measurement
    rec = next(r for r in trials.records if any(q.bits == 3 for q in r.plan.modules.values()))
    assert search.predict(search.raw(rec.plan)) == pytest.approx(rec.metrics.kld_mean, rel=0.35)


def test_a_candidate_measured_before_the_search_is_not_measured_again():
    """A recalibration's check measures plan 0's widths in a calibrated rounding before the search;
    the search proposes the same plan as its uniform candidate: it takes that trial (no second
    measurement, no trial of loop.max_iters spent on it) and may ship it."""
    plan = _plan()
    diag, options, ladder = _diagnosis(plan, _kld)
    trials = FakeTrials(lambda p: sum(_kld(q) for q in p.modules.values()) * (0.5 if _uniform4(p) else 1.0),
                        max_iters=4)
    trials(plan)
    search = BudgetSearch(trials, plan, diag, options, 4.6, ladder)
    probe = next(c for c in search.candidates() if _uniform4(c.plan))
    assert probe.must  # a plan the search measures whatever its prediction (the highest floor)
    trials(probe.plan, action="recalibration check: plan 0's widths in imatrix")
    trials.max_iters += 1  # the recipe grants the checks
    result = search.run()
    keys = [plan_key(r.plan) for r in trials.records]
    assert keys.count(plan_key(probe.plan)) == 1 and len(keys) == len(set(keys))
    assert plan_key(probe.plan) in {plan_key(p) for p, _ in search.measured}  # learned from like a candidate
    assert result.chosen.action.startswith("recalibration check")  # the probe, half the others' KLD, ships


def _uniform4(p):
    return all(q.bits == 4 and q.algorithm == "imatrix" for q in p.modules.values())


def _w3_rtn(plan):
    return plan.with_changes({n: Precision(3, 64, False, "rtn") for n in plan.modules})


def _saturated_rtn_truth(p):
    """A plan with a W3 RTN module measures saturated (2.0); otherwise its low-bit modules cost 3x their scores."""
    if any(q.algorithm == "rtn" and q.bits <= 3 for q in p.modules.values()):
        return 2.0
    return 0.2 * sum((3.0 if not q.is_float and q.bits <= 3 else 1.0) * _kld(q) for q in p.modules.values())


def test_a_plan_0_in_a_rounding_no_candidate_uses_does_not_set_the_low_bit_multiplier():
    """Plan 0 at W3g64 RTN (the ladder rounds W3g64 with the data: no candidate keeps RTN) measures
    saturated, far above what its scores add to; the candidates' low-bit modules cost 3x their
    scores. The multiplier and the power law come from the candidates alone: the same as a search
    that never measured plan 0 (with plan 0 in the fit: multiplier 2 and power 2.0)."""
    plan = _plan(6)
    w3rtn = _w3_rtn(plan)
    names = sorted(plan.modules)
    truth = _saturated_rtn_truth
    diag, options, ladder = _diagnosis(w3rtn, _kld)
    by_bits = {q.bits: q for q in options[names[0]].values()}
    a = w3rtn.with_changes({**{n: by_bits[3] for n in names[:4]}, **{n: by_bits[8] for n in names[4:]}})
    b = w3rtn.with_changes({**{n: by_bits[3] for n in names[:2]}, **{n: by_bits[4] for n in names[2:]}})
    trials = FakeTrials(truth)
    trials(w3rtn)
    search = BudgetSearch(trials, w3rtn, diag, options, 4.0, ladder)
    for p in (a, b):
        search.learn(p, truth(p))
    alone = FakeTrials(truth)
    alone(a)
    without = BudgetSearch(alone, w3rtn, diag, options, 4.0, ladder)
    without.learn(b, truth(b))
    assert (search.weight, search.fit) == (without.weight, without.fit)
    assert search.weight >= 3.0  # the candidates' own multiplier (the grid's nearest fit)
    assert search.predict(search.raw(b)) == pytest.approx(truth(b), rel=0.05)


def test_a_plan_0_outside_the_fit_is_replaced_by_an_anchor_without_low_bit_modules():
    """From W3g64 RTN the search first measures the cheapest uniform plan without low-bit modules (a
    granted trial, over the budget so never shipped) and fits on it: the multiplier is then learned
    from plans of different low-bit shares (demo, this CPU, 3.43 bits: 0.5246 -> 0.5121, the W4g64
    start's plan). A W4g64 plan 0 is its own anchor: no extra trial."""
    plan = _plan(6)
    w3rtn = _w3_rtn(plan)
    names = sorted(plan.modules)
    truth = _saturated_rtn_truth
    diag, options, ladder = _diagnosis(w3rtn, _kld)
    trials = FakeTrials(truth, max_iters=4)
    trials(w3rtn)
    result = BudgetSearch(trials, w3rtn, diag, options, 3.8, ladder).run()
    first = trials.records[1]
    assert first.action.startswith("budget search: the fit's anchor")
    assert all(q.bits == 4 for q in first.plan.modules.values()) and first.avg_bits > 3.8
    assert trials.max_iters == 4 + 1  # granted: the candidates keep their loop.max_iters
    assert sum((r.action or "").startswith("budget candidate") for r in trials.records) >= 2
    assert result.chosen is not first and result.chosen.avg_bits <= 3.8 + 1e-9  # over the budget: never shipped

    diag4, options4, _ = _diagnosis(plan, _kld)
    trials4 = FakeTrials(truth, max_iters=4)
    trials4(plan)
    BudgetSearch(trials4, plan, diag4, options4, 3.8, ladder).run()
    assert not any((r.action or "").startswith("budget search: the fit's anchor") for r in trials4.records)


def test_a_budget_below_the_cheapest_rung_is_refused():
    from quantfix.errors import QuantfixError

    plan = _plan()
    diag, options, ladder = _diagnosis(plan, _kld)
    trials = FakeTrials(lambda p: 1.0)
    trials(plan)
    with pytest.raises(QuantfixError, match="below the cheapest plan on loop.ladder"):
        BudgetSearch(trials, plan, diag, options, 2.5, ladder)


def test_prune_keeps_the_rungs_near_the_budget_and_the_way_out():
    ladder = ["2/64a", "3/64a", "4/64", "4/32", "5/64", "6/64", "8/0", "16/0"]
    assert prune_ladder(ladder, 3.0) == ["2/64a", "3/64a", "4/64", "4/32", "8/0", "16/0"]
    assert prune_ladder(ladder, 5.0) == ["2/64a", "3/64a", "4/64", "4/32", "5/64", "6/64", "8/0", "16/0"]
    assert "2/64a" in prune_ladder(ladder, 6.5)  # the cheapest rung stays: the floor of the budget


def test_the_simple_plans_are_measured_even_when_predicted_worse():
    """The search's own plan is predicted best by far; the higher floors and the widest uniform plan
    are measured all the same, so a shipped plan cannot lose to them."""
    plan = _plan()
    diag, options, ladder = _diagnosis(plan, _kld)
    trials = FakeTrials(lambda p: sum(_kld(q) for q in p.modules.values()), max_iters=8)
    trials(plan)
    search = BudgetSearch(trials, plan, diag, options, 4.6, ladder)
    must = [c for c in search.candidates() if c.must]
    assert must[0].name == "search" and any(c.name.startswith("floor") for c in must)
    from quantfix.trials import plan_key

    # the widest uniform plan in its best rounding is a must, by whatever name (here the highest floor's
    # plan is the same plan: every module at W4g64 imatrix)
    uniform = search._unique(search._uniform())
    widest = max(c.plan.avg_bits for c in uniform)
    best_uniform = min((c for c in uniform if c.plan.avg_bits == widest), key=lambda c: c.raw)
    assert best_uniform.name.startswith("uniform")
    assert plan_key(best_uniform.plan) in {plan_key(c.plan) for c in must}
    search.run()

    measured = {plan_key(r.plan) for r in trials.records}  # plan 0 included: a floor may be plan 0 itself
    assert all(plan_key(c.plan) in measured for c in must)


def test_budget_mode_measures_candidates_and_ships_the_best_within_the_budget(compose, tiny_dir, tmp_path):
    """plan.budget.avg_bits: candidates within the budget (the search from the cheapest rung, higher
    floors, uniform plans) are measured while trials are left; the lowest measured KLD within the
    budget is exported and verified, and its prediction was refit on the measurements before it."""
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
        "thresholds.max_kld_mean": 1e-6, "loop.ladder": "[3/0,4/0,5/0,6/0,8/0,16/0]", "plan.budget.avg_bits": 5.0,
        "loop.max_iters": 4}))
    report = run(cfg, tmp_path / "run")
    its = report["iterations"]
    cands = its[2:]  # after plan 0 (W3 RTN: no point of the fit) the fit's anchor, a granted trial
    assert its[1]["action"].startswith("budget search: the fit's anchor")  # W4 per channel: within 5.0 bits
    assert len(its) == 5 and all(it["action"].startswith("budget candidate") for it in cands)
    assert all(it["avg_bits"] <= 5.0 + 1e-9 for it in cands)
    assert all("prediction_error_pct" in it for it in cands)
    fin = report["final"]
    best = min((it for it in its if it["avg_bits"] <= 5.0 + 1e-9), key=lambda it: it["metrics"]["kld_mean"])
    assert fin["chosen_trial"] == best["iter"] and fin["avg_bits"] == best["avg_bits"]
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(best["metrics"]["kld_mean"], rel=1e-5)


def test_a_plans_prediction_is_corrected_by_what_its_measured_neighbour_missed():
    """Mixed plans measure 1.6x their additive prediction, uniform plans exactly it (the winner's
    curse of a plan picked by additive scores). Once one mixed plan is measured, a plan that differs
    from it in one module of six is predicted within 15%; a mixed plan with no measured neighbour
    keeps the fitted map's error."""
    plan = _plan(6)

    def additive(p):
        return sum(_kld(q) for q in p.modules.values())

    def truth(p):
        mixed = len({q.bits for q in p.modules.values()}) > 1
        return additive(p) * (1.6 if mixed else 1.0)

    diag, options, ladder = _diagnosis(plan, _kld)
    trials = FakeTrials(truth)
    trials(plan)
    search = BudgetSearch(trials, plan, diag, options, 4.6, ladder)
    names = sorted(plan.modules)
    w3 = options[names[0]][next(lab for lab, q in options[names[0]].items() if q.bits == 3)]
    w8 = options[names[0]][next(lab for lab, q in options[names[0]].items() if q.bits == 8)]
    uniform = plan.with_changes({n: w3 for n in names})
    mixed_a = plan.with_changes({**{n: w3 for n in names[:4]}, names[4]: w8})
    mixed_b = plan.with_changes({**{n: w3 for n in names[:3]}, names[4]: w8})
    search.learn(uniform, truth(uniform))
    lone = search.predicted(mixed_b)
    assert abs(lone / truth(mixed_b) - 1) > 0.3  # the fitted map alone misses the interaction
    # the mixed neighbour measured, then another uniform plan (the fit is anchored on the latest)
    uniform8 = plan.with_changes({n: w8 for n in names})
    for p in (mixed_a, uniform8):
        search.learn(p, truth(p))
    assert search.predicted(mixed_b) == pytest.approx(truth(mixed_b), rel=0.15)
    assert abs(search.predict(search.raw(mixed_b)) / truth(mixed_b) - 1) > 0.25  # without the neighbour's residual


def test_a_budget_plan_does_not_keep_plan_0s_rtn_where_the_ladder_rounds_the_same_width_with_the_data():
    """Plan 0 is W4g64 RTN; the ladder holds W4g64 in imatrix, whose (noisy) Fisher score reads a little
    above RTN's. The budget planner starts each module at the cheapest point: the calibrated rounding
    at that width, never RTN's (a W3g64 RTN start kept RTN modules so). The threshold search still
    starts from plan 0 itself."""
    plan = _plan()

    def kld_of(p):
        return _kld(p) + (0.02 if p.algorithm == "imatrix" and p.bits == 4 else 0.0)

    diag, options, _ = _diagnosis(plan, kld_of)
    sens = diag.sensitivity
    floor4 = PredictivePlanner(plan, sens.option_base, sens.options, options, [], Space(floor=rung_bits("4/64")))
    start = floor4.plan_at(0).modules
    assert {(p.bits, p.algorithm) for p in start.values()} == {(4, "imatrix")}
    assert floor4.bits_at(0) == pytest.approx(plan.avg_bits)  # the same width: no bits spent on the swap
    full = PredictivePlanner(plan, sens.option_base, sens.options, options, [], Space(floor=0.0))
    for i in range(len(full.steps) + 1):
        assert all(p.algorithm != "rtn" for p in full.plan_at(i).modules.values() if not p.is_float)
    plain = PredictivePlanner(plan, sens.option_base, sens.options, options, [])
    assert plain.plan_at(0).modules == plan.modules
