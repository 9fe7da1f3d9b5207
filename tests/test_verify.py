"""Verify means checked (``quantfix.verify``): the checkpoint reloaded with plain transformers, the
keys its reload reports, and its KLD against the trial that measured its plan (``agreement``)."""
from __future__ import annotations

import pytest

from quantfix import export as exp
from quantfix import verify
from quantfix.config import ThresholdsConfig
from quantfix.evaluate import Metrics
from quantfix.plan import Plan, Precision
from quantfix.runreport import TrialRecord
from tests.conftest import run_report as run
from tests.conftest import tiny_overrides


def test_load_problems_one_line_per_kind():
    lines = verify.load_problems({"missing_keys": ["b.w", "a.w"], "unexpected_keys": [],
                               "mismatched_keys": [("c.w", (2, 2), (3, 3))], "error_msgs": []})
    assert lines == ["checkpoint weights missing from the checkpoint (initialized at random on reload): 2, e.g. a.w",
                     "checkpoint weights of the wrong shape (initialized at random on reload): 1, e.g. c.w"]


def _tamper_after_export(monkeypatch, edit):
    """Run the real export, then edit the written checkpoint's tensors (what a lossy engine does)."""
    from safetensors.torch import load_file, save_file

    real = exp.export

    def export(*a, **k):
        ckpt, warnings = real(*a, **k)
        f = ckpt / "model.safetensors"
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
        return ckpt, warnings

    monkeypatch.setattr(exp, "export", export)


def test_a_checkpoint_missing_weights_on_reload_fails_the_run(compose, tiny_dir, tmp_path, monkeypatch):
    """The MoE failure of issue 14 in miniature: a weight the export lost is initialized at random
    on reload; the thresholds alone may not see it, the load report does."""
    _tamper_after_export(monkeypatch, lambda t: t.pop("model.norm.weight"))
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    fin = run(cfg, tmp_path / "run")["final"]
    assert fin["search_passed"] and not fin["passed"]
    assert any("missing from the checkpoint" in f and "model.norm.weight" in f for f in fin["verified_failed"])
    assert "missing from the checkpoint" in fin["stop_reason"]


def test_a_checkpoint_unlike_its_trial_fails_the_run(compose, tiny_dir, tmp_path, monkeypatch):
    """An exact export (RTN through the engine's observer) must measure what its trial measured."""
    def scale_norm(t):
        t["model.norm.weight"] = t["model.norm.weight"] * 1.5

    _tamper_after_export(monkeypatch, scale_norm)
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    fin = report["final"]
    assert not fin["passed"] and fin["export_gap_pct"] > 2
    assert any("differs from its trial's" in f for f in fin["verified_failed"])


def test_an_untampered_checkpoint_agrees_with_its_trial(compose, tiny_dir, tmp_path):
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    fin = run(cfg, tmp_path / "run")["final"]
    assert fin["passed"] and fin["export_gap_pct"] <= 0.01 and not fin["verified_failed"]


# --- agreement: the reloaded checkpoint against its trial, on hand-made numbers ---------------------

def _trial_of(algorithms, kld):
    mods = {f"model.layers.{i}.mlp.down_proj": Precision(16) if a == "float" else Precision(4, 32, True, a)
            for i, a in enumerate(algorithms)}
    plan = Plan(mods, {n: (64, 64) for n in mods})
    m = Metrics(10.0, 2.3, kld, kld, kld, 0.9, 100)
    return TrialRecord(0, plan.summary_str(), "", "", "", plan.avg_bits, plan.avg_bits, plan.size_bytes, m, [], 0.1,
                       plan=plan)


def _kld(kld):
    return Metrics(10.0, 2.3, kld, kld, kld, 0.9, 100)


def test_an_exact_export_must_measure_what_its_trial_did():
    trial = _trial_of(["rtn", "gptq_imatrix", "float"], 0.01)  # float modules are not exported quantized
    assert verify.agreement(trial, _kld(0.0101)) == (1.0, [], [])
    gap, fails, warnings = verify.agreement(trial, _kld(0.0105))
    assert gap == 5.0 and not warnings
    assert fails == ["the reloaded checkpoint's KLD 0.01050 differs from its trial's 0.01000 by 5.0% (> 2% for an "
                     "exact export): the checkpoint is not what was measured"]
    assert verify.agreement(trial, _kld(0.0095))[1]  # below is as wrong as above


def test_a_near_float_plan_is_judged_against_an_absolute_floor():
    # a trial KLD of 1e-6: a 1e-6 difference is 100% of it, but 1% of the 1e-4 floor
    trial = _trial_of(["rtn"], 1e-6)
    assert verify.agreement(trial, _kld(2e-6)) == (1.0, [], [])
    assert verify.agreement(trial, _kld(1e-5))[1]  # 9% of the floor: fails


def test_an_inexact_export_is_warned_about_past_a_large_gap_only():
    for algs in (["awq", "awq"], ["ckpt", "ckpt_approx"]):  # AWQ smooths again at export; ckpt~ is re-rounded
        trial = _trial_of(algs, 0.01)
        assert verify.agreement(trial, _kld(0.012)) == (20.0, [], [])
        gap, fails, warnings = verify.agreement(trial, _kld(0.013))
        assert gap == 30.0 and not fails
        assert warnings == [f"the reloaded checkpoint's KLD 0.01300 differs from its trial's 0.01000 by 30% "
                            f"({trial.plan.rounding_str()}: not all exported as simulated)"]


def test_no_agreement_without_a_trial_or_a_finite_kld():
    assert verify.agreement(None, _kld(0.01)) == (None, [], [])
    assert verify.agreement(_trial_of(["rtn"], 0.01), _kld(float("nan"))) == (None, [], [])


def _gguf_trial(kld: float) -> TrialRecord:
    m = Metrics(10.5, 2.35, kld, kld * 4, kld * 10, 0.9, 100)
    return TrialRecord(0, "", "", "", "", 5.0, 5.0, 0, m, [], 1.0)



def _llama(kld: float, ppl: float = 10.5, top: float = 0.9) -> dict:
    return {"ppl": ppl, "ppl_base": 10.0, "kld_mean": kld, "kld_p99": kld * 4, "kld_max": kld * 9,
            "same_top_p": top, "n_tokens": 1530, "ln_ppl_ratio": 0.05}



def test_verdict_gate_on_llama_perplexity(tmp_path):
    """The GGUF's verdict is llama-perplexity's: thresholds on its PPL increase (against the F16's
    own PPL), KLD and same-top share; and a KLD far from the trial's prediction fails too."""
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    t = ThresholdsConfig(max_ppl_increase_pct=6, max_kld_mean=0.05, min_top1=0.8)
    ok, _ = verify.verify_gguf(f, lambda: _llama(0.031), _gguf_trial(0.030), t)
    assert ok.failed == [] and ok.format == "gguf" and ok.export_gap_pct == pytest.approx(3.33, abs=0.01)
    assert ok.metrics.ppl == 10.5 and ok.llama_perplexity["ppl_increase_pct"] == pytest.approx(5.0)
    bad, _ = verify.verify_gguf(f, lambda: _llama(3.2, ppl=900.0, top=0.05), _gguf_trial(0.030), t)
    assert any("PPL" in x for x in bad.failed) and any("KLD 3.2" in x for x in bad.failed)
    assert any("top-1" in x for x in bad.failed) and any("not what was measured" in x for x in bad.failed)
    loose = ThresholdsConfig(max_ppl_increase_pct=10000)
    far, _ = verify.verify_gguf(f, lambda: _llama(0.09), _gguf_trial(0.030), loose)
    assert far.failed and "differs from the trial's prediction" in far.failed[0]
    nan, _ = verify.verify_gguf(f, lambda: _llama(float("nan"), ppl=float("nan")), _gguf_trial(0.030), loose)
    assert nan.failed

