"""Task metrics inside the loop: baseline cached, per-trial comparison, noise-aware gating."""

import pytest

from tests.conftest import run_report as run
from tests.conftest import SHARED_DATA, tiny_overrides

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "arc_easy").exists(), reason="needs ../shared/data")


def test_tasks_are_scored_per_trial_and_gate_the_loop(compose, tiny_dir, tmp_path, monkeypatch):
    over = tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "eval.tasks": "[arc_easy,lambada_openai]", "eval.task_limit": 24, "data_dir": str(SHARED_DATA),
        "quant.bits": 2, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": 1e6,
        "thresholds.tasks.arc_easy.max_drop": 0.0, "thresholds.tasks.arc_easy.z": 0.0,
        "loop.policy": "greedy", "loop.ladder": "[2/0,8/0,16/0]", "loop.bits_step": 20, "loop.max_iters": 3,
        "export.verify": "true"})
    report = run(compose(over), tmp_path / "run")
    base = report["baseline_tasks"]
    assert set(base) == {"arc_easy", "lambada_openai"} and base["arc_easy"]["n"] == 24
    its = report["iterations"]
    row = its[0]["tasks"]["arc_easy"]
    assert row["metric"] == "acc_norm" and row["checked"] and not its[0]["tasks"]["lambada_openai"]["checked"]
    assert row["delta"] == pytest.approx(row["quant"] - row["base"])
    # with z=0 and max_drop=0, a trial fails on the task exactly when the metric dropped, and the
    # failure names the task and metric
    for it in its:
        dropped = it["tasks"]["arc_easy"]["delta"] < 0
        assert dropped == any(f.startswith("arc_easy acc_norm dropped") for f in it["failed"]), it
    assert report["final"]["passed"]
    verified = report["final"]["verified_tasks"]["arc_easy"]
    assert verified["checked"] and verified["metric"] == "acc_norm" and verified["delta"] >= 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Task metrics per iteration" in md
    # the float baseline is cached: a second run reads it instead of scoring again
    cached = list((tmp_path / "cache" / "tasks").glob("*.json"))
    assert len(cached) == 2
    from quantfix import tasks as tasks_mod

    scored = []
    real = tasks_mod.score_tasks
    monkeypatch.setattr(tasks_mod, "score_tasks", lambda *a, **k: scored.append(a[2]) or real(*a, **k))
    over2 = [o for o in over if not o.startswith(("loop.max_iters", "export.verify"))]
    again = run(compose(over2 + ["loop.max_iters=1", "export.enabled=false"]), tmp_path / "run2")
    assert scored == [["arc_easy", "lambada_openai"]]  # trial 0 only: the baseline came from the cache
    assert again["baseline_tasks"] == report["baseline_tasks"]


def test_task_threshold_without_the_task_is_rejected(compose, tiny_dir, tmp_path):
    from quantfix.config import validate
    from quantfix.errors import QuantfixError

    cfg = compose(tiny_overrides(tiny_dir, tmp_path, **{"thresholds.tasks.piqa.max_drop": 2}))
    with pytest.raises(QuantfixError, match="eval.tasks does not include piqa"):
        validate(cfg)
