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
