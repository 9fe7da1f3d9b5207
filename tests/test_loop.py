"""The closed loop end to end on a tiny random Llama, and the CLI's one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

from quantfix.loop import run
from quantfix.plan import Plan
from tests.conftest import ROOT, tiny_overrides


def test_loop_repairs_and_exports_a_verified_checkpoint(compose, tiny_dir, tmp_path):
    # plan 0 at 3 bits per channel fails a tight KLD bound; W8 modules make it pass
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
        "thresholds.max_kld_mean": 0.002, "loop.ladder": "[3/0,8/0,16/0]", "loop.bits_step": 2.0,
        "loop.max_iters": 6}))
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
    assert report["final"]["passed"] and report["iterations"][0]["plan_summary"] == "W4g32x14"
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    # GPTQ in the real engine lands near the simulation (sequential vs float inputs differ a little)
    sim, real = report["iterations"][0]["metrics"], report["final"]["verified_metrics"]
    assert real["kld_mean"] < 2 * sim["kld_mean"] + 0.01


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
    assert "cannot write the output directory" in r.stderr


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


@pytest.mark.parametrize("quant,label", [("llm_int8", "LLM.int8x14"), ("nf4", "NF4g64x14")])
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


def test_awq_export_on_cpu_is_refused_up_front(compose, tiny_dir, tmp_path):
    from quantfix.errors import QuantfixError

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{"quant": "awq"}))
    with pytest.raises(QuantfixError, match="needs a CUDA device"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()
