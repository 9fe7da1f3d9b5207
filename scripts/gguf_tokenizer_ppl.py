"""Float PPL and greedy text of a GGUF model with transformers' own GGUF tokenizer (saved and
reloaded, as a converted directory holds it) and with quantfix's checked one, same weights.

    PYTHONPATH=. python scripts/gguf_tokenizer_ppl.py <file.gguf> [n_windows] [seq_len]
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch


@torch.no_grad()
def ppl(model, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for w in windows.split(2):
        logits = model(input_ids=w).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, w[:, 1:, None])[..., 0]
        nll -= lp.sum().item()
        n += lp.numel()
    return math.exp(nll / n)


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int = 24) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(path: str, n_windows: int = 16, seq_len: int = 512) -> None:
    from transformers import AutoTokenizer

    from quantfix import data as data_mod
    from quantfix import cache as cache_mod, loading as loading_mod, source as source_mod
    from quantfix.formats import gguf_tokenizer as gt

    gguf = Path(path)
    resolved = source_mod.resolve(str(gguf), cache_mod.cache_dir())  # converts once, tokenizer checked
    model, fixed = loading_mod.load(resolved, torch.float32, torch.device("cpu"))
    raw = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with tempfile.TemporaryDirectory() as d:
        raw.save_pretrained(d)
        before = AutoTokenizer.from_pretrained(d)
    vocab = gt.read_vocab(str(gguf))
    data_dir = str(data_mod.default_data_dir())
    for label, tok in (("transformers' GGUF tokenizer (saved/reloaded)", before), ("quantfix (checked)", fixed)):
        why = gt.check(tok, vocab)
        w = data_mod.eval_windows("wikitext2", data_dir, tok, n_windows, seq_len)
        print(f"{label}: check: {why or 'OK'}; {type(tok.backend_tokenizer.model).__name__}; "
              f"PPL {ppl(model, w):.2f} on {n_windows}x{seq_len} wikitext2 windows (window starts with "
              f"{tok.convert_ids_to_tokens(w[0, :3].tolist())})")
        print(f"  greedy: {greedy(model, tok, 'The capital of France is')!r}")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
