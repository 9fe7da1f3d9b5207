"""Engine: the GGUF export (``quantfix.gguf_export``). The demo repaired into a GGUF that
llama-perplexity verifies (slow: the tools are built once per CI run), and the one-line errors of
GGUF settings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_llamacpp import llama_tools  # noqa: F401 - the session fixture that builds the tools

ROOT = Path(__file__).resolve().parents[1]


def test_bad_gguf_settings_are_one_line(tmp_path):
    """Bad input: one line on stderr, exit 2 (the full list of GGUF checks: tests/test_config.py)."""
    p = subprocess.run([sys.executable, "-m", "quantfix", f"hydra.run.dir={tmp_path}/r", "export.format=gguf",
                        "loop.gguf_ladder=[Q4_K,Q9_K]"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "loop.gguf_ladder entries ['Q9_K']" in p.stderr
    assert [ln for ln in p.stderr.splitlines() if "Q9_K" in ln][0].startswith("quantfix: error:")


@pytest.mark.slow
def test_a_gguf_budget_below_plan_0_is_one_line_before_the_search(llama_tools, tmp_path):  # noqa: F811
    """GGUF mode only climbs from plan 0: on the demo, plan 0 (Q4_K, written as Q5_0 on the 576-wide rows) is 5.30
    bits, and plan.budget.avg_bits=4.6 used to search, ship plan 0 at 5.30 bits and call it the lowest predicted KLD
    within 4.6. Now: exit 2, one line naming plan 0's cost and the budget that would do, and no checkpoint."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "quantfix", "export.format=gguf", "plan.budget.avg_bits=4.6",
                        f"hydra.run.dir={out}", "eval.n_windows=2", "eval.seq_len=256", "eval.batch_size=2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("quantfix: error:")]
    assert len(line) == 1 and "plan.budget.avg_bits=4.6 is below plan 0 in llama.cpp's types" in line[0]
    assert "raise the budget to at least 5.31" in line[0]
    assert not (out / "gguf").exists() and not (out / "checkpoint").exists()


@pytest.mark.slow
def test_demo_gguf_export_is_verified_by_llama_perplexity(llama_tools, tmp_path):  # noqa: F811
    """python -m quantfix model.name_or_path=<the demo's GGUF file> export.format=gguf writes a GGUF
    that llama-perplexity verifies on the CPU: its KLD against the F16 parent within 10% of the
    trial's prediction (the same tokens), the verdict taken from llama-perplexity's numbers."""
    from quantfix import cache, source

    demo = source.fetch_demo_gguf(cache.cache_dir())
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "quantfix", f"model.name_or_path={demo}", "export.format=gguf",
           f"hydra.run.dir={out}", "eval.n_windows=2", "eval.seq_len=256", "eval.batch_size=2", "data.n_samples=8",
           "data.seq_len=256", "loop.max_iters=2", "thresholds.max_ppl_increase_pct=20", "probes.max_new_tokens=8",
           "diagnose.domain_windows=1", "diagnose.domain_seq_len=128"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    fin = json.loads((out / "report.json").read_text())["final"]
    assert fin["passed"] and fin["checkpoint_format"] == "gguf" and fin["verified_failed"] == []
    gguf_file = Path(fin["checkpoint"])
    assert gguf_file == out / "gguf" / "model.gguf" and gguf_file.stat().st_size == fin["checkpoint_bytes"]
    llama = fin["llama_perplexity"]
    assert llama["n_tokens"] == 2 * (256 - 1 - 128) and llama["kld_mean"] > 0
    assert abs(fin["predicted_kld"] / llama["kld_mean"] - 1) < 0.10, (fin["predicted_kld"], llama["kld_mean"])
    assert fin["verified_metrics"]["kld_mean"] == llama["kld_mean"]
    assert (out / "gguf" / "imatrix.gguf").is_file()


@pytest.mark.slow
def test_a_downloaded_gguf_is_repaired_into_a_gguf(llama_tools, tmp_path):  # noqa: F811
    """A GGUF download beside its float parent (quantized.name_or_path=x.gguf, export.format=auto):
    plan 0 is the download's types, the download itself is measured by llama-perplexity, and the
    repair ships a GGUF (no overrides text) that llama-perplexity verifies, better than the download."""
    from quantfix import cache as cache_mod, gguf_export, source
    from quantfix.llamacpp import run

    cache = cache_mod.cache_dir()
    resolved = source.resolve("demo", cache)
    f16 = gguf_export.float_parent("demo", resolved.path, cache, cache_mod.model_fingerprint(resolved.path)[:20], False)
    download, _ = run.quantize(f16, tmp_path / "demo.Q3_K_S.gguf", "Q3_K_S")  # llama.cpp's preset, no imatrix
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "quantfix", "model.name_or_path=demo", f"quantized.name_or_path={download}",
           f"hydra.run.dir={out}", "plan.budget.avg_bits=5.6", "eval.n_windows=2", "eval.seq_len=256",
           "eval.batch_size=2", "data.n_samples=8", "data.seq_len=256", "loop.max_iters=2",
           "thresholds.max_ppl_increase_pct=50", "diagnose.probes=false", "diagnose.domain_windows=1",
           "diagnose.domain_seq_len=128"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    fin, q = rep["final"], rep["quantized"]
    assert fin["checkpoint_format"] == "gguf" and fin["verified_failed"] == []
    assert not (out / "llama_quantize_overrides.txt").exists()
    assert q["format"] == "gguf" and "Q3_K" in q["summary"] and q["llama_perplexity"]["kld_mean"] > 0
    assert "Q3_K" in rep["iterations"][0]["plan_summary"]  # plan 0: the download's types
    assert fin["llama_perplexity"]["kld_mean"] < q["llama_perplexity"]["kld_mean"]
    assert "Existing GGUF" in (out / "report.md").read_text()


def test_download_types_read_each_tensor_and_refuse_another_model(tmp_path):
    """A downloaded GGUF's types by module (float tensors as F16); a download of another model (a
    tensor missing, or another shape) is one line naming the fix."""
    from quantfix import gguf_export
    from quantfix.errors import QuantfixError
    from tests.conftest import tiny_llama
    from tests.tiny_checkpoints import GGUF_TYPES, write_tiny_gguf

    model = tiny_llama()
    parent = write_tiny_gguf(model, tmp_path / "parent.gguf", {k: "F32" for k in GGUF_TYPES})
    download = write_tiny_gguf(model, tmp_path / "download.gguf", GGUF_TYPES)
    modules = [n for n, m in model.named_modules() if n.endswith("proj")]
    names = gguf_export.module_names(parent, modules)
    types, notes = gguf_export.download_types(str(download), parent, names)
    assert notes == [] and set(types) == set(modules)
    for m in modules:
        want = GGUF_TYPES[m.rsplit(".", 1)[-1]]
        assert types[m] == ("F16" if want == "F32" else want), m
    with pytest.raises(QuantfixError, match="has no tensor blk.0.ffn_gate.bogus.*must be a GGUF of model.name_or_path"):
        gguf_export.download_types(str(download), parent, {**names, "x": "blk.0.ffn_gate.bogus"})
    other = write_tiny_gguf(tiny_llama(inter=96), tmp_path / "other.gguf", GGUF_TYPES)
    with pytest.raises(QuantfixError, match="has shape .* the float parent's"):
        gguf_export.download_types(str(other), parent, names)
