"""Stage: data. Named text domains, deterministic eval windows and seeded calibration samples.

Domains: ``wikitext2`` (test split), ``c4`` (train-shard sample; calibration), ``pydoc`` (Python's
own docs, always present), ``stdlib`` (Python stdlib source: a code domain), ``humaneval`` and
``mbpp`` (code: prompts + reference solutions), or a path to a ``.txt`` / ``.jsonl`` file
(``path.jsonl:field`` picks the text field; default ``text``). Local copies are read from
``data_dir`` (``$QUANTFIX_DATA`` or ``../shared/data`` beside the repo); ``wikitext2`` and ``c4`` fall
back to the hub through ``datasets`` for users who have it.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import sysconfig
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from quantfix.errors import QuantfixError

DOMAINS = ("wikitext2", "c4", "pydoc", "stdlib", "humaneval", "mbpp")
# which broad domain each source belongs to (per-domain perplexity, calibration advice)
DOMAIN_KIND = {"wikitext2": "prose", "pydoc": "prose", "c4": "web", "stdlib": "code", "humaneval": "code", "mbpp": "code"}


def default_data_dir(configured: Optional[str] = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("QUANTFIX_DATA"):
        return Path(os.environ["QUANTFIX_DATA"]).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _read_jsonl(path: Path, field: str, limit: Optional[int] = None) -> List[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if field not in row:
                raise QuantfixError(f"{path}: a line has no field {field!r} (fields: {', '.join(row)}); "
                                    f"name the field as {path}:<field>")
            out.append(str(row[field]))
            if limit and len(out) >= limit:
                break
    return out


def _wikitext2(data_dir: Path) -> str:
    local = data_dir / "wikitext2" / "wiki.test.raw"
    if local.exists():
        return local.read_text(encoding="utf-8")
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(ds["text"])
    except Exception as e:
        raise QuantfixError(f"WikiText-2 not found at {local} and the hub could not provide it ({type(e).__name__}); "
                            "set data_dir=<folder with wikitext2/wiki.test.raw>") from e


def _c4(data_dir: Path) -> str:
    local = data_dir / "c4" / "c4-train.00000-of-01024.head1000.jsonl"
    if local.exists():
        return "\n\n".join(_read_jsonl(local, "text"))
    try:
        import datasets

        ds = datasets.load_dataset("allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz", split="train")
        return "\n\n".join(ds["text"][:1000])
    except Exception as e:
        raise QuantfixError(f"C4 sample not found at {local} and the hub could not provide it ({type(e).__name__}); "
                            "set data_dir=<folder with c4/...jsonl> or use data.domains=[pydoc]") from e


def _pydoc(_: Path) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _stdlib(_: Path, max_chars: int = 3_000_000) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n\n".join(parts)


def _humaneval(data_dir: Path) -> str:
    path = data_dir / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise QuantfixError(f"HumanEval not found at {path}: set data_dir=<folder with humaneval/HumanEval.jsonl.gz>")
    opener = gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return "\n\n".join(r["prompt"] + r["canonical_solution"] for r in rows)


def _mbpp(data_dir: Path) -> str:
    path = data_dir / "mbpp" / "mbpp.jsonl"
    if not path.exists():
        raise QuantfixError(f"MBPP not found at {path}: set data_dir=<folder with mbpp/mbpp.jsonl>")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return "\n\n".join(f'"""{r["text"]}"""\n{r["code"]}' for r in rows)


_SOURCES: Dict[str, Callable[[Path], str]] = {
    "wikitext2": _wikitext2, "c4": _c4, "pydoc": _pydoc, "stdlib": _stdlib, "humaneval": _humaneval, "mbpp": _mbpp,
}


@functools.lru_cache(maxsize=16)
def load_text(source: str, data_dir: str) -> str:
    """The raw text of a named domain or of a .txt/.jsonl path (``file.jsonl:field``)."""
    if source in _SOURCES:
        return _SOURCES[source](Path(data_dir))
    path_str, _, field = source.partition(":") if source.count(":") == 1 and not source.endswith(":") else (source, "", "")
    path = Path(path_str).expanduser()
    if path.suffix in (".txt", ".jsonl", ".gz", ".json", ".raw"):
        if not path.exists():
            raise QuantfixError(f"text file not found: {path}")
        if path.suffix in (".jsonl", ".gz"):
            return "\n\n".join(_read_jsonl(path, field or "text"))
        return path.read_text(encoding="utf-8")
    raise QuantfixError(f"unknown data source {source!r}: use one of {', '.join(DOMAINS)} or a .txt/.jsonl path")


@functools.lru_cache(maxsize=16)
def _tokens(source: str, data_dir: str, tokenizer) -> torch.Tensor:
    text = load_text(source, data_dir)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True, verbose=False).input_ids[0]
    return ids


def tokens(source: str, data_dir: str, tokenizer) -> torch.Tensor:
    return _tokens(source, str(data_dir), tokenizer)


def eval_windows(source: str, data_dir: str, tokenizer, n_windows: int, seq_len: int) -> torch.Tensor:
    """The first n_windows consecutive, non-overlapping windows of seq_len tokens: [n_windows, seq_len]."""
    ids = tokens(source, data_dir, tokenizer)
    need = n_windows * seq_len
    if ids.numel() < need:
        raise QuantfixError(
            f"eval text {source!r} has {ids.numel()} tokens but eval.n_windows x eval.seq_len = {n_windows} x {seq_len} "
            f"= {need}: lower eval.n_windows (at most {ids.numel() // seq_len}) or eval.seq_len"
        )
    return ids[:need].view(n_windows, seq_len).clone()


def calibration_samples(domains: List[str], data_dir: str, tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """n_samples windows of seq_len tokens, drawn round-robin from the domains at seeded random offsets."""
    g = torch.Generator().manual_seed(seed)
    per_domain = [tokens(d, data_dir, tokenizer) for d in domains]
    for d, ids in zip(domains, per_domain):
        if ids.numel() <= seq_len:
            raise QuantfixError(f"calibration domain {d!r} has only {ids.numel()} tokens; data.seq_len={seq_len} "
                                "needs more: lower data.seq_len or pick another domain")
    out = []
    for i in range(n_samples):
        ids = per_domain[i % len(domains)]
        start = int(torch.randint(0, ids.numel() - seq_len, (1,), generator=g))
        out.append(ids[start:start + seq_len])
    return torch.stack(out)
