"""The closed loop end to end on a tiny random Llama, and the CLI's one-line errors."""
import json
import subprocess
import sys

import pytest

from tests.conftest import run_report as run
from quantfix.plan import Plan
from tests.conftest import ROOT, tiny_overrides


def test_loop_repairs_and_exports_a_verified_checkpoint(compose, tiny_dir, tmp_path):
    # plan 0 at 3 bits per channel fails a tight KLD bound; W8 modules make it pass
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
        "thresholds.max_kld_mean": 0.002, "loop.ladder": "[3/0,8/0,16/0]", "loop.bits_step": 2.0,
        "loop.max_iters": 6, "loop.algorithms": "[rtn]"}))
    out = tmp_path / "run"
    report = run(cfg, out)
    its = report["iterations"]
    assert not its[0]["passed"] and its[0]["metrics"]["kld_mean"] > 0.002
    assert report["final"]["passed"], report["final"]
    assert any(it["passed"] for it in its[1:])
    bits = [it["avg_bits"] for it in its]
    assert bits[1] > bits[0]  # the repair added precision
    final = report["final"]
    # the smallest passing plan is the one exported
    passing = [it for it in its if it["passed"]]
    assert final["avg_bits"] == min(it["avg_bits"] for it in passing)
    # checkpoint: complete, reloadable with plain transformers, verified metrics within the bound
    ckpt = out / "checkpoint"
    assert (ckpt / "config.json").exists() and (ckpt / "quantfix_plan.yaml").exists()
    assert not list(out.glob(".checkpoint-*"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)  # loads with plain transformers
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert final["verified_metrics"]["kld_mean"] <= 0.002
    # RTN simulation and the real engine agree
    sim = next(it for it in its if it["avg_bits"] == final["avg_bits"])["metrics"]
    assert final["verified_metrics"]["ppl"] == pytest.approx(sim["ppl"], rel=1e-3)
    # plan.yaml reproduces the plan, report.json and the plot are written
    plan = Plan.load(out / "plan.yaml")
    assert plan.avg_bits == pytest.approx(final["avg_bits"], abs=1e-3)
    saved = json.loads((out / "report.json").read_text())
    assert {"baseline", "iterations", "final", "timings_s", "memory"} <= set(saved)
    assert {"checkpoint", "verified_metrics", "passed", "stop_reason"} <= set(saved["final"])
    assert (out / "plots" / "iterations.png").stat().st_size > 1000


def test_gptq_plan_exports_through_llmcompressor(compose, tiny_dir, tmp_path):
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant": "gptq", "quant.group_size": 32, "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    assert report["final"]["passed"] and report["iterations"][0]["plan_summary"] == "W4g32-gptq x14"
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    # the engine packs the simulated GPTQ weights with their scales: the checkpoint is what was measured
    sim, real = report["iterations"][0]["metrics"], report["final"]["verified_metrics"]
    assert real["kld_mean"] == pytest.approx(sim["kld_mean"], rel=1e-5) and real["ppl"] == pytest.approx(sim["ppl"], rel=1e-6)
    assert qc["config_groups"]["group_0"]["weights"]["observer"] == "quantfix_static"


def test_no_partial_checkpoint_on_failure(compose, tiny_dir, tmp_path, monkeypatch):
    from quantfix import export as exp

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(exp, "_export_llmcompressor", boom)
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{"thresholds.max_ppl_increase_pct": 1000,
                                                                   "loop.max_iters": 1}))
    with pytest.raises(RuntimeError, match="disk full"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert not list((tmp_path / "run").glob(".checkpoint-*"))


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "quantfix", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args,msg", [
    (["model.name_or_path=/no/such/dir"], "model path not found: /no/such/dir"),
    (["quant.bits=12"], "quant.bits=12 is out of range"),
    (["thresholds.min_top1=3"], "thresholds.min_top1=3.0 is impossible"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, msg):
    r = _cli(*args, f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache")
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("quantfix: error:")]
    assert len(err) == 1 and msg in err[0]
    assert "Traceback" not in r.stderr


def test_cli_unwritable_output(tmp_path, tiny_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    r = _cli(*tiny_overrides(tiny_dir, tmp_path / "cache"), f"hydra.run.dir={tmp_path}/run",
             f"output_dir={blocker}/sub")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not writable" in r.stderr and "pick a writable output_dir=<dir>" in r.stderr


def test_cli_sweep_writes_one_run_dir_per_job(tmp_path, tiny_dir):
    sweep = tmp_path / "sweep"
    r = _cli("-m", "quant.group_size=16,32", "quant=rtn,gptq", *tiny_overrides(tiny_dir, tmp_path / "cache"),
             "thresholds.max_ppl_increase_pct=1000", "loop.max_iters=1", "export.verify=false",
             f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.glob("*/report.json"))
    assert len(runs) == 4
    combos = set()
    for d in runs:
        rep = json.loads((d / "report.json").read_text())
        q = rep["config"]["quant"]
        combos.add((q["algorithm"], q["group_size"]))
        assert (d / "checkpoint" / "config.json").exists()
    assert combos == {("rtn", 16), ("rtn", 32), ("gptq", 16), ("gptq", 32)}


@pytest.mark.parametrize("quant,label", [("llm_int8", "LLM.int8 x14"), ("nf4", "NF4g64 x14")])
def test_bitsandbytes_plans_export_and_match_the_simulation(compose, tiny_dir, tmp_path, quant, label):
    pytest.importorskip("bitsandbytes")
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant": quant, "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    it = report["iterations"][0]
    assert it["plan_summary"] == label and report["final"]["passed"]
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    sim, real = it["metrics"], report["final"]["verified_metrics"]
    assert real["kld_mean"] == pytest.approx(sim["kld_mean"], rel=0.25, abs=2e-4)


def test_awq_exports_on_cpu(compose, tiny_dir, tmp_path):
    """llm-compressor's AWQ pins host memory, which fails without an accelerator; the export skips
    the pinning there, so an AWQ plan exports and verifies on the CPU too."""
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant": "awq", "quant.group_size": 32, "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    assert report["final"]["passed"] and report["iterations"][0]["plan_summary"] == "W4g32-awq x14"
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    sim, real = report["iterations"][0]["metrics"], report["final"]["verified_metrics"]
    assert real["kld_mean"] < 2 * sim["kld_mean"] + 0.01


def test_mixed_algorithm_plan_exports_in_one_checkpoint(compose, tiny_dir, tmp_path):
    """The default options let each module move to imatrix or gptq_imatrix rounding at each rung:
    the chosen plan mixes algorithms and widths, and one compressed-tensors checkpoint holds them
    all (QuantizationModifier and GPTQModifier groups), reloaded and verified near the simulation."""
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 0.01, "loop.max_iters": 4}))
    report = run(cfg, tmp_path / "run")
    fin = report["final"]
    plan = Plan.load(tmp_path / "run" / "plan.yaml")
    algs = {p.algorithm for p in plan.modules.values() if not p.is_float}
    assert algs <= {"rtn", "imatrix", "gptq_imatrix"} and algs & {"imatrix", "gptq_imatrix"}
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    observers = {g["weights"]["observer"] for g in qc["config_groups"].values()}
    assert "quantfix_static" in observers
    sim = next(it for it in report["iterations"] if it["avg_bits"] == fin["avg_bits"])["metrics"]
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(sim["kld_mean"], rel=1e-5)  # exactly what was measured
    its = report["iterations"]
    assert all("prediction_error_pct" in it for it in its[1:])
    assert any(it.get("actions") for it in its[1:])


def test_domain_gap_recalibrates_and_remeasures(compose, tiny_dir, tmp_path, monkeypatch):
    """A domain_gap finding is an action: the missing domain joins the calibration data, the
    statistics are recomputed, plan 0 (GPTQ learns from them) is measured again and the report
    shows the per-domain numbers before and after."""
    from quantfix.diagnose import rules
    from quantfix.diagnose.findings import Finding

    def gap(diag, dcfg):
        if "stdlib" in diag.calibration_domains:
            return []
        return [Finding("domain_gap", "code is worst and absent from the calibration data", "calibrate on code",
                        evidence={}, domain="code", source="stdlib")]

    monkeypatch.setattr(rules, "_domain_gap", gap)
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant": "gptq", "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 1e-6,
        "loop.max_iters": 3, "export.enabled": "false", "diagnose.domains": "{code: stdlib}",
        "diagnose.domain_seq_len": 32}))
    report = run(cfg, tmp_path / "run")
    rec = report["recalibration"]
    assert rec["domains_before"] == ["pydoc"] and rec["domains_after"] == ["pydoc", "stdlib"]
    its = report["iterations"]
    assert its[1]["action"].startswith("recalibrate") and its[1]["plan_summary"] == its[0]["plan_summary"]
    assert its[1]["metrics"]["kld_mean"] != its[0]["metrics"]["kld_mean"]  # GPTQ saw other data
    assert "code" in rec["domains_after_ppl"]
    assert "Recalibration" in (tmp_path / "run" / "report.md").read_text()
    # resumed in the same dir: the recalibration is replayed (its statistics, its own journal keys and
    # diagnosis), so every trial comes back from the journal with the metrics measured after it
    cfg.loop.resume = True
    again = run(cfg, tmp_path / "run")
    assert all(it.get("resumed") for it in again["iterations"])
    assert [it["metrics"]["kld_mean"] for it in again["iterations"]] == [it["metrics"]["kld_mean"] for it in its]
    assert again["recalibration"]["domains_after"] == ["pydoc", "stdlib"]
    assert (tmp_path / "run" / "diagnosis_full_recalibrated.json").exists()


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
    cands = its[1:]
    assert len(its) == 4 and all(it["action"].startswith("budget candidate") for it in cands)
    assert all(it["avg_bits"] <= 5.0 + 1e-9 for it in cands)
    assert all("prediction_error_pct" in it for it in cands)
    fin = report["final"]
    best = min((it for it in its if it["avg_bits"] <= 5.0 + 1e-9), key=lambda it: it["metrics"]["kld_mean"])
    assert fin["chosen_trial"] == best["iter"] and fin["avg_bits"] == best["avg_bits"]
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(best["metrics"]["kld_mean"], rel=1e-5)