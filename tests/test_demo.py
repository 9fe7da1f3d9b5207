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


def test_demo_gguf_q4_0_is_read_exactly_and_diagnosed(tmp_path):
    """Issue 13 on the real model: the demo's GGUF re-quantized to Q4_0 with gguf's own quantizer is
    read back as W4g32 (an exact grid) for every linear module, diagnosed against the float demo
    model, and its dequantized weights are gguf's own."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    from quantfix import cache as cache_mod, loading as loading_mod, source as source_mod
    from quantfix.formats import gguf_io

    src = source_mod.fetch_demo_gguf(cache_mod.cache_dir())
    dst = gguf_io.requantize(str(src), str(tmp_path / "demo.Q4_0.gguf"),
                             lambda name, t: "Q4_0" if name.startswith("blk.") and len(t.shape) == 2 else None)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "quantfix", f"hydra.run.dir={out}", "mode=diagnose", f"quantized.name_or_path={dst}",
           "eval.n_windows=2", "eval.batch_size=2", "data.n_samples=8", "data.seq_len=256", "probes.max_new_tokens=8",
           "diagnose.domain_windows=1", "diagnose.domain_seq_len=128"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["quantized"]["format"] == "gguf"
    assert rep["iterations"][0]["plan_summary"] == "W4g32-ckpt x210"
    assert rep["iterations"][0]["metrics"]["kld_mean"] > 0.01  # quantized, and measured
    # one tensor dequantized by gguf equals what quantfix served (HF layout of a non-permuted tensor)
    reader = gguf.GGUFReader(str(dst))
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    ref = dequantize(t.data, t.tensor_type)
    from quantfix import formats
    from quantfix.planner import initial_plan
    from hydra import compose, initialize_config_dir
    from quantfix.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config")
    fp, _ = loading_mod.load(source_mod.resolve("demo", cache_mod.cache_dir()), loading_mod.resolve_dtype("float32", None),
                           loading_mod.resolve_device("cpu"))
    plan0, _ = initial_plan(fp, cfg.quant, {})
    ext = formats.read(str(dst), plan0, fp)
    assert np.array_equal(ext.weights["model.layers.3.mlp.down_proj"].numpy(), ref)
