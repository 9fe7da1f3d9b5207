"""The content-keyed cache (``quantfix.cache``): keys follow the model's content (not its path or
mtime), a damaged entry is detected by its checksum, removed and recomputed, and a full disk while
writing one is one line that leaves no partial entry."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from quantfix import cache as cache_mod
from quantfix.errors import QuantfixError
from tests.conftest import run_report as run
from tests.conftest import model_dir, tiny_overrides

DIAG = {"mode": "diagnose", "diagnose.probes": "false", "diagnose.domain_seq_len": 64}


def test_model_overwritten_in_place_gets_a_new_baseline(compose, tokenizer, tmp_path):
    d = model_dir(tmp_path / "model", tokenizer, seed=0)
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


# --- corrupt entries: detected, removed, recomputed -----------------------------------------------

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
