"""Integration: the loop on the real demo model (SmolLM2-135M, fetched once into the cache) with a
small eval budget. Marked slow; CI runs it (about a minute after the first download)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_DATA

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED_DATA / "wikitext2").exists(), reason="needs ../shared/data")]


def test_demo_loop_repairs_int4(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "quantfix", f"hydra.run.dir={out}", "eval.n_windows=2", "eval.batch_size=2",
           "data.n_samples=8", "data.seq_len=256", "loop.max_iters=5", "thresholds.max_ppl_increase_pct=20",
           "probes.max_new_tokens=8", "diagnose.domain_windows=1", "diagnose.domain_seq_len=128"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    its = rep["iterations"]
    assert rep["baseline"]["ppl"] > 10  # a real model, not a random one
    assert not its[0]["passed"] and its[0]["plan_summary"] == "W4g64 x210"
    assert rep["final"]["passed"] and rep["final"]["avg_bits"] > its[0]["avg_bits"]
    vm = rep["final"]["verified_metrics"]
    assert vm["ppl"] <= rep["baseline"]["ppl"] * 1.20
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert "result: PASSED" in r.stdout
    # the diagnosis finds the demo model's massive activation: a down_proj input channel in the
    # thousands while the median channel is a few units
    diag = json.loads((out / "diagnosis.json").read_text())
    top = diag["outliers"][0]
    assert top["input_of"][0].endswith("mlp.down_proj") and top["float"]["top"][0][1] > 1000
    assert top["float"]["median"] < 5 and any(f["kind"] == "outlier_channels" for f in diag["findings"])
