"""The command line: ``quantfix.cli.preflight`` (every override composed and validated first: a bad key,
value or run dir is one line naming the fix) and ``python -m quantfix`` run for real, whose exit code
is the contract: 0 passed (or no verdict), 1 thresholds not met, 2 bad input (one ``quantfix: error:``
line), 3 internal error, 130 interrupted; sweeps go on after a bad job. Tiny random models only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from quantfix import cli
from tests.conftest import ROOT, tiny_bert, tiny_llama, tiny_overrides
from tests.tiny_checkpoints import gptq_checkpoint


def _cli(*args, env=None, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "quantfix", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def _errors(r) -> list:
    return [line for line in r.stderr.splitlines() if line.startswith("quantfix: error:")]


# --- preflight: one line naming the key and the fix -----------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("quant.algorithm=magic", "quant.algorithm=magic: choose one of rtn, mse, imatrix, gptq"),
    ("mode=fix", "mode=fix: choose one of repair, diagnose, baseline"),
    ("model.device_map=everywhere", "model.device_map=everywhere: choose one of auto, balanced"),
    ("diagnose.sensitivity.method=slow", "diagnose.sensitivity.method=slow: choose one of fast, exact, taylor, fisher"),
    ("export.formt=x", "export.formt is not a config key (ExportConfig has no 'formt')"),
    ("quant.bits=four", "quant.bits=four: expected an integer"),
    ("quant=foo", "quant=foo: no such option; choose one of awq, gptq"),
    ("+foo=1", "foo is not a config key"),
    ("loop.ladder=[4/64", "is not valid override syntax"),
])
def test_choices_and_keys_fail_when_composed_with_one_line(compose, override, message):
    """A choice-like field is an enum: a wrong value fails at compose time; the command line turns
    every composition error into one line naming the key and the fix (``cli.preflight``)."""
    from quantfix.cli import preflight

    if not override.startswith(("+", "loop.ladder", "quant=")):
        with pytest.raises(ConfigCompositionException):
            compose([override])
    problem = preflight([override])
    assert problem is not None and message in problem and "\n" not in problem, problem


# --- exit 2: bad input, one line ------------------------------------------------------------------

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


def test_cli_bert_checkpoint_is_refused_with_exit_2(tmp_path, tokenizer):
    bert = tiny_bert(tmp_path / "bert", tokenizer)
    r = _cli(*tiny_overrides(bert, tmp_path / "cache"), "mode=baseline", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2, r.stderr[-1500:]
    errs = _errors(r)
    assert len(errs) == 1 and "(bert) is an encoder" in errs[0], r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    assert f"run dir: {tmp_path}/run" in r.stdout  # said on failure too
    assert not (tmp_path / "run" / "report.json").exists()


def test_cli_offline_hub_id_exits_2_before_loading(tmp_path):
    r = _cli("model.name_or_path=someorg/some-model", "offline=true", f"hydra.run.dir={tmp_path}/run",
             f"cache_dir={tmp_path}/cache")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errs = _errors(r)
    assert len(errs) == 1 and "model path not found: someorg/some-model (offline: no hub lookup" in errs[0]


def test_cli_refuses_a_checkpoint_of_another_model(tmp_path, tiny_dir, tokenizer):
    ckpt = gptq_checkpoint(tiny_llama(seed=1), tokenizer, tmp_path / "b")
    args = tiny_overrides(tiny_dir, tmp_path / "cache", **{"quantized.name_or_path": str(ckpt),
                                                           "hydra.run.dir": str(tmp_path / "run")})
    r = subprocess.run([sys.executable, "-m", "quantfix", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2, r.stderr[-2000:]
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("quantfix: error:")]
    assert len(errs) == 1 and f"{ckpt} is not a quantization of the float model" in errs[0], r.stderr[-2000:]


def test_cli_disk_full_during_export_exits_2_with_report(tmp_path, tiny_dir):
    code = ("import runpy, sys, quantfix.export as exp\n"
            "def boom(*a, **k):\n    raise OSError(28, 'No space left on device')\n"
            "exp._export_llmcompressor = boom\n"
            f"sys.argv = ['quantfix', *{tiny_overrides(tiny_dir, tmp_path / 'cache')!r}, 'loop.max_iters=1', "
            f"'thresholds.max_ppl_increase_pct=1000', 'hydra.run.dir={tmp_path}/run']\n"
            "runpy.run_module('quantfix', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2, r.stderr[-2000:]
    errs = [line for line in r.stderr.splitlines() if line.startswith("quantfix: error:")]
    assert len(errs) == 1 and "no space left on device while writing the checkpoint" in errs[0]
    fin = json.loads((tmp_path / "run" / "report.json").read_text())["final"]
    assert fin["stop_reason"].startswith("no space left on device") and fin["passed"] is False


# --- exit 0, 1, 3, 130 ----------------------------------------------------------------------------

def test_cli_exit_1_when_thresholds_are_not_met(tmp_path, tiny_dir):
    r = _cli(*tiny_overrides(tiny_dir, tmp_path / "cache"), "thresholds.max_kld_mean=1e-9", "loop.max_iters=1",
             "loop.policy=greedy", "export.enabled=false", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 1, r.stderr[-1500:]
    assert not json.loads((tmp_path / "run" / "report.json").read_text())["final"]["passed"]
    assert "result: FAILED" in r.stdout and not _errors(r)


@pytest.mark.parametrize("extra", [["mode=baseline"], ["thresholds.max_ppl_increase_pct=1000", "loop.max_iters=1",
                                                       "export.enabled=false"]], ids=["baseline", "passed"])
def test_cli_exit_0_when_passed_or_no_verdict(tmp_path, tiny_dir, extra):
    r = _cli(*tiny_overrides(tiny_dir, tmp_path / "cache"), *extra, f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-1500:]
    assert (tmp_path / "run" / "report.json").exists() and f"run dir: {tmp_path}/run" in r.stdout


def _cli_with_run_raising(tmp_path, exc: str):
    """The CLI with loop.run replaced by one that raises ``exc`` (interrupt / bug, deterministically)."""
    code = ("import runpy, sys, quantfix.recipe\n"
            f"def run(cfg, out_dir):\n    raise {exc}\n"
            "quantfix.recipe.run = run\n"
            f"sys.argv = ['quantfix', 'hydra.run.dir={tmp_path}/run']\n"
            "runpy.run_module('quantfix', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_cli_interrupt_is_one_line_exit_130(tmp_path):
    r = _cli_with_run_raising(tmp_path, "KeyboardInterrupt")
    assert r.returncode == 130, r.stderr[-1500:]
    assert r.stderr.strip().splitlines()[-1] == "quantfix: interrupted" and "Traceback" not in r.stderr
    assert f"run dir: {tmp_path}/run" in r.stdout


def test_cli_internal_error_is_not_exit_1(tmp_path):
    r = _cli_with_run_raising(tmp_path, "ZeroDivisionError('oops')")
    assert r.returncode == 3
    assert "Traceback" in r.stderr and "quantfix: internal error: ZeroDivisionError: oops" in r.stderr
    assert f"run dir: {tmp_path}/run" in r.stdout


# --- sweeps and launchers -------------------------------------------------------------------------

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


def test_cli_sweep_goes_on_after_a_bad_job(tmp_path, tiny_dir):
    sweep = tmp_path / "sweep"
    r = _cli("-m", "quant.bits=12,4", *tiny_overrides(tiny_dir, tmp_path / "cache"), "mode=baseline",
             f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-1500:]
    errs = _errors(r)
    assert len(errs) == 1 and "quant.bits=12 is out of range" in errs[0]
    assert len(list(sweep.glob("*/report.json"))) == 1  # the second job ran


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


def test_cli_engine_logs_go_to_engine_log_unless_verbose(tmp_path, tiny_dir):
    sweep = tmp_path / "sweep"
    # one process, two jobs: the routing follows each job's setting
    r = _cli("-m", "verbose=false,true", *tiny_overrides(tiny_dir, tmp_path / "cache"),
             "thresholds.max_ppl_increase_pct=1000", "loop.max_iters=1", "export.verify=false",
             "hydra.sweep.subdir=${hydra.job.num}", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.count("#1 : verbose=True") == 1, r.stdout[-1500:]
    quiet, verbose = r.stdout.split("#1 : verbose=True")
    assert "Compression lifecycle" not in quiet and "Compression lifecycle" not in r.stderr
    assert "Compression lifecycle" in (sweep / "0" / "engine.log").read_text()
    assert "Compression lifecycle" in verbose  # job 1 (verbose) shows them on the console
    assert not (sweep / "1" / "engine.log").exists()


# --- preflight, in process ---------------------------------------------------------------------------

def test_preflight_leaves_hydras_own_flags_and_a_good_command_line_to_hydra(tmp_path):
    assert cli.preflight(["--help"]) is None and cli.preflight(["--cfg", "job", "quant.bitz=4"]) is None
    assert cli.preflight(["quant.bits=3", "thresholds.max_kld_mean=0.01", f"hydra.run.dir={tmp_path}/run"]) is None


def test_preflight_in_a_sweep_checks_every_value_but_leaves_bad_values_to_their_job(tmp_path):
    # a value validate refuses fails its own job only (the others run): not refused up front
    assert cli.preflight(["-m", "quant.bits=12,4", f"hydra.sweep.dir={tmp_path}/s"]) is None
    assert "quant.bits=12 is out of range" in cli.preflight(["quant.bits=12"])
    # what cannot compose is refused, also a sweep's second value
    assert cli.preflight(["-m", "quant.bitz=3,4"]).startswith("quant.bitz is not a config key")
    assert cli.preflight(["-m", "quant=rtn,magic"]).startswith("quant=magic: no such option; choose one of")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.preflight(["-m", "quant.bits=3,4", f"hydra.sweep.dir={blocker}/s"]) == \
        f"hydra.sweep.dir={blocker}/s is not writable (the run's logs and results go there): pick a writable " \
        "hydra.sweep.dir=<dir>"


def test_sweep_combinations_try_each_value_once():
    assert cli._combinations(["seed=1", "quant=rtn,gptq", "quant.group_size=16,32,64"]) == [
        ["seed=1", "quant=rtn", "quant.group_size=16"], ["seed=1", "quant=gptq", "quant.group_size=16"],
        ["seed=1", "quant=rtn", "quant.group_size=32"], ["seed=1", "quant=rtn", "quant.group_size=64"]]
    assert cli._combinations(["seed=1"]) == [["seed=1"]]
