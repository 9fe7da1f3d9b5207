"""The typed result of a run (``quantfix.runreport``): ``RunReport.to_dict`` is report.json and
``from_dict`` reads it back whole (trials, outcome, verification, the existing checkpoint, the
diagnosis summary, the recalibration, the change groups); ``RunReport.load`` reads a run dir."""
from __future__ import annotations

import json

from quantfix.evaluate import Metrics
from quantfix.plan import Plan, Precision
from quantfix.runreport import (ChangeGroup, DiagnosisSummary, ExistingInfo, Outcome, Reason, Recalibration, RunReport,
                                TrialRecord, Verification)


M = Metrics(10.5, 2.35, 0.012, 0.08, 0.4, 0.93, 2048)
BASE = Metrics(10.0, 2.3026, 0.0, 0.0, 0.0, 1.0, 2048)


def _trial(i, **kw):
    return TrialRecord(i, "W4g64 x14", "W4g64 x14", "rtn 14", "plan 0", 4.25, 4.6, 600_000, M,
                       [] if i else ["KLD 0.0120 > 0.01"], 1.5, **kw)


def full_report() -> RunReport:
    """A report with every part set, as a repair of an existing checkpoint writes it."""
    plan = Plan({"m.0": Precision(4, 64)}, {"m.0": (64, 128)})
    trials = [_trial(0, plan=plan),
              _trial(1, changes={"m.0": "W4g64 -> W8ch"}, drivers={"outlier_channels": 1}, actions={"more bits": 1},
                     predicted_kld=0.009, prediction_error_pct=-25.0, kld_target=0.01, resumed=True,
                     tasks={"arc_easy": {"metric": "acc_norm", "delta": -1.0, "checked": True, "failed": False}}),
              _trial(2, action="recalibrate: + code", budget_avg_bits=5.0, probe=True, tuned_from=1,
                     task_failed=["arc_easy acc_norm dropped 3.0 points"])]
    verification = Verification("/runs/x/checkpoint", 700_000, M, ["KLD 0.0120 > 0.01"],
                                {"arc_easy": {"metric": "acc_norm", "delta": -0.5}}, 1.3)
    final = Outcome("W8ch x14", 8.25, 1_300_000, True, "passed; bisection converged", 3, False, 1, verification,
                    "llama_quantize_overrides.txt", "plan.yaml", {"code": {"ppl": 12.0}},
                    [{"prompt": "def f", "text": "x"}])
    changes = [ChangeGroup("W4g64", "W8ch", "more bits", "4→8 bits", ["m.0"],
                           [Reason("outlier_channels", "outlier channel 7 (90x the median)", ["m.0"])])]
    return RunReport(
        model="org/tiny", config={"thresholds": {"max_kld_mean": 0.01}}, status="finished", fingerprint="abc",
        model_path="/models/tiny", device="cpu", dtype="float32", baseline=BASE, baseline_size_bytes=2_000_000,
        ppl_limit=10.5, kld_limit=0.01, baseline_tasks={"arc_easy": {"acc_norm": 0.5}}, export_dtype="bfloat16",
        placement={"cpu": 14}, quantized=ExistingInfo("/ckpt", "gptq", "W4g64 x14", ["a note"], 14, 0, 0),
        trials=trials, diagnosis=DiagnosisSummary([{"kind": "outlier_channels"}], [2, 0], "fisher", 3.5,
                                                  {"code": {"ppl_increase_pct": 4.0}}, {"layers": "plots/layers.png"}),
        recalibration=Recalibration("domain_gap", ["c4"], ["c4", "code"], {"code": 4.0}, {"code": 2.0}),
        pareto={"predicted": [[4.25, 0.012], [8.25, 0.001]]}, final=final, changes=changes, warnings=["careful"],
        timings_s={"total": 12.5}, memory={"host_rss_peak_mb": 900.0}, eval_batch_size=4)


def test_to_dict_from_dict_round_trips_every_part():
    r = full_report()
    d = json.loads(json.dumps(r.to_dict()))  # as report.json holds it
    back = RunReport.from_dict(d)
    assert back == r  # every field, trials' optional ones, the outcome and its verification included
    assert back.to_dict() == d
    assert back.trials[2].tuned_from == 1 and back.trials[1].resumed and back.final.verification.export_gap_pct == 1.3
    assert back.trial(1) == r.trials[1] and back.trial(7) is None and back.trial(None) is None
    assert not back.passed  # the verdict is the outcome's


def test_report_json_keeps_its_keys():
    d = full_report().to_dict()
    assert d["iterations"][0]["iter"] == 0 and d["iterations"][0]["passed"] is False
    assert set(d["iterations"][0]) == {"iter", "plan_summary", "widths", "rounding", "note", "avg_bits",
                                       "avg_bits_model", "size_bytes", "metrics", "passed", "failed", "seconds",
                                       "changes"}  # unset optional fields are not written
    fin = d["final"]
    assert fin["checkpoint"] == "/runs/x/checkpoint" and fin["verified_metrics"]["kld_mean"] == 0.012
    assert fin["verified_failed"] == ["KLD 0.0120 > 0.01"] and fin["export_gap_pct"] == 1.3 and fin["passed"] is False


def test_an_unverified_or_unfinished_run_round_trips():
    # export.verify=false: a checkpoint without metrics; mode=baseline: no outcome at all
    r = RunReport(model="m", config={}, baseline=BASE, trials=[_trial(0)],
                  final=Outcome("W4g64 x14", 4.25, 600_000, False, "loop.max_iters=1 reached", 1,
                                verification=Verification("/c", 10)))
    d = r.to_dict()
    assert "verified_metrics" not in d["final"] and d["final"]["checkpoint"] == "/c"
    assert RunReport.from_dict(d) == r
    base = RunReport(model="m", config={}, status="finished", baseline=BASE)
    assert base.to_dict()["final"] is None and RunReport.from_dict(base.to_dict()) == base and base.passed


def test_load_reads_a_run_dir_or_its_report_json(tmp_path):
    r = full_report()
    path = r.save(tmp_path)
    assert path == tmp_path / "report.json"
    assert RunReport.load(tmp_path) == r and RunReport.load(path) == r


def test_a_recalibration_pays_only_for_a_clear_drop():
    """A tie (the demo's 0.6339 -> 0.6328 at 3.5 bits on an H100) keeps the user's calibration data;
    a drop of RECALIBRATION_MIN_GAIN or more keeps the recalibration."""
    from quantfix.runreport import RECALIBRATION_MIN_GAIN, Recalibration

    assert not Recalibration.pays(0.6339, 0.6328)
    assert not Recalibration.pays(0.5, 0.5) and not Recalibration.pays(0.5, 0.6)
    assert Recalibration.pays(0.5, 0.5 * (1 - RECALIBRATION_MIN_GAIN) - 1e-6)
    assert Recalibration.pays(0.0149, 0.0145)
    r = Recalibration("gap", ["c4"], ["c4", "humaneval"], {}, kept=False, probe="plan 0", kld_before=0.6339,
                      kld_after=0.6328)
    assert "not 1% better" in r.undone_words()
