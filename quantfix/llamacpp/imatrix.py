"""llama.cpp's importance-matrix file, written from statistics quantfix already has: for each linear
module, the sum over calibration tokens of x^2 per input channel and the number of tokens.

Format: the GGUF imatrix that this llama.cpp's ``llama-imatrix`` writes by default and that
``llama-quantize`` reads first (``common/imatrix-loader.cpp``): per weight ``<name>.in_sum2`` (F32,
[n_mat, cols]: the raw sums of x^2) and ``<name>.counts`` (F32, [n_mat, 1]: tokens), plus the keys
``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``
(without all three, llama-quantize refuses the file as "missing imatrix metadata"). Why not the
legacy ``.dat``: it stores sums pre-divided by the count and multiplied by a call count (a rounding
step, and only one count per tensor), and it is the fallback path of the loader; the GGUF stores
exactly our sums and counts, and llama-quantize computes the weights as ``sums / counts`` in float32
(``weights`` below), the same whether the file came from llama-imatrix or from us.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from quantfix.errors import QuantfixError

Stat = Tuple[np.ndarray, Union[int, Sequence[int], np.ndarray]]


def _entry(name: str, sums: np.ndarray, counts) -> Tuple[np.ndarray, np.ndarray]:
    """(sums [n_mat, cols] float32, counts [n_mat, 1] float32) of one weight, checked."""
    s = np.asarray(sums, dtype=np.float32)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    c = np.asarray(counts, dtype=np.float64).reshape(-1, 1)
    if s.ndim != 2 or c.shape[0] != s.shape[0]:
        raise QuantfixError(f"imatrix entry {name}: sums of shape {np.shape(sums)} need one count per row, "
                            f"got {c.shape[0]}")
    if not np.all(np.isfinite(s)) or (s < 0).any() or (c < 0).any():
        raise QuantfixError(f"imatrix entry {name}: sums of x^2 must be finite and >= 0, counts >= 0")
    return s, c.astype(np.float32)


def write(path: Path, stats: Mapping[str, Stat], datasets: Iterable[str] = ("quantfix",),
          chunk_count: int = 0, chunk_size: int = 0) -> Path:
    """Write the imatrix GGUF: ``stats`` maps a GGUF weight name (``blk.0.attn_q.weight``) to
    (sum of x^2 per input channel [cols] or [n_expert, cols], tokens counted: an int or one per
    expert). ``chunk_count`` / ``chunk_size`` describe the calibration (llama-quantize copies the
    count into the model's ``quantize.imatrix.chunks_count``). Written atomically."""
    import gguf

    if not stats:
        raise QuantfixError("no imatrix statistics to write")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none: general.type says what it is
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", [str(d) for d in datasets])
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name in sorted(stats):
        if not name.endswith(".weight"):
            raise QuantfixError(f"imatrix entries are keyed by GGUF weight names (blk.N.attn_q.weight), got {name!r}")
        s, c = _entry(name, *stats[name])
        w.add_tensor(f"{name}.in_sum2", s)
        w.add_tensor(f"{name}.counts", c)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def read(path: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """A GGUF imatrix (ours or llama-imatrix's): weight name -> (sums [n_mat, cols], counts [n_mat])."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged or legacy .dat file raises many types
        raise QuantfixError(f"{path} is not a GGUF imatrix ({type(e).__name__}: {str(e)[:100]})") from e
    parts: Dict[str, Dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")
        if kind in ("in_sum2", "counts"):
            parts.setdefault(base, {})[kind] = np.array(t.data, dtype=np.float32)
    out = {}
    for name, p in parts.items():
        if "in_sum2" not in p or "counts" not in p:
            raise QuantfixError(f"{path}: {name} has no {'counts' if 'in_sum2' in p else 'in_sum2'}")
        counts = p["counts"].reshape(-1)
        out[name] = (p["in_sum2"].reshape(counts.size, -1), counts)
    return out


def weights(sums: np.ndarray, counts) -> np.ndarray:
    """The per-column importance llama-quantize hands to ggml for one weight: ``sums / count`` in
    float32 per matrix (1 where a matrix has no tokens), flattened like its ``imatrix`` pointer."""
    s = np.asarray(sums, dtype=np.float32)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    c = np.asarray(counts, dtype=np.float32).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(c > 0, s / np.where(c > 0, c, np.float32(1)), np.float32(1)).astype(np.float32)
    return out.reshape(-1)


def gguf_names(hf_modules: Iterable[str], arch: str, n_layers: int) -> Dict[str, str]:
    """HF linear-module name (``model.layers.0.self_attn.q_proj``) -> GGUF weight name
    (``blk.0.attn_q.weight``), by gguf-py's tensor-name map for ``arch`` (``llama``, ``gemma3``...)."""
    import gguf

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise QuantfixError(f"gguf-py knows no architecture {arch!r}")
    tmap = gguf.get_tensor_name_map(archs[arch], n_layers)
    out = {}
    for m in hf_modules:
        name = tmap.get_name(m + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise QuantfixError(f"no GGUF tensor name for {m} in architecture {arch}")
        out[m] = name
    return out


def from_quantfix(stats: Mapping[str, Tuple[np.ndarray, int]], arch: str, n_layers: int,
                  path: Path, datasets: Iterable[str] = ("quantfix",), chunk_size: int = 0,
                  chunk_count: Optional[int] = None) -> Path:
    """Write the imatrix of quantfix's per-module statistics (HF module name -> (sum of x^2 per
    input channel, tokens)), renamed to GGUF tensor names."""
    names = gguf_names(stats, arch, n_layers)
    tokens = max(int(np.max(c)) for _, c in stats.values())
    count = chunk_count if chunk_count is not None else (tokens // chunk_size if chunk_size else 0)
    return write(path, {names[m]: v for m, v in stats.items()}, datasets, count, chunk_size)
