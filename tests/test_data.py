import json

import pytest
import torch

from quantfix import data
from quantfix.errors import QuantfixError
from tests.conftest import SHARED_DATA


def test_eval_windows_are_deterministic_and_contiguous(tokenizer):
    a = data.eval_windows("pydoc", str(SHARED_DATA), tokenizer, 3, 50)
    b = data.eval_windows("pydoc", str(SHARED_DATA), tokenizer, 3, 50)
    ids = data.tokens("pydoc", str(SHARED_DATA), tokenizer)
    assert torch.equal(a, b) and a.shape == (3, 50)
    assert torch.equal(a.flatten(), ids[:150])


def test_eval_text_too_short_names_the_fix(tokenizer, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("only a few words here " * 6)
    with pytest.raises(QuantfixError, match=r"lower eval.n_windows \(at most \d\) or eval.seq_len"):
        data.eval_windows(str(f), str(SHARED_DATA), tokenizer, 4, 24)
    f = tmp_path / "shorter.txt"  # another file: texts are read once per path
    f.write_text("only a few words here")
    with pytest.raises(QuantfixError, match=r"not even one window of eval.seq_len=64: lower eval.seq_len \(at most "):
        data.eval_windows(str(f), str(SHARED_DATA), tokenizer, 4, 64)
    f = tmp_path / "empty.txt"
    f.write_text("")  # an empty file advised "eval.n_windows (at most 0)"
    with pytest.raises(QuantfixError, match="holds 0 tokens"):
        data.eval_windows(str(f), str(SHARED_DATA), tokenizer, 4, 64)


def test_calibration_is_seeded_and_mixes_domains(tokenizer, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"body": "def f(x):\n    return x * %d\n" % i * 20}) for i in range(50)))
    src = f"{f}:body"
    a = data.calibration_samples(["pydoc", src], str(SHARED_DATA), tokenizer, 6, 32, seed=3)
    b = data.calibration_samples(["pydoc", src], str(SHARED_DATA), tokenizer, 6, 32, seed=3)
    c = data.calibration_samples(["pydoc", src], str(SHARED_DATA), tokenizer, 6, 32, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (6, 32)
    code = set(data.tokens(src, str(SHARED_DATA), tokenizer).tolist())
    assert set(a[1].tolist()) <= code  # odd samples come from the second domain


def test_unknown_source_and_missing_field(tokenizer, tmp_path):
    with pytest.raises(QuantfixError, match="unknown data source 'nope'"):
        data.load_text("nope", str(SHARED_DATA))
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"content": "hi"}))
    with pytest.raises(QuantfixError, match="no field 'text'"):
        data.load_text(str(f), str(SHARED_DATA))


@pytest.mark.skipif(not (SHARED_DATA / "wikitext2").exists(), reason="needs ../shared/data")
def test_shared_corpora_load():
    assert len(data.load_text("wikitext2", str(SHARED_DATA))) > 1_200_000
    assert "def " in data.load_text("humaneval", str(SHARED_DATA))
    assert len(data.load_text("c4", str(SHARED_DATA))) > 1_000_000
    assert "import" in data.load_text("stdlib", str(SHARED_DATA))


def test_calibration_never_sees_the_eval_windows(tokenizer):
    from quantfix import data as data_mod

    ids = data_mod.tokens("pydoc", ".", tokenizer)
    held = 64 * 8
    samples = data_mod.calibration_samples(["pydoc"], ".", tokenizer, 64, 32, 0, holdout={"pydoc": held})
    head = ids[:held + 31]
    windows = {tuple(head[i:i + 32].tolist()) for i in range(held)}
    assert not any(tuple(s.tolist()) in windows for s in samples)
    free = data_mod.calibration_samples(["pydoc"], ".", tokenizer, 64, 32, 0)
    assert not torch.equal(free, samples)


class _BosTokenizer:
    """A stand-in for a Llama/Gemma-style tokenizer: one id per character, BOS (1) in front."""
    bos_token_id = 1

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def __call__(self, text, **_):
        class Out:
            pass
        out = Out()
        out.input_ids = ([1] if self.adds_bos else []) + [10 + (ord(c) % 50) for c in text]
        return out


@pytest.mark.parametrize("adds_bos", [True, False])
def test_eval_windows_and_calibration_samples_start_with_bos_when_the_tokenizer_adds_one(monkeypatch, adds_bos):
    stream = torch.arange(100, 1100)
    ids = torch.cat([torch.tensor([1]), stream]) if adds_bos else stream
    monkeypatch.setattr(data, "tokens", lambda *a, **k: ids)
    tok = _BosTokenizer(adds_bos)
    w = data.eval_windows("x", "", tok, 4, 16)
    assert w.shape == (4, 16)
    if adds_bos:  # every window: BOS, then the next 15 tokens of the stream, none skipped or repeated
        assert (w[:, 0] == 1).all() and torch.equal(w[:, 1:].reshape(-1), stream[:60])
    else:
        assert torch.equal(w.reshape(-1), stream[:64])
    s = data.calibration_samples(["x"], "", tok, 3, 16, seed=0)
    assert s.shape == (3, 16) and ((s[:, 0] == 1).all() if adds_bos else not (s == 1).any())


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_offline_data_never_falls_back_to_the_hub(tmp_path, tokenizer, monkeypatch, source):
    import datasets

    def no_hub(*a, **k):
        raise AssertionError("datasets.load_dataset was called")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(QuantfixError, match=rf"not found at {empty}/.*offline is on .*data_dir is {empty}"):
        data.eval_windows(source, str(empty), tokenizer, 2, 16, offline=True)


@pytest.mark.parametrize("name", ["calib.txt", "calib.jsonl", "calib.jsonl.gz"])
def test_binary_calibration_file_is_one_line_naming_it(tmp_path, tokenizer, name):
    f = tmp_path / name
    f.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(QuantfixError, match=rf"data file {f} is not UTF-8 text") as info:
        data.calibration_samples(["pydoc", str(f)], str(SHARED_DATA), tokenizer, 4, 16, seed=0)
    assert "\n" not in str(info.value)
