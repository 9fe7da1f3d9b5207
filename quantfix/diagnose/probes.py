"""Symptom probes: repetition loops, refusals and divergence in greedy generations; per-domain
perplexity to expose a domain gap."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from tqdm.auto import tqdm
from quantfix.weights import input_device

REFUSAL_PHRASES = ("i can't", "i cannot", "i'm sorry", "i am sorry", "i'm not able", "i am not able",
                   "as an ai", "i won't", "i will not", "unable to help", "cannot assist", "can't assist",
                   "not appropriate", "i apologize")


def _encode(tok, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=False)
        return ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
    return tok(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(model, tok, probes: List[dict], max_new_tokens: int, progress: bool = True,
             batched: bool = True) -> List[List[int]]:
    """Greedy continuations (token ids) of every probe, up to and including the first EOS. Batched:
    all prompts in one left-padded generate call (one decoding step serves every prompt: ~10x
    fewer steps for the default 10 probes); batched=False runs them one at a time."""
    eos = tok.eos_token_id
    pad = eos if eos is not None else (tok.pad_token_id or 0)
    encoded = [_encode(tok, p["prompt"], bool(p.get("chat")))[0] for p in probes]
    groups = [encoded] if batched else [[e] for e in encoded]
    outs = []
    dev = input_device(model)
    for group in tqdm(groups, desc="probes", unit="batch", disable=not progress or batched, leave=False):
        width = max(len(e) for e in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(group):  # left padding: every prompt ends where generation starts
            ids[row, width - len(e):] = e
            mask[row, width - len(e):] = 1
        gen = model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos) + 1]
            outs.append(row)
    return outs


def repetition(ids: List[int], n: int = 4) -> dict:
    """Fraction of n-grams that repeat an earlier one, distinct-2, and a loop verdict."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    bigrams = [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]
    distinct2 = len(set(bigrams)) / max(1, len(bigrams))
    frac = repeats / max(1, len(grams))
    return {"repeated_ngram_frac": round(frac, 3), "distinct2": round(distinct2, 3),
            "loop": bool(len(grams) >= 8 and (frac > 0.5 or distinct2 < 0.35))}


def char_loop(text: str, max_period: int = 6, min_repeats: int = 4) -> bool:
    """The text ends in a short pattern repeated (period 1-6 characters, at least 4 times and 12
    characters): "P.S.I.E.S.A.L.A.L.A.L.A.L.A." — a loop that token n-grams miss when the
    tokenizer splits the repeats differently."""
    t = "".join(text.split())  # spaces vary between repeats
    for period in range(1, max_period + 1):
        span = max(12, min_repeats * period)
        if len(t) < span:
            continue
        tail = t[-span:]
        if all(tail[i] == tail[i - period] for i in range(period, span)):
            return True
    return False


def is_refusal(text: str) -> bool:
    t = text.lower()
    return any(p in t for p in REFUSAL_PHRASES)


def first_divergence(a: List[int], b: List[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_generations(tok, probes: List[dict], fp: List[List[int]], q: List[List[int]]) -> List[dict]:
    rows = []
    for p, a, b in zip(probes, fp, q):
        ta, tb = tok.decode(a, skip_special_tokens=True), tok.decode(b, skip_special_tokens=True)
        ra, rb = repetition(a), repetition(b)
        ra["loop"], rb["loop"] = ra["loop"] or char_loop(ta), rb["loop"] or char_loop(tb)
        rows.append({
            "domain": p["domain"], "prompt": p["prompt"], "float": ta, "quantized": tb,
            "first_divergence": first_divergence(a, b), "float_repetition": ra, "quantized_repetition": rb,
            "new_loop": rb["loop"] and not ra["loop"], "new_refusal": is_refusal(tb) and not is_refusal(ta),
        })
    return rows


DOMAIN_TOPK, DOMAIN_FULL_MB = 256, 256  # as eval's defaults: the full distribution when small, else top-k


def domain_reference(model, windows: torch.Tensor, batch_size: int):
    """The float model's next-token distribution on one domain's windows, held like the eval's
    reference (full log-probs up to DOMAIN_FULL_MB, else top-k + tail: a 128k vocabulary would
    otherwise keep [tokens, vocab] float32 per domain and side on the host)."""
    from quantfix import evaluate as ev

    return ev.reference(model, windows, batch_size, DOMAIN_TOPK, DOMAIN_FULL_MB, progress=False)


def domain_eval(model, windows: torch.Tensor, ref, batch_size: int):
    """The quantized model on one domain's windows against its float ``domain_reference``."""
    from quantfix import evaluate as ev

    return ev.evaluate(model, windows, ref, batch_size, progress=False)


def eval_domain_metrics(base, q) -> dict:
    """A domain whose text is the eval's own (``eval.source``), measured by the eval: the float
    reference's and a trial's Metrics (``base``, ``q``) on the eval windows, which begin with that
    domain's windows and hold 8x their tokens at the defaults; ``domain_metrics``' keys, and
    ``windows: eval``."""
    return dict(_float_vs_quantized(base.nll, q), windows="eval")


def domain_metrics(windows: torch.Tensor, fp_ref, q) -> dict:
    """Float vs quantized perplexity and KL divergence on one domain (``q``: ``domain_eval``'s Metrics)."""
    return _float_vs_quantized(float(fp_ref.nll.double().mean()), q)


def _float_vs_quantized(nll_fp: float, q) -> dict:
    return {"ppl_float": round(math.exp(nll_fp), 3), "ppl_quantized": round(q.ppl, 3),
            "ppl_increase_pct": round(100 * (math.exp(q.nll - nll_fp) - 1), 2), "kld_mean": round(q.kld_mean, 5),
            "n_tokens": int(q.n_tokens)}
