"""Cluster sweeps through a Hydra launcher, and resuming an interrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, tiny_overrides


def _cmd(*args):
    return [sys.executable, "-m", "quantfix", *args]


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, tiny_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    r = subprocess.run(_cmd("-m", "hydra/launcher=local_parallel", "quant.group_size=16,32",
                            *tiny_overrides(tiny_dir, tmp_path / "cache"), "thresholds.max_ppl_increase_pct=1000",
                            "loop.max_iters=1", "export.verify=false", f"hydra.sweep.dir={sweep}"),
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Joblib.Parallel" in r.stdout + r.stderr
    reports = [json.loads(p.read_text()) for p in sweep.glob("*/report.json")]
    assert sorted(rep["config"]["quant"]["group_size"] for rep in reports) == [16, 32]
    # both jobs found the float reference the sweep computed once in the shared cache
    assert len(list((tmp_path / "cache" / "reference").glob("*.pt"))) == 1


def _final(report):
    f = report["final"]
    return f["plan_summary"], f["avg_bits"], f["passed"], round(f["verified_metrics"]["kld_mean"], 6)


def test_resume_after_kill_gives_the_same_result(tmp_path, tiny_dir):
    args = [*tiny_overrides(tiny_dir, tmp_path / "cache"), "quant.bits=3", "quant.group_size=0",
            "thresholds.max_ppl_increase_pct=null", "thresholds.max_kld_mean=0.002", "loop.ladder=[3/0,8/0,16/0]",
            "diagnose.domain_seq_len=64", "probes.max_new_tokens=4", "loop.max_iters=6"]
    ref_dir = tmp_path / "uninterrupted"
    r = subprocess.run(_cmd(*args, f"hydra.run.dir={ref_dir}"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = json.loads((ref_dir / "report.json").read_text())
    assert len(expected["iterations"]) >= 3

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(*args, f"hydra.run.dir={run_dir}"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    journal = run_dir / "trials.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once two trials are journaled, before it finishes
        if journal.exists() and len(journal.read_text().splitlines()) >= 2:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "report.json").exists() and not (run_dir / "checkpoint").exists()
    done_before = len(journal.read_text().splitlines())

    r = subprocess.run(_cmd(*args, f"hydra.run.dir={run_dir}", "loop.resume=true"), capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = json.loads((run_dir / "report.json").read_text())
    assert _final(resumed) == _final(expected)
    assert [it["plan_summary"] for it in resumed["iterations"]] == [it["plan_summary"] for it in expected["iterations"]]
    assert sum(bool(it.get("resumed")) for it in resumed["iterations"]) == done_before
    assert (run_dir / "checkpoint" / "config.json").exists()
