"""Verify means checked (``quantfix.verify``): the checkpoint reloaded with plain transformers, the
keys its reload reports, and its KLD against the trial that measured its plan (``agreement``)."""
from __future__ import annotations

import pytest

from quantfix import export as exp
from quantfix import verify
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
