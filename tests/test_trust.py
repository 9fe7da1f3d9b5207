"""Trustworthy results (issue 12, part B): no NaN/Inf passes a check, the float16 export never
overflows silently, caches are keyed by content and survive damage, a resumed run never replays
another run's results, and a failed run still writes report.json. Tiny random models only."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantfix import cache as cache_mod
from quantfix import evaluate as ev
from quantfix import export as exp
from quantfix import verdict, verify
from quantfix.config import ThresholdsConfig
from quantfix.errors import QuantfixError
from tests.conftest import run_report as run
from tests.conftest import ROOT, save_model_dir, tiny_llama, tiny_overrides

CPU = torch.device("cpu")
FAST = {"loop.policy": "greedy", "loop.max_iters": 1, "export.enabled": "false"}
DIAG = {"mode": "diagnose", "diagnose.probes": "false", "diagnose.domain_seq_len": 64}


def _model_dir(path: Path, tokenizer, seed: int = 0, edit=None) -> Path:
    model = tiny_llama(seed=seed)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    return save_model_dir(model, tokenizer, path)


def _metrics(**kw) -> ev.Metrics:
    d = dict(ppl=10.0, nll=math.log(10.0), kld_mean=0.01, kld_p99=0.05, kld_max=0.1, top1=0.95, n_tokens=100)
    d.update(kw)
    return ev.Metrics(**d)


# --- 1. no NaN/Inf ever passes ---------------------------------------------------------------------

@pytest.mark.parametrize("field,label", [("ppl", "PPL"), ("kld_mean", "KLD"), ("top1", "top-1")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_fails_a_nonfinite_metric_whatever_the_thresholds(field, label, value):
    base = _metrics(kld_mean=0.0, top1=1.0)
    lax = ThresholdsConfig(max_ppl_increase_pct=1e9, max_kld_mean=1e9, min_top1=0.0)
    for t in (lax, ThresholdsConfig(max_ppl_increase_pct=None, max_kld_mean=1.0)):
        fails = verdict.check(_metrics(**{field: value}), base, t)
        assert fails and fails[0].startswith(f"{label} is {value}"), fails
    assert verdict.check(_metrics(), base, lax) == []


@pytest.mark.parametrize("full_max_mb", [256, 0], ids=["full", "topk"])
def test_nan_model_has_top1_zero_not_one(tokenizer, full_max_mb):
    # the case: NaN logits on both sides agreed everywhere (argmax of a NaN row), top-1 1.0
    model = tiny_llama()
    windows = torch.randint(2, 384, (2, 16))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")  # every logit row becomes NaN
    ref = ev.reference(model, windows, 2, 8, full_max_mb, progress=False)
    m = ev.evaluate(model, windows, ref, 2, progress=False)
    assert math.isnan(m.ppl) and m.top1 == 0.0
    assert ev.baseline_metrics(ref).top1 == 0.0
    assert ev.locate_nonfinite(model, windows[:1]).startswith("model.layers.0.mlp.down_proj.weight (1 nan values")


def test_locate_nonfinite_finds_the_first_module_with_a_nonfinite_output():
    model = tiny_llama()
    windows = torch.randint(2, 384, (1, 8))
    assert ev.locate_nonfinite(model, windows) is None
    mlp = model.model.layers[1].mlp
    mlp.register_forward_hook(lambda m, a, out: out * float("inf"))  # finite weights, inf activations
    assert ev.locate_nonfinite(model, windows) == "model.layers.1.mlp (non-finite output)"


def test_float_model_with_a_nan_weight_is_an_error_before_any_search(compose, tokenizer, tmp_path):
    def nan_weight(m):
        m.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")

    d = _model_dir(tmp_path / "nan", tokenizer, edit=nan_weight)
    cfg = compose(tiny_overrides(d, tmp_path / "cache", **FAST))
    with pytest.raises(QuantfixError, match=r"the float model gives non-finite log-probs: .*non-finite values start "
                                            r"at model.layers.1.mlp.down_proj.weight \(1 nan values") as info:
        run(cfg, tmp_path / "run")
    assert "\n" not in str(info.value)
    report = json.loads((tmp_path / "run" / "report.json").read_text())  # case 6: written on failure
    assert report["final"]["stop_reason"] == str(info.value) and report["final"]["passed"] is False
    assert report["iterations"] == []


def test_float_baseline_worse_than_uniform_is_a_loud_warning(compose, tiny_dir, tmp_path, caplog):
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", mode="baseline"))
    with caplog.at_level(logging.WARNING, logger="quantfix"):
        report = run(cfg, tmp_path / "run")
    assert report["baseline"]["ppl"] > 384  # a random model: worse than guessing
    assert any("worse than a uniform guess over its 384-token vocabulary" in w for w in report["warnings"])
    assert "worse than a uniform guess" in caplog.text


@pytest.mark.parametrize("mode", ["repair", "diagnose"])
def test_nonfinite_trial_fails_and_names_the_module(compose, tiny_dir, tmp_path, monkeypatch, mode):
    from quantfix.bank import WeightBank

    bad = "model.layers.0.mlp.down_proj"
    real = WeightBank.simulate

    def simulate(self, name, p):  # a simulation that overflows in one module
        w = real(self, name, p)
        return w.index_fill(0, torch.tensor([0], device=w.device), float("inf")) if name == bad else w

    monkeypatch.setattr(WeightBank, "simulate", simulate)
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **dict(DIAG, **{  # predictive: would diagnose plan 0
        "mode": mode, "thresholds.max_ppl_increase_pct": 1e9, "export.enabled": "false"})))
    report = run(cfg, tmp_path / "run")
    it = report["iterations"][0]
    assert not it["passed"] and len(report["iterations"]) == 1
    assert any("(non-finite)" in f for f in it["failed"]), it["failed"]
    assert any(f.startswith(f"non-finite at {bad}.weight") for f in it["failed"]), it["failed"]
    assert any(f"non-finite values start at {bad}.weight" in w for w in report["warnings"])
    if mode == "repair":  # no search from NaN: the stop reason says why and where
        fin = report["final"]
        assert not fin["passed"] and fin["stop_reason"].startswith("plan 0 gives non-finite values")
        assert f"non-finite at {bad}.weight" in fin["stop_reason"]
    else:
        assert report.get("diagnosis") is None and any("not diagnosed" in w for w in report["warnings"])


def test_task_metrics_never_pass_when_nonfinite():
    from quantfix import tasks as tasks_mod

    assert tasks_mod.multiple_choice_scores([float("nan"), -1.0], ["a", "b"], 0) == {"acc": 0.0, "acc_norm": 0.0}
    base = tasks_mod.TaskResult("lambada_openai", {"acc": 0.5, "perplexity": 20.0}, {"acc": 0.1, "perplexity": 1.0},
                                {}, 10, 1.0)
    quant = tasks_mod.TaskResult("lambada_openai", {"acc": 0.5, "perplexity": float("nan")},
                                 {"acc": 0.1, "perplexity": float("nan")}, {}, 10, 1.0)
    c = tasks_mod.compare(base, quant, "perplexity", max_drop_points=1e9)
    assert c["failed"] and "quantized perplexity is nan (non-finite)" in c["reason"]
    assert not tasks_mod.compare(base, base, "perplexity", max_drop_points=1e9)["failed"]


# --- 2. the float16 export never overflows silently -------------------------------------------------

def _big_embedding(m):
    m.model.embed_tokens.weight[:, 0] = 1e5  # beyond float16's 65504, harmless in float32


def test_safe_export_dtype_switches_to_bfloat16_only_on_overflow():
    model = tiny_llama()
    assert exp.safe_export_dtype(model, torch.float16) == (torch.float16, None)
    w = model.model.layers[0].mlp.up_proj.weight
    big = {"model.layers.0.mlp.up_proj": (w * 0 + 7e4, torch.ones(1), torch.zeros(1))}  # a simulated weight
    dtype, warning = exp.safe_export_dtype(model, torch.float16, big)
    assert dtype == torch.bfloat16 and "model.layers.0.mlp.up_proj.weight (max |x| 7e+04 > 65504)" in warning
    with torch.no_grad():
        _big_embedding(model)
    dtype, warning = exp.safe_export_dtype(model, torch.float16)
    assert dtype == torch.bfloat16 and "model.embed_tokens.weight" in warning and "bfloat16 instead" in warning
    assert exp.safe_export_dtype(model, torch.bfloat16) == (torch.bfloat16, None)
    assert exp.safe_export_dtype(model, None) == (None, None)


@pytest.mark.parametrize("guard", [True, False], ids=["bf16-fallback", "overflow-is-caught-at-verify"])
def test_float16_export_of_a_large_weight(compose, tokenizer, tmp_path, monkeypatch, guard):
    d = _model_dir(tmp_path / "big", tokenizer, edit=_big_embedding)
    if not guard:  # without the range check the cast writes inf: the verification must name it
        monkeypatch.setattr(exp, "safe_export_dtype", lambda model, dtype, static=None: (dtype, None))
    cfg = compose(tiny_overrides(d, tmp_path / "cache", **{
        "export.dtype": "float16", "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    fin = report["final"]
    cfg_json = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    if guard:
        assert fin["passed"] and math.isfinite(fin["verified_metrics"]["ppl"]), fin
        assert cfg_json.get("dtype", cfg_json.get("torch_dtype")) == "bfloat16"
        assert any("export.dtype=float16 would turn model.embed_tokens.weight" in w and "bfloat16 instead" in w
                   for w in report["warnings"]), report["warnings"]
    else:
        # the trials round the weights as the export will (float16): they see the overflow first
        assert not fin["passed"] and not fin["search_passed"], fin
        assert any("non-finite" in f and "model.embed_tokens" in f for f in report["iterations"][0]["failed"])
        assert "PPL is nan (non-finite)" in fin["verified_failed"]
        assert any(f.startswith("checkpoint non-finite at model.embed_tokens.weight") for f in fin["verified_failed"])
        assert any("reloaded checkpoint gives non-finite values" in w for w in report["warnings"])


# --- 3. content-keyed caches ---------------------------------------------------------------------

def test_model_overwritten_in_place_gets_a_new_baseline(compose, tokenizer, tmp_path):
    d = _model_dir(tmp_path / "model", tokenizer, seed=0)
    cfg = compose(tiny_overrides(d, tmp_path / "cache", mode="baseline"))
    first = run(cfg, tmp_path / "run1")["baseline"]["ppl"]
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    w = load_file(f)
    w["model.layers.0.mlp.down_proj.weight"][0, 0] += 1.0  # one weight, same names, shapes, size
    save_file(w, f, metadata={"format": "pt"})
    second = run(cfg, tmp_path / "run2")["baseline"]["ppl"]
    assert second != first
    assert len(list((tmp_path / "cache" / "reference").glob("*.pt"))) == 2
    # a copy of the model elsewhere has the same content: its entry is reused
    shutil.copytree(d, tmp_path / "copy")
    run(compose(tiny_overrides(tmp_path / "copy", tmp_path / "cache", mode="baseline")), tmp_path / "run3")
    assert len(list((tmp_path / "cache" / "reference").glob("*.pt"))) == 2


def test_model_fingerprint_covers_tokenizer_and_config(tiny_dir, tmp_path):
    fp = cache_mod.model_fingerprint(str(tiny_dir))
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    assert cache_mod.model_fingerprint(str(d)) == fp  # content, not path
    (d / ".cache").mkdir()
    (d / ".cache" / "x").write_text("hub download metadata")  # hidden: ignored
    assert cache_mod.model_fingerprint(str(d)) == fp
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["model_max_length"] = 77
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    assert cache_mod.model_fingerprint(str(d)) != fp


def test_file_digest_samples_large_files(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "_FULL_MAX", 1 << 20)
    monkeypatch.setattr(cache_mod, "_SAMPLE", 4096)
    f = tmp_path / "big.bin"
    data = bytearray(os.urandom(4 << 20))
    f.write_bytes(bytes(data))
    a = cache_mod.file_digest(f)
    data[-1] ^= 1  # the last block is always sampled
    f.write_bytes(bytes(data))
    assert cache_mod.file_digest(f) != a
    f.write_bytes(bytes(data) + b"x")  # the size is part of it
    assert cache_mod.file_digest(f) != a


def test_gguf_conversion_is_keyed_by_content_and_a_damaged_one_redone(tmp_path, tiny_dir, monkeypatch, caplog):
    import transformers

    from quantfix import source as source_mod

    calls = []  # what transformers was asked to load: the tiny model stands in for a GGUF file
    for name in ("AutoModelForCausalLM", "AutoTokenizer"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained
        fake = classmethod(lambda c, path, gguf_file=None, _real=real, _name=name, **kw:
                           calls.append(_name) or _real(str(tiny_dir)))
        monkeypatch.setattr(cls, "from_pretrained", fake)
    gguf = tmp_path / "a" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(os.urandom(3000))
    out = source_mod.convert_gguf(gguf, tmp_path / "cache")
    assert len(calls) == 2 and (out / "config.json").exists()
    copy = tmp_path / "b" / "tiny.gguf"  # another path, another mtime: the same content
    copy.parent.mkdir()
    shutil.copy(gguf, copy)
    os.utime(copy, (1, 1))
    assert source_mod.convert_gguf(copy, tmp_path / "cache") == out and len(calls) == 2
    st = out / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])  # damaged: detected, converted again
    with caplog.at_level(logging.WARNING, logger="quantfix"):
        assert source_mod.convert_gguf(copy, tmp_path / "cache") == out
    assert len(calls) == 4 and "is damaged or incomplete" in caplog.text
    copy.write_bytes(os.urandom(3000))  # other content: another directory
    assert source_mod.convert_gguf(copy, tmp_path / "cache") != out


def test_sensitivity_of_an_existing_checkpoint_is_not_reused_for_a_plan_with_the_same_labels(
        compose, tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    run(compose(tiny_overrides(tiny_dir, cache, **{"quant": "gptq", "quant.group_size": 32, "loop.max_iters": 1,
                                                   "thresholds.max_ppl_increase_pct": 1e6})), tmp_path / "export")
    ckpt = tmp_path / "export" / "checkpoint"
    a = run(compose(tiny_overrides(tiny_dir, cache, **DIAG, **{"quantized.name_or_path": str(ckpt)})),
            tmp_path / "diag_ckpt")
    b = run(compose(tiny_overrides(tiny_dir, cache, **DIAG, **{"quant.group_size": 32})), tmp_path / "diag_rtn")
    # the same widths (the checkpoint's modules are labelled ckpt: its own weights, not an RTN of ours)
    assert a["iterations"][0]["plan_summary"] == "W4g32-ckpt x14" and b["iterations"][0]["plan_summary"] == "W4g32 x14"
    assert len(list((cache / "sensitivity").glob("*.json"))) == 2
    sens = [json.loads((tmp_path / d / "diagnosis.json").read_text())["sensitivity"]["modules"]
            for d in ("diag_ckpt", "diag_rtn")]
    assert sens[0] != sens[1]


# --- 4. corrupt cache entries: detected, removed, recomputed ------------------------------------------

def _entries(cache: Path):
    return {kind: sorted((cache / kind).glob(pat)) for kind, pat in
            (("reference", "*.pt"), ("calib", "*.pt"), ("sensitivity", "*.json"))}


def test_corrupt_cache_entries_are_removed_and_recomputed(compose, tiny_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    cfg = compose(tiny_overrides(tiny_dir, cache, **DIAG))
    first = run(cfg, tmp_path / "run1")
    entries = _entries(cache)
    assert all(len(v) == 1 for v in entries.values()), entries
    # a truncated reference (torch zip error before), a truncated sensitivity JSON (JSONDecodeError
    # before), one flipped byte in the calibration statistics (loads fine: only the checksum sees it)
    for kind, damage in (("reference", "truncate"), ("sensitivity", "truncate"), ("calib", "flip")):
        f = entries[kind][0]
        data = bytearray(f.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 3] ^= 0x01
        f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="quantfix"):
        second = run(cfg, tmp_path / "run2")
    for f in (v[0] for v in entries.values()):
        assert f"cache entry {f} is corrupt" in caplog.text
        cache_mod.read_verified(f)  # rewritten whole
    assert second["iterations"][0]["metrics"] == first["iterations"][0]["metrics"]
    assert second["baseline"] == first["baseline"]


def test_a_flipped_byte_in_a_json_entry_is_caught_by_the_checksum(tmp_path):
    f = tmp_path / "sensitivity" / "k.json"
    cache_mod.atomic_write(f, lambda tmp: tmp.write_text(json.dumps({"layers": [0.25, 0.5]})))
    f.write_bytes(f.read_bytes().replace(b"0.25", b"0.75"))  # still valid JSON
    with pytest.raises(cache_mod.CorruptEntry, match="checksum mismatch"):
        cache_mod.read_verified(f)
    assert cache_mod.load_entry(f, json.loads) is None and not f.exists()


def test_task_baseline_entry_corrupt_is_recomputed(tmp_path, caplog):
    f = tmp_path / "tasks" / "k.json"
    cache_mod.atomic_write(f, lambda tmp: tmp.write_text(json.dumps({"a": 1})))
    assert cache_mod.load_entry(f, json.loads) == {"a": 1}
    f.write_bytes(f.read_bytes()[:5])
    with caplog.at_level(logging.WARNING, logger="quantfix"):
        assert cache_mod.load_entry(f, json.loads) is None
    assert not f.exists() and f"cache entry {f} is corrupt" in caplog.text


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2432 vs 2304")],
                         ids=["enospc", "torch-zip"])
def test_full_disk_while_writing_a_cache_entry_is_one_line(compose, tiny_dir, tmp_path, monkeypatch, error):
    def full(tensors, f, *a, **k):
        Path(f).write_bytes(b"\0" * 100)
        raise error

    monkeypatch.setattr(torch, "save", full)
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", mode="baseline"))
    with pytest.raises(QuantfixError) as info:
        run(cfg, tmp_path / "run")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("no space left on device while writing")
    assert f"to {tmp_path / 'cache' / 'reference'}" in msg and "cache_dir=" in msg
    assert not list((tmp_path / "cache" / "reference").iterdir())  # no partial entry left


# --- 5. resume: never another run's results ------------------------------------------------------------

def test_resume_with_another_model_measures_again(compose, tokenizer, tiny_dir, tmp_path):
    other = _model_dir(tmp_path / "other", tokenizer, seed=1)
    cache = tmp_path / "cache"
    first = run(compose(tiny_overrides(tiny_dir, cache, **DIAG)), tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    # the same inputs: trial 0 and the diagnosis are replayed
    same = run(compose(tiny_overrides(tiny_dir, cache, **DIAG, **{"loop.resume": "true"})), tmp_path / "run")
    assert same["iterations"][0].get("resumed") and not same["warnings"][1:], same["warnings"]
    # another model in a copy of the run dir: nothing is replayed, and the report says why
    moved = run(compose(tiny_overrides(other, cache, **DIAG, **{"loop.resume": "true"})), tmp_path / "copy")
    it = moved["iterations"][0]
    assert not it.get("resumed")
    assert it["metrics"] != first["iterations"][0]["metrics"]
    assert moved["baseline"] != first["baseline"]
    warn = " | ".join(moved["warnings"])
    assert "1 trials in trials.jsonl were measured by another run" in warn
    assert "diagnosis_full.json was written by another run" in warn
    lines = (tmp_path / "copy" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["metrics"]["ppl"] == pytest.approx(it["metrics"]["ppl"])


def test_resume_with_other_thresholds_measures_again(compose, tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    run(compose(tiny_overrides(tiny_dir, cache, **FAST)), tmp_path / "run")
    again = run(compose(tiny_overrides(tiny_dir, cache, **FAST, **{"loop.resume": "true",
                                                                   "thresholds.max_kld_mean": 0.5})), tmp_path / "run")
    assert not again["iterations"][0].get("resumed")
    more = run(compose(tiny_overrides(tiny_dir, cache, **dict(FAST, **{
        "loop.resume": "true", "loop.max_iters": 3, "thresholds.max_kld_mean": 0.5}))), tmp_path / "run")
    assert more["iterations"][0].get("resumed")  # more iterations is the same run, going on


# --- 6. a failed or interrupted run still writes report.json -----------------------------------------

@pytest.mark.parametrize("exc,reason", [(KeyboardInterrupt(), "interrupted"),
                                        (ZeroDivisionError("x"), "internal error: ZeroDivisionError"),
                                        (QuantfixError("no space left on device while writing the checkpoint"),
                                         "no space left on device while writing the checkpoint")],
                         ids=["interrupt", "bug", "error"])
def test_failed_run_writes_report_with_the_stop_reason(compose, tiny_dir, tmp_path, monkeypatch, exc, reason):
    from quantfix.recipe import Recipe

    def export_fails(*a, **k):
        raise exc

    monkeypatch.setattr(Recipe, "_export_and_verify", export_fails)
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{"loop.max_iters": 1, "loop.policy": "greedy",
                                                                   "thresholds.max_ppl_increase_pct": 1000}))
    with pytest.raises(type(exc)):
        run(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    fin = report["final"]
    assert fin["stop_reason"] == reason and fin["passed"] is False
    assert fin["trials"] == 1 and len(report["iterations"]) == 1 and fin["plan_summary"] == "W4g64 x14"
    assert "total" in report["timings_s"]


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


# --- 7. verify means checked: the reload's keys, and the checkpoint against its trial -------------

def _tamper_after_export(monkeypatch, edit):
    """Run the real export, then edit the written checkpoint's tensors (what a lossy engine does)."""
    from safetensors.torch import load_file, save_file

    real = exp.export

    def export(*a, **k):
        ckpt, warnings = real(*a, **k)
        f = ckpt / "model.safetensors"
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
        return ckpt, warnings

    monkeypatch.setattr(exp, "export", export)


def test_a_checkpoint_missing_weights_on_reload_fails_the_run(compose, tiny_dir, tmp_path, monkeypatch):
    """The MoE failure of issue 14 in miniature: a weight the export lost is initialized at random
    on reload; the thresholds alone may not see it, the load report does."""
    _tamper_after_export(monkeypatch, lambda t: t.pop("model.norm.weight"))
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    fin = run(cfg, tmp_path / "run")["final"]
    assert fin["search_passed"] and not fin["passed"]
    assert any("missing from the checkpoint" in f and "model.norm.weight" in f for f in fin["verified_failed"])
    assert "missing from the checkpoint" in fin["stop_reason"]


def test_a_checkpoint_unlike_its_trial_fails_the_run(compose, tiny_dir, tmp_path, monkeypatch):
    """An exact export (RTN through the engine's observer) must measure what its trial measured."""
    def scale_norm(t):
        t["model.norm.weight"] = t["model.norm.weight"] * 1.5

    _tamper_after_export(monkeypatch, scale_norm)
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    fin = report["final"]
    assert not fin["passed"] and fin["export_gap_pct"] > 2
    assert any("differs from its trial's" in f for f in fin["verified_failed"])


def test_an_untampered_checkpoint_agrees_with_its_trial(compose, tiny_dir, tmp_path):
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    fin = run(cfg, tmp_path / "run")["final"]
    assert fin["passed"] and fin["export_gap_pct"] <= 0.01 and not fin["verified_failed"]


def test_load_problems_one_line_per_kind():
    lines = verify.load_problems({"missing_keys": ["b.w", "a.w"], "unexpected_keys": [],
                               "mismatched_keys": [("c.w", (2, 2), (3, 3))], "error_msgs": []})
    assert lines == ["checkpoint weights missing from the checkpoint (initialized at random on reload): 2, e.g. a.w",
                     "checkpoint weights of the wrong shape (initialized at random on reload): 1, e.g. c.w"]


def test_a_checkpoint_that_behaves_like_another_model_never_passes(compose, tiny_dir, tmp_path):
    """Its weights keep the float parent's signs (formats.read accepts them) but every scale is
    shrunk 20x: a quantization that destroys the model. Thresholds that only look at PPL would let
    it pass (they are set loose here); the floor against plain RTN at its widths fails it."""
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    run(compose(tiny_overrides(tiny_dir, cache, **{"quant.group_size": 32, "loop.max_iters": 1,
                                                   "thresholds.max_ppl_increase_pct": 1e6})), tmp_path / "export")
    ckpt = tmp_path / "export" / "checkpoint"
    import shutil

    shutil.copytree(ckpt, _honest_copy(tmp_path))
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    for k in [k for k in tensors if k.endswith("weight_scale")]:
        tensors[k] = tensors[k] * 0.05
    save_file(tensors, f, metadata={"format": "pt"})
    over = {"quantized.name_or_path": str(ckpt), "thresholds.max_ppl_increase_pct": 1e6, "loop.max_iters": 1,
            "export.enabled": "false"}
    report = run(compose(tiny_overrides(tiny_dir, cache, **over)), tmp_path / "repair")
    first = report["iterations"][0]
    assert not first["passed"] and any("behaves like another model" in f for f in first["failed"]), first["failed"]
    assert report["final"]["passed"] is False
    assert any("behaves like another model" in w for w in report["warnings"])
    honest = run(compose(tiny_overrides(tiny_dir, cache, **{**over, "quantized.name_or_path": str(
        _honest_copy(tmp_path))})), tmp_path / "honest")
    assert honest["final"]["passed"] is True  # the same checkpoint, untampered, passes


def _honest_copy(tmp_path: Path) -> Path:
    """The untampered export (re-exported: the first one was edited in place)."""
    return tmp_path / "export2" / "checkpoint"
