"""Cluster sweeps through a Hydra launcher, resuming an interrupted run, offloaded models."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hydra.errors import ConfigCompositionException
import torch

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


def test_offloaded_model_gives_the_same_run(compose, tiny_dir, tmp_path):
    """accelerate offload (the last resort for a model larger than the GPUs): with max_memory too
    small for the whole model, layers go to disk and sit on the meta device between forwards. The
    loop must read, swap and restore their weights through the offload map and reach exactly the
    result of the run with the model in memory, down to the exported checkpoint."""
    from tests.conftest import run_report as run

    common = {"quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
              "thresholds.max_kld_mean": 0.002, "loop.ladder": "[3/0,8/0,16/0]", "loop.bits_step": 2.0,
              "loop.max_iters": 6, "export.dtype": "float16"}
    plain = run(compose(tiny_overrides(tiny_dir, tmp_path / "c1", **common)), tmp_path / "plain")
    off = run(compose(tiny_overrides(tiny_dir, tmp_path / "c2", **common, **{
        "model.device_map": "auto", "model.max_memory": "{cpu:300KB}",
        "model.offload_folder": str(tmp_path / "offload")})), tmp_path / "off")
    assert "placement" not in plain and off["placement"].get("disk", 0) >= 1, off.get("placement")
    # disk-offloaded weights are read from the model's own safetensors (same dtype): the folder may stay empty
    for a, b in zip(plain["iterations"], off["iterations"], strict=True):
        assert a["avg_bits"] == b["avg_bits"]
        assert a["metrics"]["kld_mean"] == pytest.approx(b["metrics"]["kld_mean"], rel=1e-4, abs=1e-7)
    assert off["final"]["passed"] and off["final"]["verified_metrics"]["ppl"] == pytest.approx(
        plain["final"]["verified_metrics"]["ppl"], rel=1e-5)
    dp, do = plain["diagnosis"], off["diagnosis"]
    assert dp["top_layers"] == do["top_layers"]
    assert [f["kind"] for f in dp["findings"]] == [f["kind"] for f in do["findings"]]


def test_bad_device_map_or_max_memory_is_one_line(compose, tiny_dir, tmp_path):
    from quantfix.config import validate
    from quantfix.errors import QuantfixError

    with pytest.raises(ConfigCompositionException, match="model.device_map=everywhere"):
        compose(tiny_overrides(tiny_dir, tmp_path, **{"model.device_map": "everywhere"}))
    with pytest.raises(QuantfixError, match="add model.device_map=auto"):
        validate(compose(tiny_overrides(tiny_dir, tmp_path, **{"model.max_memory": "{0:10GiB}"})))
    with pytest.raises(QuantfixError, match="mapping of device to size"):
        validate(compose(tiny_overrides(tiny_dir, tmp_path, **{"model.device_map": "auto", "model.max_memory": 3})))


def test_out_of_memory_halves_the_batch_size_and_keeps_the_result(compose, tiny_dir, tmp_path, monkeypatch):
    """eval.batch_size=0 is auto (4 on the CPU); a CUDA out-of-memory error halves it and retries,
    which must not change any metric. The OOM is simulated: batches larger than 2 windows 'do not fit'."""
    from quantfix import evaluate as ev
    from tests.conftest import run_report as run

    common = {"thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1, "export.enabled": "false",
              "diagnose.probes": "false"}
    plain = run(compose(tiny_overrides(tiny_dir, tmp_path / "c1", **common, **{"eval.batch_size": 0})),
                tmp_path / "plain")
    assert plain["eval_batch_size"] == 4
    real = ev.Evaluator.__call__

    def small_only(self, model, windows, batch_size, *a, **k):
        if batch_size > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(self, model, windows, batch_size, *a, **k)

    monkeypatch.setattr(ev.Evaluator, "__call__", small_only)
    oom = run(compose(tiny_overrides(tiny_dir, tmp_path / "c2", **common, **{"eval.batch_size": 0})), tmp_path / "oom")
    assert oom["eval_batch_size"] == 2
    assert oom["iterations"][0]["metrics"] == pytest.approx(plain["iterations"][0]["metrics"], rel=1e-5)

    def never(*a, **k):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(ev.Evaluator, "__call__", never)
    from quantfix.errors import QuantfixError

    with pytest.raises(QuantfixError, match="out of GPU memory at eval.batch_size=1"):
        run(compose(tiny_overrides(tiny_dir, tmp_path / "c3", **common, **{"eval.batch_size": 0})), tmp_path / "x")


def test_options_scored_in_several_passes_give_the_same_run(compose, tiny_dir, tmp_path):
    """diagnose.sensitivity.options_memory_gb bounds the memory the options' simulated weights hold:
    a tiny budget scores them one module per Fisher pass, the bank keeping none (each chunk is
    handed back and dropped), and the run (option scores, plans, trials) is the one a single pass
    gives."""
    from quantfix.diagnose import option_chunks
    from tests.conftest import run_report as run
    from quantfix.bank import WeightBank

    over = {"quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
            "thresholds.max_kld_mean": 1e-6, "loop.ladder": "[3/0,4/0,5/0,8/0,16/0]", "plan.budget.avg_bits": 4.5,
            "loop.max_iters": 3}
    one = run(compose(tiny_overrides(tiny_dir, tmp_path / "c1", **over)), tmp_path / "one")
    many = run(compose(tiny_overrides(tiny_dir, tmp_path / "c2", **over,
                                      **{"diagnose.sensitivity.options_memory_gb": 1e-9})), tmp_path / "many")
    key = lambda r: [(it["plan_summary"], it["metrics"]["kld_mean"]) for it in r["iterations"]]  # noqa: E731
    assert key(one) == key(many)
    # where the memory goes: each stage's snapshot (peak so far never falls; the rises add up to
    # at most the run's peak) and the diagnosis's own parts
    stages = one["memory"]["stages"]
    assert {"load model", "calibration stats", "diagnose", "export"} <= set(stages)
    peaks = [v["host_peak_gb"] for v in stages.values()]
    assert all(0 < p <= one["memory"]["host_rss_peak_mb"] / 1024 + 0.01 for p in peaks)
    assert sum(v.get("host_peak_gb_rise", 0) for v in stages.values()) <= max(peaks) + 0.01
    diag = json.loads((tmp_path / "one" / "diagnosis.json").read_text())
    parts = {k for k in diag["timings_s"] if k.startswith("sensitivity: ")}
    assert set(diag["memory_gb"]) == {k for k in diag["timings_s"] if k != "total"} - parts
    # the sensitivity's own parts: one Fisher pass here, one per module (each a chunk) with the tiny budget
    many_diag = json.loads((tmp_path / "many" / "diagnosis.json").read_text())
    n_opt = len(json.loads((tmp_path / "many" / "diagnosis_full.json").read_text())["sensitivity"]["options"])
    assert diag["timings_s"]["sensitivity: passes"] == 1 and n_opt > 1
    assert many_diag["timings_s"]["sensitivity: passes"] == n_opt
    for d in (diag, many_diag):
        t = d["timings_s"]
        assert t["sensitivity: taylor"] + t["sensitivity: option simulation"] + t["sensitivity: fisher passes"] \
            <= t["sensitivity"] + 0.05

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    from quantfix.plan import Precision
    bank = WeightBank(model, ["0", "1"])
    options = {n: {f"W{b}": Precision(b, 0, True, "mse") for b in (4, 5, 6)} for n in ("0", "1")}
    seen = []
    for chunk in option_chunks(bank, options, 64 * 64 * 4 * 3 / 2 ** 30):  # one module's options fit
        seen.append(sorted(chunk))
        # handed back, never kept by the bank: a chunk lives as long as the caller holds it
        assert not bank._sim and all(w.shape == (64, 64) and w.dtype == torch.float32
                                     for o in chunk.values() for w in o.values())
    assert seen == [["0"], ["1"]] and not bank._sim
    assert [sorted(c) for c in option_chunks(bank, options, 1.0)] == [["0", "1"]] and len(bank._sim) == 6  # one chunk: kept


def test_device_room_obeys_the_device_memory_cap(monkeypatch):
    """device_memory_gb=80 on a 141 GB card: the caches that fill free memory plan within 80 GB
    (torch's per-process fraction), not within what the driver reports free."""
    import torch

    from quantfix import loading as loading_mod, weights as weights_mod

    GB = 10 ** 9
    state = {"fraction": 1.0, "allocated": 60 * GB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (81 * GB, 141 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda dev=None: state["fraction"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 141 * GB})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, i=None: state.__setitem__("fraction", f))
    dev = torch.device("cuda", 0)
    assert weights_mod.device_room(dev, 30 * GB, 0.25)  # whole card: 81 - 30 = 51 >= 35.25
    weights_mod.cap_device_memory(80)
    assert abs(state["fraction"] - 80 / 141) < 1e-9
    assert not weights_mod.device_room(dev, 30 * GB, 0.25)  # capped: 80 - 60 - 30 < 0
    assert weights_mod.device_room(dev, 0, 0.25)  # 20 free of 80 >= 20
    assert not weights_mod.device_room(dev, 1 * GB, 0.25)
    assert not weights_mod.device_room("cpu", 0, 0.0)
    # model.device_map=auto: accelerate's weights stay within the cap (80 - 60 allocated), the rest to the host
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mm = loading_mod.placement_kwargs("auto")["max_memory"]
    assert mm[0] == 20 * GB and mm["cpu"] > 0
    assert loading_mod.placement_kwargs("auto", {"0": "10GiB"})["max_memory"] == {0: "10GiB"}  # the user's own wins
    state["fraction"] = 1.0
    assert "max_memory" not in loading_mod.placement_kwargs("auto")  # uncapped: accelerate's default


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


def test_bench_scale_extrapolates_slices_and_plots(tmp_path):
    """bench_scale's 70B arithmetic: per stage a + b x layers through the slices, evaluated at the
    full depth; a stage that falls with depth is a fixed cost, not a negative one; the plot's bars
    split the diagnosis into its parts and carry every second of the run."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_scale", Path(__file__).resolve().parent.parent / "scripts" / "bench_scale.py")
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)

    def row(layers, diag, load):
        parts = {"sensitivity: taylor": 1.0, "sensitivity: option simulation": 10.0 * layers,
                 "sensitivity: fisher passes": 2.0 * layers, "sensitivity: passes": layers}
        return {"size": "70b", "layers": layers, "slice_of": 80, "params": 1e9 + layers * 8.6e8, "rc": 0,
                "timings_s": {"diagnose": diag, "load model": load, "total": diag + load + 5.0},
                "diagnose_timings_s": parts, "peak_host_gb_run": 6.0 + 2.0 * layers, "memory": {"device_peak_mb": 1024.0}}
    rows = [row(2, 30.0, 12.0), row(4, 54.0, 10.0)]
    e = bs.extrapolate(rows)["70b"]
    assert e["seconds"]["diagnose"]["per_layer"] == 12.0 and e["seconds"]["diagnose"]["at_full_depth"] == 6.0 + 12.0 * 80
    assert e["seconds"]["load model"] == {"per_layer": 0.0, "fixed": 12.0, "at_full_depth": 12.0}
    assert e["peak_host_gb"]["at_full_depth"] == 166.0
    assert e["diagnose_parts"]["sensitivity: option simulation"]["at_full_depth"] == 800.0
    secs = bs._plot_seconds(rows[1])
    assert secs["sensitivity: option simulation"] == 40.0 and secs["diagnose (rest)"] == 54.0 - 1.0 - 40.0 - 8.0
    assert abs(sum(secs.values()) - rows[1]["timings_s"]["total"]) < 1e-9
    res = {"rows": rows, "extrapolated": {"70b": e}, "gpu": "test"}
    png = bs.plot(res, tmp_path / "scale.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
