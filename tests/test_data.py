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
    f.write_text("only a few words here")
    with pytest.raises(QuantfixError, match="lower eval.n_windows"):
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
