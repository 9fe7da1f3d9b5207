"""Stage: data. Named text domains, deterministic eval windows and seeded calibration samples.

Domains: ``wikitext2`` (test split), ``c4`` (train-shard sample; calibration), ``pydoc`` (Python's
own docs, always present), ``stdlib`` (Python stdlib source: a code domain), ``humaneval`` and
``mbpp`` (code: prompts + reference solutions), or a path to a ``.txt`` / ``.jsonl`` file
(``path.jsonl:field`` picks the text field; default ``text``). Local copies are read from
``data_dir`` (``$QUANTFIX_DATA`` or ``../shared/data`` beside the repo); ``wikitext2`` and ``c4`` fall
back to the hub through ``datasets`` for users who have it, unless offline (the ``offline`` config,
or ``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import sysconfig
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from quantfix.errors import QuantfixError
from quantfix.source import is_offline

DOMAINS = ("wikitext2", "c4", "pydoc", "stdlib", "humaneval", "mbpp")
# which broad domain each source belongs to (per-domain perplexity, calibration advice)
DOMAIN_KIND = {"wikitext2": "prose", "pydoc": "prose", "c4": "web", "stdlib": "code", "humaneval": "code", "mbpp": "code"}


def default_data_dir(configured: Optional[str] = None) -> Path:
    """``data_dir`` (or $QUANTFIX_DATA, else ../shared/data beside the repo). A folder the user
    named must exist: a typo is a local error, never a hub download of the corpora it should hold."""
    named = configured or os.environ.get("QUANTFIX_DATA")
    if named:
        path = Path(named).expanduser()
        if not path.is_dir():
            key = "data_dir" if configured else "$QUANTFIX_DATA"
            raise QuantfixError(f"{key}={named} is not a directory: point it at the folder holding wikitext2/, c4/, ... "
                                "(or leave it unset)")
        return path
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _holds_corpora(data_dir: Path) -> bool:
    """A data folder of ours: one of the named corpora's folders is in it (then a missing one is a
    local error, not a hub download)."""
    return data_dir.is_dir() and any((data_dir / d).is_dir() for d in DOMAINS)


# what reading a binary, truncated or mislabelled (.gz that is not gzip) file as text raises
_NOT_TEXT = (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error)


@contextmanager
def _reading(path: Path):
    """Turn a decode or read error inside the block into one line that names the file."""
    try:
        yield
    except _NOT_TEXT as e:
        raise QuantfixError(f"data file {path} is not UTF-8 text ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100]}): pass a UTF-8 .txt or .jsonl file") from e
    except OSError as e:
        raise QuantfixError(f"cannot read data file {path} ({e.strerror or e})") from e


def _read_text(path: Path) -> str:
    with _reading(path):
        return path.read_text(encoding="utf-8")


def _read_jsonl(path: Path, field: str, limit: Optional[int] = None) -> List[str]:
    with _reading(path):
        return _read_jsonl_rows(path, field, limit)


def _read_jsonl_rows(path: Path, field: str, limit: Optional[int]) -> List[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantfixError(f"{path}: line {n} is not JSON ({e.msg}); a .jsonl file holds one JSON object "
                                    "per line") from e
            if not isinstance(row, dict):
                raise QuantfixError(f"{path}: line {n} is not a JSON object; a .jsonl file holds one object per line")
            if field not in row:
                raise QuantfixError(f"{path}: a line has no field {field!r} (fields: {', '.join(row)}); "
                                    f"name the field as {path}:<field>")
            out.append(str(row[field]))
            if limit and len(out) >= limit:
                break
    return out


def _no_hub(name: str, local: Path, data_dir: Path, offline: bool = True) -> QuantfixError:
    why = "offline is on (no hub download)" if offline else "data_dir holds other corpora but not this one"
    return QuantfixError(f"{name} not found at {local} and {why}: set data_dir=<folder "
                         f"with {local.relative_to(data_dir)}> (data_dir is {data_dir})")


def _wikitext2(data_dir: Path, offline: bool = False) -> str:
    local = data_dir / "wikitext2" / "wiki.test.raw"
    if local.exists():
        return _read_text(local)
    if offline or _holds_corpora(data_dir):
        raise _no_hub("WikiText-2", local, data_dir, offline)
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(ds["text"])
    except Exception as e:
        raise QuantfixError(f"WikiText-2 not found at {local} and the hub could not provide it ({type(e).__name__}); "
                            "set data_dir=<folder with wikitext2/wiki.test.raw>") from e


def _c4(data_dir: Path, offline: bool = False) -> str:
    local = data_dir / "c4" / "c4-train.00000-of-01024.head1000.jsonl"
    if local.exists():
        return "\n\n".join(_read_jsonl(local, "text"))
    if offline or _holds_corpora(data_dir):
        raise _no_hub("C4 sample", local, data_dir, offline)
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
    with _reading(path), gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return "\n\n".join(r["prompt"] + r["canonical_solution"] for r in rows)


def _mbpp(data_dir: Path) -> str:
    path = data_dir / "mbpp" / "mbpp.jsonl"
    if not path.exists():
        raise QuantfixError(f"MBPP not found at {path}: set data_dir=<folder with mbpp/mbpp.jsonl>")
    rows = [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]
    return "\n\n".join(f'"""{r["text"]}"""\n{r["code"]}' for r in rows)


_SOURCES: Dict[str, Callable[[Path], str]] = {
    "wikitext2": _wikitext2, "c4": _c4, "pydoc": _pydoc, "stdlib": _stdlib, "humaneval": _humaneval, "mbpp": _mbpp,
}
_HUB_SOURCES = ("wikitext2", "c4")  # the ones that may fall back to the hub


def load_text(source: str, data_dir: str, offline: Optional[bool] = None) -> str:
    """The raw text of a named domain or of a .txt/.jsonl path (``file.jsonl:field``); offline
    (None: HF_HUB_OFFLINE), a missing local copy is an error instead of a hub download."""
    return _load_text(source, str(data_dir), is_offline(offline))


@functools.lru_cache(maxsize=16)
def _load_text(source: str, data_dir: str, offline: bool) -> str:
    if source in _HUB_SOURCES:
        return _SOURCES[source](Path(data_dir), offline)
    if source in _SOURCES:
        return _SOURCES[source](Path(data_dir))
    path_str, _, field = source.partition(":") if source.count(":") == 1 and not source.endswith(":") else (source, "", "")
    path = Path(path_str).expanduser()
    if path.suffix in (".txt", ".jsonl", ".gz", ".json", ".raw"):
        if not path.exists():
            raise QuantfixError(f"text file not found: {path}")
        if path.suffix in (".jsonl", ".gz"):
            return "\n\n".join(_read_jsonl(path, field or "text"))
        return _read_text(path)
    raise QuantfixError(f"unknown data source {source!r}: use one of {', '.join(DOMAINS)} or a .txt/.jsonl path")


@functools.lru_cache(maxsize=16)
def _tokens(source: str, data_dir: str, tokenizer, offline: bool) -> torch.Tensor:
    text = load_text(source, data_dir, offline)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True, verbose=False).input_ids[0]
    return ids


def tokens(source: str, data_dir: str, tokenizer, offline: Optional[bool] = None) -> torch.Tensor:
    return _tokens(source, str(data_dir), tokenizer, is_offline(offline))


def bos_id(tokenizer) -> Optional[int]:
    """The BOS token the tokenizer puts before every text (Llama, Gemma), or None (GPT-2, SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bos if len(ids) and ids[0] == bos else None


def _strip_bos(ids: torch.Tensor, bos: Optional[int]) -> torch.Tensor:
    """The token stream without its leading BOS: windows cut from it each start with the BOS the
    model saw in training at position 0 (issue 14 measured Gemma-3 at PPL 52.5 without, 19.4 with)."""
    return ids[1:] if bos is not None and ids.numel() and int(ids[0]) == bos else ids


def _windows(stream: torch.Tensor, bos: Optional[int], n: int, seq_len: int) -> torch.Tensor:
    if bos is None:
        return stream[: n * seq_len].view(n, seq_len).clone()
    body = stream[: n * (seq_len - 1)].view(n, seq_len - 1)
    return torch.cat([torch.full((n, 1), bos, dtype=body.dtype), body], 1)


def eval_windows(source: str, data_dir: str, tokenizer, n_windows: int, seq_len: int,
                 offline: Optional[bool] = None) -> torch.Tensor:
    """The first n_windows consecutive, non-overlapping windows of seq_len tokens: [n_windows, seq_len];
    each window starts with the BOS token when the tokenizer adds one."""
    bos = bos_id(tokenizer)
    ids = _strip_bos(tokens(source, data_dir, tokenizer, offline), bos)
    per = seq_len - (bos is not None)
    need = n_windows * per
    if ids.numel() < per:
        fix = (f"lower eval.seq_len (at most {ids.numel() + (bos is not None)}) or point eval.source at a longer text"
               if ids.numel() >= 8 else "point eval.source at a text with content")
        raise QuantfixError(f"eval text {source!r} holds {ids.numel()} tokens, not even one window of eval.seq_len="
                            f"{seq_len}: {fix}")
    if ids.numel() < need:
        raise QuantfixError(
            f"eval text {source!r} has {ids.numel()} tokens but eval.n_windows x eval.seq_len = {n_windows} x {seq_len} "
            f"= {n_windows * seq_len}: lower eval.n_windows (at most {ids.numel() // per}) or eval.seq_len"
        )
    return _windows(ids, bos, n_windows, seq_len)


def calibration_samples(domains: List[str], data_dir: str, tokenizer, n_samples: int, seq_len: int, seed: int,
                        offline: Optional[bool] = None, holdout: Optional[Dict[str, int]] = None) -> torch.Tensor:
    """n_samples windows of seq_len tokens, drawn round-robin from the domains at seeded random offsets.
    ``holdout``: source -> tokens at its start that calibration must not see (the eval windows, when
    a calibration domain is the eval source)."""
    g = torch.Generator().manual_seed(seed)
    bos = bos_id(tokenizer)
    per_domain = [_strip_bos(tokens(d, data_dir, tokenizer, offline), bos)[(holdout or {}).get(d, 0):]
                  for d in domains]
    for d, ids in zip(domains, per_domain):
        if ids.numel() <= seq_len:
            raise QuantfixError(f"calibration domain {d!r} has only {ids.numel()} tokens (beyond the eval windows); "
                                f"data.seq_len={seq_len} needs more: lower data.seq_len or pick another domain")
    out = []
    for i in range(n_samples):
        ids = per_domain[i % len(domains)]
        start = int(torch.randint(0, ids.numel() - seq_len, (1,), generator=g))
        out.append(ids[start:start + seq_len] if bos is None else
                   torch.cat([torch.tensor([bos], dtype=ids.dtype), ids[start:start + seq_len - 1]]))
    return torch.stack(out)
