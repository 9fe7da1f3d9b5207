"""Trials (``quantfix.trials``) on a fake bank and measure: records with ids and changes, the thresholds
checked, the journal (replayed only for a run of the same fingerprint), ``vary``, the prediction
error, and a non-finite trial naming where it starts."""
from __future__ import annotations

import json
import math

import pytest

from quantfix.config import ThresholdsConfig
from quantfix.evaluate import Metrics
from quantfix.plan import Plan, Precision
from quantfix.timing import Timer
from quantfix.trials import Trials, TrialSetup, plan_key


W4, W8 = Precision(4, 64), Precision(8, 0)
NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
PLAN0 = Plan({n: W4 for n in NAMES}, {n: (64, 128) for n in NAMES})
BASE = Metrics(10.0, math.log(10.0), 0.0, 0.0, 0.0, 1.0, 100)


class FakeBank:
    """Stands in for the weight bank: remembers the plan applied (0.04 KLD per 4-bit module)."""

    def __init__(self):
        self.plan, self.applied = None, []

    def apply(self, plan, progress=True):
        self.plan = plan
        self.applied.append((plan, progress))

    def kld(self):
        return sum(0.04 for p in self.plan.modules.values() if p.bits == 4)


def _trials(tmp_path, fingerprint="run-a", resume=False, max_iters=5, measure=None, **kw):
    bank = FakeBank()
    calls = []

    def default_measure(label):
        calls.append(label)
        k = bank.kld()
        return Metrics(10.0 * math.exp(k), math.log(10.0) + k, k, 2 * k, 3 * k, 1.0 - k, 100)

    setup = TrialSetup(bank=bank, measure=measure or default_measure, base=BASE,
                       thresholds=ThresholdsConfig(max_ppl_increase_pct=None, max_kld_mean=0.05), max_iters=max_iters,
                       journal=tmp_path / "trials.jsonl", resume=resume, timer=Timer(), fingerprint=fingerprint, **kw)
    return Trials(setup), calls


def test_records_have_ids_changes_and_the_thresholds_checked(tmp_path):
    trials, calls = _trials(tmp_path)
    plan1 = PLAN0.with_changes({NAMES[0]: W8})
    r0 = trials(PLAN0)
    r1 = trials(plan1, PLAN0, action="promote one")
    assert (r0.id, r1.id) == (0, 1) and trials.records == [r0, r1] and trials.last is r1 and trials.left == 3
    assert r0.failed == ["KLD 0.0800 > 0.05"] and not r0.passed and r1.passed
    assert r0.changes == {} and r1.changes == {NAMES[0]: "W4g64 -> W8ch"} and r1.action == "promote one"
    assert r1.plan is plan1 and r1.plan_summary == plan1.summary_str() and not r1.resumed
    assert calls == ["trial 0", "trial 1"]
    lines = [json.loads(x) for x in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [x["plan_key"] for x in lines] == [plan_key(PLAN0), plan_key(plan1)]
    assert {x["fingerprint"] for x in lines} == {"run-a"} and lines[0]["metrics"]["kld_mean"] == pytest.approx(0.08)


def test_the_journal_replays_only_a_run_of_its_own_fingerprint(tmp_path):
    first, _ = _trials(tmp_path)
    measured = first(PLAN0).metrics
    first(PLAN0.with_changes({NAMES[0]: W8}))
    # the same run resumed: replayed, not measured
    again, calls = _trials(tmp_path, resume=True)
    rec = again(PLAN0)
    assert rec.resumed and calls == [] and rec.metrics == measured and not again.warnings
    # another run's journal: nothing replayed, said once, the journal keeps only this run's lines
    other, calls = _trials(tmp_path, fingerprint="run-b", resume=True)
    assert other.warnings[0].startswith("resume: 2 trials in trials.jsonl were measured by another run")
    assert not (tmp_path / "trials.jsonl").exists()
    assert not other(PLAN0).resumed and calls == ["trial 0"]
    assert [json.loads(x)["fingerprint"] for x in (tmp_path / "trials.jsonl").read_text().splitlines()] == ["run-b"]
    # a line cut short by a kill is skipped; the rest replays
    with open(tmp_path / "trials.jsonl", "a") as f:
        f.write('{"plan_key": "abc", "metr\n')
    cut, calls = _trials(tmp_path, fingerprint="run-b", resume=True)
    assert cut(PLAN0).resumed and calls == [] and not cut.warnings
    # without resume the journal starts afresh
    fresh, calls = _trials(tmp_path, fingerprint="run-b")
    assert not fresh(PLAN0).resumed and calls == ["trial 0"]


def test_vary_changes_the_key_and_fresh_measures_again(tmp_path):
    assert plan_key(PLAN0) == plan_key(Plan(dict(reversed(list(PLAN0.modules.items()))), PLAN0.shapes))  # order-free
    assert plan_key(PLAN0, "recalibrated: c4, code") != plan_key(PLAN0)
    first, _ = _trials(tmp_path)
    first(PLAN0)
    t, calls = _trials(tmp_path, resume=True)
    assert t(PLAN0).resumed and not t(PLAN0, fresh=True).resumed and calls == ["trial 1"]
    before = t.vary("recalibrated: c4, code")  # the same plan now gets other weights: measured again
    assert not t(PLAN0).resumed and calls == ["trial 1", "trial 2"]
    t.revert(before)  # undone: the weights are the first ones again, and so is the key
    assert t(PLAN0).resumed and calls == ["trial 1", "trial 2"]


def test_the_record_keeps_the_prediction_and_its_error(tmp_path):
    trials, _ = _trials(tmp_path)
    r = trials(PLAN0, predicted=0.12, kld_target=0.05, probe=True)  # measured 0.08
    assert r.predicted_kld == 0.12 and r.prediction_error_pct == 50.0
    assert r.kld_target == 0.05 and r.probe
    assert trials(PLAN0).prediction_error_pct is None


def test_a_nonfinite_trial_names_where_it_starts(tmp_path):
    def nan(label):
        return Metrics(float("nan"), float("nan"), float("nan"), 0.0, 0.0, 0.0, 100)

    where = "model.layers.1.mlp.down_proj.weight (3 inf values)"
    trials, _ = _trials(tmp_path, measure=nan, locate_nonfinite=lambda: where)
    r = trials(PLAN0)
    assert r.failed == ["PPL is nan (non-finite)", "KLD is nan (non-finite)",
                        "non-finite at model.layers.1.mlp.down_proj.weight (3 inf values)"]
    assert trials.warnings == [f"trial 0 ({PLAN0.summary_str()}): non-finite values start at "
                               "model.layers.1.mlp.down_proj.weight (3 inf values)"]
    assert trials.bank.applied[-1] == (PLAN0, False)  # applied again to look (a replayed trial never was)
    assert math.isnan(r.metrics.ppl) and r.metrics.top1 == 0.0
