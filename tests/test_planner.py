"""The planner (``quantfix.planner``) on hand-made numbers: the ladder, the convex hull of each
module's options, budgets, the correction refit, the greedy ranking, and MoE experts moving as one
precision group."""
import pytest

from quantfix import arch
from quantfix.diagnose.findings import Finding
from quantfix.plan import Plan, Precision
from quantfix.planner import PRIOR_POWER, GreedyPlanner, Ladder, PredictivePlanner, ladder_options

W4G64, W4G32, W8, FP = Precision(4, 64), Precision(4, 32), Precision(8, 0), Precision(16)


def _plan(n=3, shape=(64, 128), p=W4G64):
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(n)]
    return Plan({m: p for m in names}, {m: shape for m in names})


def test_ladder_climbs_one_rung_at_a_time_and_stops_at_the_top():
    lad = Ladder.parse(["4/64", "4/32", "8/0", "16/0"])
    assert lad.next(W4G64, 128) == W4G32
    assert lad.next(W4G32, 128) == W8
    assert lad.next(W8, 128) == FP
    assert lad.next(FP, 128) is None
    # a group that does not divide in_features becomes the nearest valid divisor (multiple of 8)
    assert lad.next(Precision(4, 96), 96) == Precision(4, 48)
    assert Ladder.parse(["4/64", "4/32"]).next(Precision(4, 48), 96) == Precision(4, 32)


def test_ladder_options_list_every_rung_above_but_not_float():
    plan = _plan(1)
    opts = ladder_options(plan, Ladder.parse(["4/64", "4/32", "8/0", "16/0"]))
    assert list(next(iter(opts.values()))) == ["W4g32", "W8ch"]


def _planner(module_kld, option_kld, findings=()):
    plan = _plan(len(module_kld))
    names = list(plan.modules)
    options = {n: {"W4g32": W4G32, "W8ch": W8} for n in names}
    return plan, names, PredictivePlanner(plan, dict(zip(names, module_kld)),
                                          {n: o for n, o in zip(names, option_kld)}, options, list(findings))


def test_hull_skips_dominated_and_non_convex_options():
    # module 0: W4g32 removes nothing (dominated): the hull goes straight to W8
    # module 1: W4g32 removes little for its cost relative to W8 (below the chord): popped
    plan, names, pl = _planner([1.0, 1.0], [{"W4g32": 1.0, "W8ch": 0.1}, {"W4g32": 0.99, "W8ch": 0.0}])
    by_mod = {}
    for st in pl.steps:
        by_mod.setdefault(st.module, []).append(st.precision.label)
    assert by_mod[names[0]] == ["W8ch", "FP16"]
    assert by_mod[names[1]] == ["W8ch"]  # FP16 removes nothing W8 has not (KLD already 0)
    # efficiency falls along the sorted steps
    eff = [st.gain / st.cost for st in pl.steps]
    assert eff == sorted(eff, reverse=True)


def test_convex_options_are_kept_in_order():
    plan, names, pl = _planner([1.0], [{"W4g32": 0.5, "W8ch": 0.3}])
    assert [st.precision.label for st in pl.steps] == ["W4g32", "W8ch", "FP16"]
    assert pl.steps[0].gain == pytest.approx(0.5) and pl.steps[1].gain == pytest.approx(0.2)


def test_prediction_prefixes_budget_and_correction():
    plan, names, pl = _planner([1.0, 0.5], [{"W4g32": 0.5, "W8ch": 0.1}, {"W4g32": 0.4, "W8ch": 0.05}])
    assert pl.raw_prediction(0) == pytest.approx(1.5)
    assert pl.predict(len(pl.steps)) == pytest.approx(0.0) and pl.raw_prediction(len(pl.steps)) == pytest.approx(0.0)
    # every prefix's plan costs what its steps add
    for k in range(len(pl.steps) + 1):
        added = sum(st.cost for st in pl.steps[:k])
        assert pl.plan_at(k).avg_bits == pytest.approx(plan.avg_bits + added / plan.n_params)
    # the longest prefix within a budget, and not one step more
    budget = 4.6
    k = pl.largest_within(budget)
    assert pl.plan_at(k).avg_bits <= budget + 1e-9
    assert k == len(pl.steps) or pl.plan_at(k + 1).avg_bits > budget
    # the refit maps the raw prediction onto a measurement
    pl.calibrate(0, 3.0)
    assert pl.power == PRIOR_POWER and pl.predict(0) == pytest.approx(3.0)
    k = pl.first_passing(1.0)
    assert pl.predict(k) <= 0.9 and (k == 0 or pl.predict(k - 1) > 0.9)


def test_findings_name_the_reason_of_each_step():
    findings = [Finding("outlier_channels", "x", "y", modules=["model.layers.0.mlp.down_proj"]),
                Finding("concentrated_layers", "x", "y", layers=[1])]
    plan, names, pl = _planner([1.0, 1.0, 1.0], [{"W4g32": 0.9, "W8ch": 0.1}] * 3, findings)
    reasons = {st.module: st.reason for st in pl.steps if st.precision == W8}
    assert reasons[names[0]] == "outlier_channels" and reasons[names[1]] == "concentrated_layers"
    assert reasons[names[2]] == "sensitivity"


def test_greedy_promotes_the_largest_error_per_bit_first():
    plan = _plan(3)
    names = list(plan.modules)
    err = {names[0]: 5.0, names[1]: 1.0, names[2]: 3.0}
    g = GreedyPlanner(Ladder.parse(["4/64", "4/32", "8/0", "16/0"]),
                      lambda n, p: err[n] if p == W4G64 else 0.0, bits_step=0.0001)
    ranked = [n for n, _, _ in g.ranked_promotions(plan)]
    assert ranked == [names[0], names[2], names[1]]
    new, changes = g.next_plan(plan)
    assert [n for n, _ in changes] == [names[0]] and new.modules[names[0]] == W4G32


def test_power_law_refit_from_two_trials():
    plan, names, pl = _planner([1.0, 0.5], [{"W4g32": 0.5, "W8ch": 0.1}, {"W4g32": 0.4, "W8ch": 0.05}])
    k = 2
    raw0, rawk = pl.raw_prediction(0), pl.raw_prediction(k)
    # the truth: measured = 0.3 * raw^0.7
    pl.calibrate(0, 0.3 * raw0 ** 0.7)
    pl.calibrate(k, 0.3 * rawk ** 0.7)
    assert pl.power == pytest.approx(0.7, abs=1e-6) and pl.scale == pytest.approx(0.3, rel=1e-6)
    k2 = len(pl.steps) - 1
    assert pl.predict(k2) == pytest.approx(0.3 * pl.raw_prediction(k2) ** 0.7, rel=1e-6)


def test_bracket_floor_is_the_power_law_through_the_two_measured_plans():
    """The truth between a failing and a passing plan is 0.3 * raw^1.4 there, while plan 0 (far)
    follows another law: the map through the bracket alone finds the smallest passing step, and
    says so (hi) when none in between passes, or nothing (None) when the failing plan's KLD is
    not above the target (it failed on something else)."""
    plan, names, pl = _planner([1.0, 0.8, 0.6, 0.5], [{"W4g32": 0.6, "W8ch": 0.1}, {"W4g32": 0.5, "W8ch": 0.08},
                                                    {"W4g32": 0.35, "W8ch": 0.05}, {"W4g32": 0.3, "W8ch": 0.04}])
    truth = [0.3 * pl.raw_prediction(k) ** 1.4 for k in range(len(pl.steps) + 1)]
    pl.calibrate(0, 5.0 * truth[0])  # plan 0 off the law: a global fit is bent by it
    lo, hi = 1, len(pl.steps) - 1
    assert hi - lo > 3 and truth[lo] > truth[hi]
    target = truth[lo + 2] * 1.001  # step lo + 2 is the smallest that passes
    assert pl.bracket_floor((lo, truth[lo]), (hi, truth[hi]), target) == lo + 2
    assert pl.bracket_floor((lo, truth[lo]), (hi, truth[hi]), truth[hi] * 1.001) == hi  # only hi itself
    assert pl.bracket_floor((lo, truth[lo]), (hi, truth[hi]), truth[lo] * 1.1) is None
    assert pl.bracket_floor((lo, truth[hi]), (hi, truth[hi]), target) is None  # no slope: no map


def test_free_swap_to_a_better_algorithm_comes_first():
    plan = _plan(2)
    names = list(plan.modules)
    options = {n: {"W4g64-imx": Precision(4, 64, True, "imatrix"), "W8ch": W8} for n in names}
    pl = PredictivePlanner(plan, {names[0]: 1.0, names[1]: 1.0},
                           {names[0]: {"W4g64-imx": 0.6, "W8ch": 0.1}, names[1]: {"W4g64-imx": 1.2, "W8ch": 0.1}},
                           options, [])
    first = pl.steps[0]
    assert first.cost == 0 and first.module == names[0] and first.precision.algorithm == "imatrix"
    assert first.action == "W4g64 -> W4g64-imx" and first.reason == "rounding (imatrix)"
    assert pl.plan_at(1).avg_bits == plan.avg_bits  # free
    # the swap that rounds worse is not offered
    assert not any(st.module == names[1] and st.precision.algorithm == "imatrix" for st in pl.steps)


def test_ladder_options_offer_each_algorithm_at_each_rung():
    from quantfix.planner import ladder_options

    plan = _plan(1)
    opts = ladder_options(plan, Ladder.parse(["4/64", "4/32", "8/0", "16/0"]), ["imatrix", "gptq_imatrix"])
    assert sorted(next(iter(opts.values()))) == sorted(["W4g64-imx", "W4g64-gptq-imx", "W4g32-imx", "W4g32-gptq-imx",
                                                        "W8ch-imx"])  # no GPTQ sweep at 8 bits
    awq = Plan({n: Precision(4, 64, True, "awq") for n in plan.modules}, plan.shapes)
    assert {p.algorithm for o in ladder_options(awq, Ladder.parse(["4/32"]), ["imatrix"]).values()
            for p in o.values()} == {"awq"}  # AWQ owns the whole plan


def _moe_plan(widths):
    names = [f"model.layers.0.mlp.experts.{i}.down_proj" for i in range(len(widths))] + ["model.layers.0.self_attn.q_proj"]
    mods = {n: p for n, p in zip(names, list(widths) + [Precision(4, 32)])}
    return Plan(mods, {n: (64, 64) for n in names})


def test_experts_move_as_one_group():
    from quantfix.planner import harmonize_experts

    plan = harmonize_experts(_moe_plan([Precision(4, 32), Precision(8, 0), Precision(4, 32, algorithm="gptq")]))
    experts = [p for n, p in plan.modules.items() if arch.is_expert(n)]
    assert {(p.bits, p.group_size) for p in experts} == {(8, 0)}
    assert experts[2].algorithm == "gptq"  # widened, its own rounding kept
    assert plan.modules["model.layers.0.self_attn.q_proj"] == Precision(4, 32)  # not an expert: untouched
    # a float expert beside quantized modules would not reload: the group tops out at W8
    plan = harmonize_experts(_moe_plan([Precision(4, 32), Precision(16)]))
    assert {(p.bits, p.group_size) for n, p in plan.modules.items() if arch.is_expert(n)} == {(8, 0)}
