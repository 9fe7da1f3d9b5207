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
from quantfix import verdict
from quantfix.config import ThresholdsConfig
from quantfix.errors import QuantfixError
from quantfix.loop import run
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

    from quantfix import model as model_mod

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
    out = model_mod.convert_gguf(gguf, tmp_path / "cache")
    assert len(calls) == 2 and (out / "config.json").exists()
    copy = tmp_path / "b" / "tiny.gguf"  # another path, another mtime: the same content
    copy.parent.mkdir()
    shutil.copy(gguf, copy)
    os.utime(copy, (1, 1))
    assert model_mod.convert_gguf(copy, tmp_path / "cache") == out and len(calls) == 2
    st = out / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])  # damaged: detected, converted again
    with caplog.at_level(logging.WARNING, logger="quantfix"):
        assert model_mod.convert_gguf(copy, tmp_path / "cache") == out
    assert len(calls) == 4 and "is damaged or incomplete" in caplog.text
    copy.write_bytes(os.urandom(3000))  # other content: another directory
    assert model_mod.convert_gguf(copy, tmp_path / "cache") != out


def test_sensitivity_of_an_existing_checkpoint_is_not_reused_for_a_plan_with_the_same_labels(
        compose, tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    run(compose(tiny_overrides(tiny_dir, cache, **{"quant": "gptq", "quant.group_size": 32, "loop.max_iters": 1,
                                                   "thresholds.max_ppl_increase_pct": 1e6})), tmp_path / "export")
    ckpt = tmp_path / "export" / "checkpoint"
    a = run(compose(tiny_overrides(tiny_dir, cache, **DIAG, **{"quantized.name_or_path": str(ckpt)})),
            tmp_path / "diag_ckpt")
    b = run(compose(tiny_overrides(tiny_dir, cache, **DIAG, **{"quant.group_size": 32})), tmp_path / "diag_rtn")
    assert a["iterations"][0]["plan_summary"] == b["iterations"][0]["plan_summary"] == "W4g32 x14"  # same labels
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
