"""Search policies (``quantfix.search``): bisection, greedy and the predictive search's budget mode,
on fake trials where a unit test will do."""
from __future__ import annotations

import pytest

from tests.conftest import run_report as run
from tests.conftest import tiny_overrides


def test_budget_mode_probes_then_measures_the_plan_within_the_budget(compose, tiny_dir, tmp_path):
    """plan.budget.avg_bits: one probe plan halfway (in predicted KLD) fits the predictor on this
    model, then the lowest predicted KLD within the budget is measured, exported and verified."""
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
        "thresholds.max_kld_mean": 1e-6, "loop.ladder": "[3/0,4/0,5/0,6/0,8/0,16/0]", "plan.budget.avg_bits": 5.0,
        "loop.max_iters": 4}))
    report = run(cfg, tmp_path / "run")
    its = report["iterations"]
    assert len(its) == 3 and its[1].get("probe") and not its[2].get("probe")
    assert its[0]["avg_bits"] < its[1]["avg_bits"] < its[2]["avg_bits"] <= 5.0 + 1e-9
    assert its[1]["metrics"]["kld_mean"] > its[2]["metrics"]["kld_mean"]
    assert all("prediction_error_pct" in it for it in its[1:])
    fin = report["final"]
    assert fin["plan_summary"] == its[2]["plan_summary"] and fin["avg_bits"] == its[2]["avg_bits"]
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(its[2]["metrics"]["kld_mean"], rel=1e-5)
