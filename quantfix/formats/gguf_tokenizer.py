"""The tokenizer of a GGUF file, checked and, where transformers' converter gets it wrong, rebuilt.

llama.cpp's SentencePiece vocabularies (``tokenizer.ggml.model = llama``: Llama 2, Gemma, ...) are
BPE models whose merge order is the pieces' scores: the tokenizer joins, again and again, the
adjacent pair whose joined piece scores highest; pieces not in the vocabulary fall back to
``<0xXX>`` byte tokens; user-defined pieces are matched whole first. transformers 5 builds a
Unigram model from those scores (``▁c ap it al`` for `` capital``) and drops BOS although the file
says ``add_bos_token``.

``reference_encode`` is that algorithm written out (llama.cpp's ``llm_tokenizer_spm``, slow, for
short samples); ``build_spm`` makes the fast tokenizer that computes the same (a BPE with merges
ranked by the joined piece's score, byte fallback); ``check`` compares a tokenizer with the
reference on a sample and with the file's BOS setting, and raises when they differ.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from quantfix.errors import QuantfixError

SAMPLE = ("The capital of France is Paris. It has been the country's capital since 987, and its museums — the "
          "Louvre, the Musée d'Orsay — draw millions.\n\ndef add(a, b):\n    return a + b  # 2 + 2 = 4\n"
          "Numbers 3.14159 and 1,000,000; emoji 🙂; 日本語のテキスト.")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: llama (SentencePiece), gpt2 (byte-level BPE), ...
    tokens: List[str]
    scores: Optional[List[float]]
    types: Optional[List[int]]
    bos_id: Optional[int]
    eos_id: Optional[int]
    unk_id: Optional[int]
    pad_id: Optional[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    has_merges: bool

    @property
    def ids(self) -> Dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def read_vocab(path: str) -> Optional[GGUFVocab]:
    from gguf import GGUFReader

    try:
        r = GGUFReader(path)
    except Exception:  # noqa: BLE001 - not readable by gguf: transformers' loader reports the file itself
        return None

    def get(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        try:
            if len(f.data) > 1000:  # big arrays: straight from the parts (contents() takes ~1 min on 262k)
                first = f.parts[f.data[0]]
                if first.dtype == np.uint8:  # strings
                    return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
                return np.concatenate([f.parts[i] for i in f.data]).tolist()
            return f.contents()
        except Exception as e:  # noqa: BLE001 - a field whose bytes do not decode: the file is damaged
            raise QuantfixError(f"{path}: GGUF field {key} cannot be read ({type(e).__name__}: {str(e)[:120]}): "
                                "re-download the file") from e

    if "tokenizer.ggml.tokens" not in r.fields:
        return None
    model = str(get("tokenizer.ggml.model", ""))
    return GGUFVocab(model=model, tokens=list(get("tokenizer.ggml.tokens")), scores=get("tokenizer.ggml.scores"),
                     types=get("tokenizer.ggml.token_type"), bos_id=get("tokenizer.ggml.bos_token_id"),
                     eos_id=get("tokenizer.ggml.eos_token_id"), unk_id=get("tokenizer.ggml.unknown_token_id"),
                     pad_id=get("tokenizer.ggml.padding_token_id"),
                     add_bos=bool(get("tokenizer.ggml.add_bos_token", model == "llama")),
                     add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
                     add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", model == "llama")),
                     has_merges="tokenizer.ggml.merges" in r.fields)


def _escape(v: GGUFVocab, text: str, first: bool) -> str:
    text = text.replace(" ", "\u2581")
    return ("\u2581" + text) if v.add_space_prefix and first and text else text


def reference_encode(v: GGUFVocab, text: str, ids: Optional[Dict[str, int]] = None) -> List[int]:
    """llama.cpp's SentencePiece-BPE tokenization (no BOS): user-defined pieces matched whole in the
    raw text first (longest first), then each stretch between them escaped (spaces to U+2581) and
    its characters joined best-score pair first (leftmost on a tie), unknown pieces as their UTF-8
    bytes."""
    ids = ids or v.ids
    user = sorted((t for t, k in zip(v.tokens, v.types or []) if k == USER_DEFINED and t), key=len, reverse=True)
    by_first: Dict[str, List[str]] = {}
    for u in user:
        by_first.setdefault(u[0], []).append(u)
    out: List[int] = []
    i, start = 0, 0
    while i < len(text):
        hit = next((u for u in by_first.get(text[i], ()) if text.startswith(u, i)), None)
        if hit is None:
            i += 1
            continue
        out += _spm_bpe(v, _escape(v, text[start:i], start == 0), ids)
        out.append(ids[hit])
        i += len(hit)
        start = i
    return out + _spm_bpe(v, _escape(v, text[start:], start == 0), ids)


def _spm_bpe(v: GGUFVocab, text: str, ids: Dict[str, int]) -> List[int]:
    if not text:
        return []
    sym = list(text)
    alive = [True] * len(sym)
    nxt = list(range(1, len(sym) + 1))
    prv = list(range(-1, len(sym) - 1))
    heap = []

    def push(a: int) -> None:
        b = nxt[a]
        if b < len(sym):
            tid = ids.get(sym[a] + sym[b])
            if tid is not None and v.types[tid] in (NORMAL, USER_DEFINED, UNUSED):
                heapq.heappush(heap, (-v.scores[tid], a, sym[a] + sym[b]))

    for a in range(len(sym) - 1):
        push(a)
    while heap:
        _, a, joined = heapq.heappop(heap)
        b = nxt[a] if a < len(sym) else len(sym)
        if not alive[a] or b >= len(sym) or not alive[b] or sym[a] + sym[b] != joined:
            continue  # a stale pair
        sym[a] = joined
        alive[b] = False
        nxt[a] = nxt[b]
        if nxt[b] < len(sym):
            prv[nxt[b]] = a
        if prv[a] >= 0:
            push(prv[a])
        push(a)
    out = []
    for a, s in enumerate(sym):
        if not alive[a]:
            continue
        tid = ids.get(s)
        if tid is not None and v.types[tid] != CONTROL:
            out.append(tid)
        else:
            out += [ids.get(f"<0x{b:02X}>", v.unk_id) for b in s.encode("utf-8")]
    return out


def build_spm(v: GGUFVocab):
    """A fast tokenizer for a llama.cpp SentencePiece vocabulary: BPE whose merges are ranked by the
    joined piece's score, byte fallback, user-defined and control pieces as added tokens, BOS/EOS
    added as the file says."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    if v.scores is None or v.types is None:
        raise QuantfixError("the GGUF's SentencePiece vocabulary has no scores or token types: cannot rebuild it")
    vocab = {t: i for i, t in enumerate(v.tokens)}
    merges = []
    for tid, tok in enumerate(v.tokens):
        if v.types[tid] not in (NORMAL, USER_DEFINED, UNUSED) or len(tok) < 2:
            continue
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None:
                merges.append((-v.scores[tid], tid, ia, ib, a, b))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], byte_fallback=True,
                     unk_token=v.tokens[v.unk_id] if v.unk_id is not None else None, fuse_unk=True)
    tok = Tokenizer(bpe)
    norm = [normalizers.Replace(" ", "\u2581")]
    if v.add_space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] +
                                    ([decoders.Strip(" ", 1, 0)] if v.add_space_prefix else []))
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(v.tokens, v.types) if k == CONTROL and t]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(v.tokens, v.types) if k == USER_DEFINED and t]
    tok.add_tokens(user)
    tok.add_special_tokens(special)
    name = lambda i: v.tokens[i] if i is not None and 0 <= i < len(v.tokens) else None  # noqa: E731
    bos, eos = name(v.bos_id), name(v.eos_id)
    single = ([f"{bos}:0"] if v.add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if v.add_eos and eos else [])
    pair = single + ["$B:1"]
    specials = [(t, vocab[t]) for t in {bos, eos} if t]
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   unk_token=name(v.unk_id), pad_token=name(v.pad_id),
                                   add_bos_token=v.add_bos, add_eos_token=v.add_eos)
    return fast


def check(tok, v: GGUFVocab, sample: str = SAMPLE) -> Optional[str]:
    """Why ``tok`` is not the GGUF's tokenizer (None if it is): BOS as the file says, the ids of
    the sample (for SentencePiece vocabularies: the reference tokenization), and decoding back."""
    ids = tok(sample)["input_ids"]
    if v.add_bos and v.bos_id is not None and (not ids or ids[0] != v.bos_id):
        return f"no BOS ({v.tokens[v.bos_id]!r}) at the start although the GGUF says add_bos_token=true"
    body = ids[1:] if v.add_bos and ids and ids[0] == v.bos_id else ids
    if v.add_eos and body and body[-1] == v.eos_id:
        body = body[:-1]
    if v.model == "llama" and v.scores is not None and v.types is not None:
        want = reference_encode(v, sample)
        if body != want:
            k = next((i for i, (a, b) in enumerate(zip(body, want)) if a != b), min(len(body), len(want)))
            got_s = " ".join(v.tokens[i] for i in body[k:k + 4])
            want_s = " ".join(v.tokens[i] for i in want[k:k + 4])
            return f"ids differ from the GGUF's SentencePiece tokenization at token {k}: {got_s!r} vs {want_s!r}"
    back = tok.decode(body)
    if back != sample:
        return f"decode(encode(sample)) differs from the sample: {back[:60]!r}"
    return None
