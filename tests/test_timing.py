"""Where a run's time and memory go (``quantfix.timing``): stages timed and their memory rises summed
over repeated entries, the host's own peak."""
from types import SimpleNamespace

import pytest
import torch

from quantfix import timing


def test_timer_sums_repeated_stages_and_their_memory_rises(monkeypatch):
    ticks = iter([0.0, 1.25, 10.0, 12.0, 20.0, 20.5])
    snaps = iter([{"host_peak_gb": 1.0}, {"host_peak_gb": 1.5, "host_now_gb": 1.2},
                  {"host_peak_gb": 1.5}, {"host_peak_gb": 2.0, "host_now_gb": 1.0},
                  {"host_peak_gb": 2.0}, {"host_peak_gb": 2.0, "host_now_gb": 0.9}])
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    monkeypatch.setattr(timing, "memory_now_gb", lambda: next(snaps))
    t = timing.Timer()
    with t("load"):
        pass
    with t("evaluate"):
        pass
    with t("load"):  # entered again: its time adds up, its snapshot is the latest, its rises add up
        pass
    assert t.stages == {"load": 1.75, "evaluate": 2.0}
    assert t.memory["load"] == {"host_peak_gb": 2.0, "host_now_gb": 0.9, "host_peak_gb_rise": 0.5}
    assert t.memory["evaluate"] == {"host_peak_gb": 2.0, "host_now_gb": 1.0, "host_peak_gb_rise": 0.5}


def test_a_stage_that_raises_is_still_timed():
    t = timing.Timer()
    with pytest.raises(ValueError):
        with t("export"):
            raise ValueError("disk full")
    assert "export" in t.stages and t.memory["export"]["host_peak_gb"] > 0


def test_memory_snapshots_on_the_host():
    now = timing.memory_now_gb()
    assert 0 < now["host_now_gb"] <= now["host_peak_gb"] + 0.01
    peak = timing.peak_memory_mb(torch.device("cpu"))
    assert set(peak) == {"host_rss_peak_mb"} and peak["host_rss_peak_mb"] >= 1024 * now["host_peak_gb"] - 11
    assert timing.memory_rise({"device_peak_gb": 1.0}, {"device_peak_gb": 3.0}, {"device_peak_gb_rise": 0.5}) == \
        {"device_peak_gb": 3.0, "device_peak_gb_rise": 2.5}


def test_host_peak_starts_afresh_at_exec():
    """A process started by one that grew to 1 GB reports its own peak, not its parent's (Linux
    carries ru_maxrss across exec: bench_scale's 1B row once showed the 8B builder's 16 GB)."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    child = ("import sys; sys.path.insert(0, %r); import resource; from quantfix.timing import host_peak_kib; "
             "print(host_peak_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)" % root)
    parent = ("import os, sys; b = bytearray(2 ** 30); b[::4096] = b'x' * len(b[::4096]); "
              "os.execv(sys.executable, [sys.executable, '-c', %r])" % child)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout.split()
    own, inherited = int(out[0]), int(out[1])
    assert inherited > 2 ** 20  # the effect this guards against is real here
    assert own < inherited - 600 * 1024
