"""GGUF SentencePiece vocabularies: llama.cpp's tokenization written out, the fast tokenizer rebuilt
from the file, and the check that catches a wrong one (no BOS, other pieces)."""
from __future__ import annotations

import pytest

from quantfix.formats import gguf_tokenizer as gt

# a tiny SentencePiece-BPE vocabulary: control tokens, bytes, characters, merged pieces scored by
# merge order (llama.cpp's scores are -rank), one user-defined whitespace piece
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = list("\u2581abcdehilnoprstu")
PIECES = ["\u2581t", "he", "\u2581the", "ca", "\u2581ca", "\u2581cap", "it", "al", "ital", "\u2581capital", "ap",
          "in", "\u2581in"]
USER = ["    "]


def tiny_vocab(add_bos: bool = True, path=None):
    import gguf

    tokens = CONTROL + [f"<0x{b:02X}>" for b in range(256)] + CHARS + PIECES + USER
    types = [3] * len(CONTROL) + [6] * 256 + [1] * (len(CHARS) + len(PIECES)) + [4] * len(USER)
    scores = [-1000.0] * len(CONTROL) + [0.0] * 256 + [-1e4 - i for i in range(len(CHARS))] + \
        [-float(i) for i in range(len(PIECES))] + [-1000.0] * len(USER)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return gt.read_vocab(str(path))


def _pieces(v, ids):
    return [v.tokens[i] for i in ids]


def test_reference_is_llama_cpp_spm_bpe(tmp_path):
    v = tiny_vocab(path=tmp_path / "t.gguf")
    assert _pieces(v, gt.reference_encode(v, "the capital")) == ["t", "he", "\u2581capital"]
    # best-scored merge first: "▁t"+"he" is not a piece, so "the" at the start stays t + he
    assert _pieces(v, gt.reference_encode(v, " the cap")) == ["\u2581the", "\u2581cap"]
    # user-defined pieces match the raw text first; unknown characters fall back to UTF-8 bytes
    assert _pieces(v, gt.reference_encode(v, "    in é")) == ["    ", "in", "\u2581", "<0xC3>", "<0xA9>"]


@pytest.mark.parametrize("text", ["the capital", " the cap in the capital", "    in é!", "tap\n\nthe 😀", ""])
def test_rebuilt_tokenizer_matches_the_reference_and_adds_bos(tmp_path, text):
    v = tiny_vocab(path=tmp_path / "t.gguf")
    tok = gt.build_spm(v)
    ids = tok(text)["input_ids"]
    assert ids[0] == v.bos_id
    assert ids[1:] == gt.reference_encode(v, text)
    assert tok.decode(ids[1:]) == text


def test_check_names_a_missing_bos_and_other_pieces(tmp_path):
    v = tiny_vocab(path=tmp_path / "t.gguf")
    no_bos = gt.build_spm(tiny_vocab(add_bos=False, path=tmp_path / "n.gguf"))
    assert "no BOS" in gt.check(no_bos, v, "the capital")
    assert gt.check(gt.build_spm(v), v, "the capital in the cap") is None

    class Chars:  # one token per character, as a BPE without merges would do
        def __init__(self, ids):
            self.ids = ids

        def __call__(self, text):
            return {"input_ids": [v.bos_id] + [self.ids.get(c, v.unk_id) for c in text.replace(" ", "\u2581")]}

        def decode(self, ids):
            return "".join(v.tokens[i] for i in ids).replace("\u2581", " ")

    assert "differ" in gt.check(Chars(v.ids), v, "the capital")
