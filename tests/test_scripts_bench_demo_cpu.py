"""``scripts/bench_demo_cpu.py``: a demo run's report as a benchmark row, and the run it launches."""
from pathlib import Path

from tests.conftest import load_script


def _module():
    return load_script("bench_demo_cpu")


def test_a_report_becomes_a_row_against_both_yardsticks():
    """The total against the float-reference pass and against the median search trial (trial 0, the
    process's first quantized pass, left out); the table prints every stage and the verdict."""
    bd = _module()
    report = {"timings_s": {"float reference": 25.0, "calibration stats": 40.0, "evaluate trials": 60.0,
                            "diagnose": 140.0, "shipped plan: domains and probes": 10.0,
                            "verify (reload + evaluate)": 20.0, "total": 300.0},
              "iterations": [{"seconds": 24.0}, {"seconds": 20.0}, {"seconds": 16.0}, {"seconds": 18.0}],
              "status": "finished", "final": {"passed": True, "avg_bits": 5.38, "stop_reason": "passed; converged"}}
    r = bd.row(report, wall=310.0, peak_gb=10.5)
    assert r["x_float_reference"] == 12.0 and r["x_median_search_trial"] == round(300.0 / 18.0, 2)
    assert r["trials"] == 4 and r["passed"] is True and r["avg_bits"] == 5.38
    lines = bd.table([r]).splitlines()
    assert len(lines) == 3 and "**12.0**" in lines[2] and "300.0" in lines[2] and "5.38" in lines[2]


def test_each_run_gets_a_cold_cache_that_keeps_only_the_download(tmp_path, monkeypatch):
    """A run's cache links the user's demo download and conversion and nothing else (so the float
    reference, calibration and sensitivity are computed again); a failed run stops the benchmark."""
    import pytest

    bd = _module()
    user = tmp_path / "user"
    for d in ("demo", "converted", "calib", "reference", "sensitivity"):
        (user / d).mkdir(parents=True)
    monkeypatch.setattr(bd, "cache_dir", lambda: user)
    seen = {}

    class Proc:
        pid = 0

    def popen(cmd, **_):
        seen["cmd"] = cmd
        return Proc()

    monkeypatch.setattr(bd.subprocess, "Popen", popen)
    monkeypatch.setattr(bd.os, "wait4", lambda pid, opt: (pid, 1 << 8, type("U", (), {"ru_maxrss": 0})()))
    runs = tmp_path / "runs"
    runs.mkdir()
    with pytest.raises(SystemExit, match="run 0 failed"):
        bd.run_once(runs, 0, ["thresholds.max_ppl_increase_pct=3"])
    cache = Path(next(a for a in seen["cmd"] if a.startswith("cache_dir=")).split("=", 1)[1])
    assert sorted(p.name for p in cache.iterdir()) == ["converted", "demo"]
    assert all((cache / d).resolve() == (user / d).resolve() for d in ("demo", "converted"))
    assert seen["cmd"][-1] == "thresholds.max_ppl_increase_pct=3" and f"hydra.run.dir={runs / 'run0'}" in seen["cmd"]
