"""Where a model comes from (``quantfix.source.resolve``): a local directory, a GGUF file (converted
once, keyed by content), a hub id (offline: only from the HF cache, never a network call); every bad
path one clear error naming the fix."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from quantfix import loading as loading_mod, source as source_mod
from quantfix.errors import QuantfixError

CPU = torch.device("cpu")


@pytest.mark.parametrize("path,msg", [
    ("/no/such/model", "model path not found: /no/such/model"),
    ("./missing.gguf", "GGUF file not found"),
    ("", "model.name_or_path is empty"),
])
def test_missing_paths(tmp_path, path, msg):
    with pytest.raises(QuantfixError, match=msg):
        source_mod.resolve(path, tmp_path)


def test_dir_without_config(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(QuantfixError, match="not a Hugging Face model directory"):
        source_mod.resolve(str(d), tmp_path)


# --- offline --------------------------------------------------------------------------------------

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


# --- GGUF conversion ------------------------------------------------------------------------------

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
