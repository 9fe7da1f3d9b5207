"""Reliability matrix (issue 12, model/data/export/CLI part): every bad input, hostile file or fault
ends in one clear line with exit code 2, or in a correct result; the exit code tells passed (0),
thresholds not met (1), bad input (2) and interrupted (130) apart. Tiny random models only."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantfix import data as data_mod
from quantfix import export as exp
from quantfix import loading as loading_mod, source as source_mod
from quantfix.config import ModelConfig
from quantfix.errors import QuantfixError
from tests.conftest import ROOT, SHARED_DATA, save_model_dir, tiny_llama, tiny_overrides

CPU = torch.device("cpu")


def _load(path, offline: bool = False, **kw):
    """The model at ``path`` loaded as a run does (``kw``: model.* settings)."""
    return loading_mod.load(source_mod.resolve(str(path), path.parent / "cache"), torch.float32, CPU, ModelConfig(**kw),
                            offline=offline)


def _one_line_error(path, match, **kw) -> str:
    with pytest.raises(QuantfixError, match=match) as info:
        _load(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _cli(*args, env=None, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "quantfix", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _errors(r) -> list:
    return [line for line in r.stderr.splitlines() if line.startswith("quantfix: error:")]


def _tiny_bert(path: Path, tokenizer, cls_name="BertForMaskedLM", **cfg_kw) -> Path:
    import transformers

    cfg = transformers.BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, **cfg_kw)
    torch.manual_seed(0)
    return save_model_dir(getattr(transformers, cls_name)(cfg), tokenizer, path)


# --- 1. model checks up front ---------------------------------------------------------------------

def test_cli_bert_checkpoint_is_refused_with_exit_2(tmp_path, tokenizer):
    bert = _tiny_bert(tmp_path / "bert", tokenizer)
    r = _cli(*tiny_overrides(bert, tmp_path / "cache"), "mode=baseline", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2, r.stderr[-1500:]
    errs = _errors(r)
    assert len(errs) == 1 and "(bert) is an encoder" in errs[0], r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    assert f"run dir: {tmp_path}/run" in r.stdout  # said on failure too
    assert not (tmp_path / "run" / "report.json").exists()


def test_bidirectional_attention_is_refused_without_the_family_list(tmp_path, tokenizer, monkeypatch):
    # the attention modules' own is_causal flags catch encoders the list does not name
    monkeypatch.setattr(loading_mod, "ENCODER_TYPES", frozenset())
    bert = _tiny_bert(tmp_path / "bert", tokenizer)
    _one_line_error(bert, "has bidirectional attention")


def test_random_lm_head_is_refused(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    d = save_model_dir(tiny_llama(), tokenizer, tmp_path / "nohead")  # untied embeddings
    weights = load_file(d / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(d, r"its LM head \(lm_head.weight\) is not in the checkpoint")


def test_decoder_bert_without_its_head_is_refused(tmp_path, tokenizer):
    # is_decoder=True makes BERT causal; a backbone-only save still has no trained head
    bert = _tiny_bert(tmp_path / "bert", tokenizer, cls_name="BertModel", is_decoder=True)
    _one_line_error(bert, "no weights for cls.predictions")


def test_check_positions_names_the_key_and_the_fix():
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(QuantfixError, match=r"eval.seq_len=128 is longer than the model's 64 positions "
                                            r"\(config.json n_positions\): set eval.seq_len=64 or less"):
        loading_mod.check_positions(GPT2Config(n_positions=64), {"eval.seq_len": 128, "data.seq_len": 64})
    loading_mod.check_positions(GPT2Config(n_positions=64), {"eval.seq_len": 64, "data.seq_len": None})
    with pytest.raises(QuantfixError, match="data.seq_len=600.*max_position_embeddings"):
        loading_mod.check_positions(LlamaConfig(max_position_embeddings=512), {"data.seq_len": 600})


def test_seq_len_beyond_positions_fails_before_any_data(compose, tiny_dir, tmp_path):
    from tests.conftest import run_report as run

    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{"eval.seq_len": 1024, "mode": "baseline"}))
    with pytest.raises(QuantfixError, match="eval.seq_len=1024 is longer than the model's 512 positions"):
        run(cfg, tmp_path / "run")


# --- 2. load errors: one line each, safetensors preferred, pickles opt-in --------------------------

def test_pickle_only_weights_need_allow_pickle(tmp_path, tokenizer):
    model = tiny_llama()
    d = save_model_dir(model, tokenizer, tmp_path / "bin")
    os.remove(d / "model.safetensors")
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    _one_line_error(d, r"only pickle weights \(pytorch_model.bin\).*model.allow_pickle=true")
    loaded, _ = _load(d, allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_safetensors_preferred_over_a_pickle_beside_them(tmp_path, tokenizer, tiny_dir):
    d = tmp_path / "both"
    shutil.copytree(tiny_dir, d)
    (d / "pytorch_model.bin").write_bytes(b"not a pickle at all")  # never read
    loaded, _ = _load(d)
    assert loaded.config.num_hidden_layers == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_one_line(tmp_path, tiny_dir, damage):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if damage == "truncate" else b"\x00" * 64)
    _one_line_error(d, r"the weights file is corrupt or truncated \(SafetensorError")


def test_corrupt_pickle_is_one_line_when_allowed(tmp_path, tiny_dir):
    import pickle

    d = tmp_path / "badpickle"
    shutil.copytree(tiny_dir, d)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))
    _one_line_error(d, r"the weights file is corrupt or truncated \(UnpicklingError", allow_pickle=True)


def test_corrupt_config_json_is_one_line(tmp_path, tiny_dir):
    d = tmp_path / "badjson"
    shutil.copytree(tiny_dir, d)
    (d / "config.json").write_text('{"model_type": "llama", ')
    _one_line_error(d, "a JSON file of the model is corrupt")


def _custom_code_dir(path: Path, tokenizer, with_code: bool = True) -> Path:
    save_model_dir(tiny_llama(), tokenizer, path)
    if with_code:
        (path / "configuration_tiny.py").write_text(
            "from transformers import LlamaConfig\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n")
        (path / "modeling_tiny.py").write_text(
            "from transformers import LlamaForCausalLM\nfrom .configuration_tiny import TinyConfig\n\n"
            "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "tiny_custom"
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                       "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_custom_code_needs_trust_remote_code(tmp_path, tokenizer):
    d = _custom_code_dir(tmp_path / "custom", tokenizer, with_code=False)
    _one_line_error(d, r"needs the custom code .*set model.trust_remote_code=true")
    # trusted, but the module it names is not there: still one line
    _one_line_error(d, r"could not read the config .*configuration_tiny.py", trust_remote_code=True)


# --- 3. offline ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["someorg/no-such-model", "models/foo", "gpt2-typo"])
def test_offline_bare_name_is_a_missing_path_without_hub_call(tmp_path, monkeypatch, name):
    import socket

    attempts = []

    def no_network(*a, **k):
        attempts.append(a)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(QuantfixError, match=rf"model path not found: {name} \(offline: no hub lookup"):
        source_mod.resolve(name, tmp_path, offline=True)
    assert attempts == []


def test_offline_hub_id_in_the_hf_cache_loads_from_it(tmp_path, tiny_dir, monkeypatch):
    import huggingface_hub

    repo = tmp_path / "hub" / "models--someorg--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    r = source_mod.resolve("someorg/tiny", tmp_path, offline=True)
    assert Path(r.path) == repo / "snapshots" / "abc123"
    m, _ = loading_mod.load(r, torch.float32, CPU, offline=True)
    assert m.config.num_hidden_layers == 2


def test_offline_follows_hf_hub_offline_unless_set(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert source_mod.is_offline(None) and not source_mod.is_offline(False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not source_mod.is_offline(None) and source_mod.is_offline(True)


def test_cli_offline_hub_id_exits_2_before_loading(tmp_path):
    r = _cli("model.name_or_path=someorg/some-model", "offline=true", f"hydra.run.dir={tmp_path}/run",
             f"cache_dir={tmp_path}/cache")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errs = _errors(r)
    assert len(errs) == 1 and "model path not found: someorg/some-model (offline: no hub lookup" in errs[0]


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_offline_data_never_falls_back_to_the_hub(tmp_path, tokenizer, monkeypatch, source):
    import datasets

    def no_hub(*a, **k):
        raise AssertionError("datasets.load_dataset was called")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(QuantfixError, match=rf"not found at {empty}/.*offline is on .*data_dir is {empty}"):
        data_mod.eval_windows(source, str(empty), tokenizer, 2, 16, offline=True)


# --- 4. binary data files -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["calib.txt", "calib.jsonl", "calib.jsonl.gz"])
def test_binary_calibration_file_is_one_line_naming_it(tmp_path, tokenizer, name):
    f = tmp_path / name
    f.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(QuantfixError, match=rf"data file {f} is not UTF-8 text") as info:
        data_mod.calibration_samples(["pydoc", str(f)], str(SHARED_DATA), tokenizer, 4, 16, seed=0)
    assert "\n" not in str(info.value)


# --- 5. export: trust_remote_code, full disk, stale temp dirs, permissions ------------------------

def test_custom_code_model_exports_and_reloads(compose, tmp_path, tokenizer):
    from tests.conftest import run_report as run

    d = _custom_code_dir(tmp_path / "custom", tokenizer)
    cfg = compose(tiny_overrides(d, tmp_path / "cache", **{
        "model.trust_remote_code": "true", "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    fin = report["final"]
    assert fin["passed"] and fin["verified_metrics"]["ppl"] > 0
    assert (tmp_path / "run" / "checkpoint" / "modeling_tiny.py").exists()


def _export_setup(compose, tiny_dir, tmp_path):
    from quantfix.planner import initial_plan

    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache"))
    model, tok = _load(tiny_dir)
    plan, _ = initial_plan(model, cfg.quant, {})
    out = tmp_path / "run"
    out.mkdir()
    return model, tok, plan, out, cfg


def _partial_then(error):
    def fake_export(model, tokenizer, plan, samples, tmp, q, trust_remote_code=False):
        (tmp / "model.safetensors").write_bytes(b"\0" * 4096)  # a partial shard
        raise error
    return fake_export


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on "
                 "device\" })"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2432 vs 2304"),
], ids=["enospc", "safetensors", "torch-zip"])
def test_disk_full_during_export_is_one_line_and_leaves_nothing(compose, tiny_dir, tmp_path, monkeypatch, error):
    model, tok, plan, out, cfg = _export_setup(compose, tiny_dir, tmp_path)
    monkeypatch.setattr(exp, "_export_llmcompressor", _partial_then(error))
    with pytest.raises(QuantfixError, match=rf"no space left on device while writing the checkpoint to {out}: "
                                            "free space or pick another hydra.run.dir"):
        exp.export(model, tok, exp.ExportSpec(plan, str(tiny_dir), cfg.quant, samples=torch.zeros(1, 8, dtype=torch.long)), out)
    assert not (out / "checkpoint").exists() and not list(out.glob(".checkpoint-*"))


def test_other_export_errors_are_not_called_disk_full(compose, tiny_dir, tmp_path, monkeypatch):
    model, tok, plan, out, cfg = _export_setup(compose, tiny_dir, tmp_path)
    monkeypatch.setattr(exp, "_export_llmcompressor", _partial_then(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        exp.export(model, tok, exp.ExportSpec(plan, str(tiny_dir), cfg.quant, samples=torch.zeros(1, 8, dtype=torch.long)), out)
    assert not list(out.glob(".checkpoint-*"))


def test_checkpoint_dir_is_world_readable(compose, tiny_dir, tmp_path, monkeypatch):
    model, tok, plan, out, cfg = _export_setup(compose, tiny_dir, tmp_path)

    def fake_export(model, tokenizer, plan, samples, tmp, q, trust_remote_code=False):
        model.save_pretrained(tmp)

    monkeypatch.setattr(exp, "_export_llmcompressor", fake_export)
    old = os.umask(0o022)
    try:
        ckpt, _ = exp.export(model, tok, exp.ExportSpec(plan, str(tiny_dir), cfg.quant, samples=torch.zeros(1, 8, dtype=torch.long)), out)
    finally:
        os.umask(old)
    assert ckpt.stat().st_mode & 0o777 == 0o755


def test_stale_checkpoint_temp_dirs_are_removed_at_start(compose, tiny_dir, tmp_path):
    from tests.conftest import run_report as run

    out = tmp_path / "run"
    stale = out / ".checkpoint-k1ll3d"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    keep = out / "checkpoint-notes"  # not a temp dir
    keep.mkdir()
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", mode="baseline"))
    run(cfg, out)
    assert not stale.exists() and keep.exists()


# --- 6. exit codes ---------------------------------------------------------------------------------

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


def test_cli_sweep_goes_on_after_a_bad_job(tmp_path, tiny_dir):
    sweep = tmp_path / "sweep"
    r = _cli("-m", "quant.bits=12,4", *tiny_overrides(tiny_dir, tmp_path / "cache"), "mode=baseline",
             f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-1500:]
    errs = _errors(r)
    assert len(errs) == 1 and "quant.bits=12 is out of range" in errs[0]
    assert len(list(sweep.glob("*/report.json"))) == 1  # the second job ran


# --- 7. engine log lines go to the run's engine.log unless verbose ---------------------------------

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
