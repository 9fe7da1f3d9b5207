"""ggml's own quantizers through ctypes, so quantfix computes exactly the bytes ``llama-quantize``
writes for a tensor (with or without an importance matrix), and llama.cpp's per-type rules.

``llama-quantize`` converts every row with ``ggml_quantize_chunk`` from ``libggml-base.so``; here the
very same library of the pinned build (``tools.find``) is called on the same float32 values, so
the bytes are identical (tested against llama-quantize's output for Q2_K..Q8_0 and IQ4_NL).
Rows are quantized independently, so the chunking llama-quantize's threads use changes nothing.

The tables below are this llama.cpp version's (build 11434, ggml 0.26.0): ``ggml.h``'s type ids,
``ggml.c``'s block sizes and bytes per block, and ``src/llama-quant.cpp``'s fallback for rows whose
length is not a multiple of the block (``tensor_type_fallback``) and its imatrix requirement.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from quantfix.errors import QuantfixError

# ggml.h enum ggml_type (GGML_TYPE_COUNT = 43); the install's manifest holds the same table
TYPE_IDS: Dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15, "IQ2_XXS": 16,
    "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23,
    "I8": 24, "I16": 25, "I32": 26, "I64": 27, "F64": 28, "IQ1_M": 29, "BF16": 30, "TQ1_0": 34,
    "TQ2_0": 35, "MXFP4": 39, "NVFP4": 40, "Q1_0": 41, "Q2_0": 42,
}
# type -> (values per block, bytes per block), ggml.c type_traits / ggml-common.h static_asserts
BLOCKS: Dict[str, Tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "F64": (1, 8),
    "Q1_0": (128, 18), "Q2_0": (64, 18), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
    "Q5_1": (32, 24), "Q8_0": (32, 34), "Q8_1": (32, 36), "MXFP4": (32, 17), "NVFP4": (64, 36),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "Q8_K": (256, 292), "TQ1_0": (256, 54), "TQ2_0": (256, 66),
    "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82),
    "IQ3_XXS": (256, 98), "IQ3_S": (256, 110), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# llama-quant.cpp tensor_type_fallback: the type a row length that is not a multiple of the block
# gets; when the fallback's block does not divide it either, F16. 32-blocks have no fallback.
FALLBACK: Dict[str, str] = {
    **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")},
    **{t: "Q4_0" for t in ("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0")},
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}
# llama-quant.cpp tensor_requires_imatrix (token_embd / output excepted; Q2_K only in a Q2_K_S file)
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")
# what ggml_quantize_chunk writes (its switch: every other type aborts the process)
QUANTIZABLE = tuple(t for t in BLOCKS if t not in ("F64", "Q8_1", "Q8_K"))
# ggml_quantize_requires_imatrix: ggml_quantize_chunk aborts the process without one
GGML_NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ1_S")


def type_name(name: str) -> str:
    """The canonical (gguf-py) spelling of a ggml type: ``q4_k`` / ``Q4_K`` -> ``Q4_K``."""
    t = str(name).upper()
    if t not in BLOCKS:
        raise QuantfixError(f"unknown ggml type {name!r}: one of {', '.join(sorted(BLOCKS))}")
    return t


def bits_per_weight(name: str) -> float:
    """Bits per weight as llama.cpp stores the type: bytes per block * 8 / values per block
    (Q4_K 4.5, Q6_K 6.5625, Q2_K 2.625, Q8_0 8.5, F16 16)."""
    block, nbytes = BLOCKS[type_name(name)]
    return nbytes * 8 / block


def row_bytes(name: str, n_per_row: int) -> int:
    block, nbytes = BLOCKS[type_name(name)]
    if n_per_row % block:
        raise QuantfixError(f"a row of {n_per_row} values is not a whole number of {name} blocks of {block}")
    return n_per_row // block * nbytes


def effective_type(name: str, n_per_row: int) -> str:
    """The type llama-quantize actually writes when asked for ``name`` on rows of ``n_per_row``
    values (``tensor_type_fallback``: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0,
    IQ* 256-block types -> IQ4_NL; F16 when even the fallback's block does not divide the row).
    It applies to every quantized target, --tensor-type overrides included. Measured with
    llama-quantize Q4_K_M: SmolLM2-135M (hidden 576) gets Q5_0 for attn_q/k/output and ffn_gate/up,
    Q8_0 or Q5_0 for attn_v, Q6_K / Q4_K only for ffn_down (1536 = 6 x 256); Gemma-3-270M's shapes
    (hidden 640) keep K-quants only in attn_output (1024) and ffn_down (2048)."""
    t = type_name(name)
    block = BLOCKS[t][0]
    if t in FLOAT_TYPES or n_per_row % block == 0:
        return t
    if t in FALLBACK:
        t = FALLBACK[t]
    elif block > 32:
        raise QuantfixError(f"llama-quantize has no fallback for {t} on rows of {n_per_row} (not a multiple "
                            f"of {block}): choose another type for this tensor")
    return t if n_per_row % BLOCKS[t][0] == 0 else "F16"


def requires_imatrix(name: str, tensor: str = "") -> bool:
    """Whether llama-quantize refuses this target type without an importance matrix."""
    if tensor in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return type_name(name) in NEEDS_IMATRIX


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@functools.lru_cache(maxsize=4)
def library(cache: Optional[Path] = None) -> ctypes.CDLL:
    """libggml-base of the pinned build, with the prototypes quantfix calls."""
    from quantfix.llamacpp.tools import find

    lib = ctypes.CDLL(str(find("libggml-base.so", cache)))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    return lib


def traits(name: str, cache: Optional[Path] = None) -> Dict:
    """The library's own traits of a type (name, block size, bytes per block, quantized)."""
    tr = library(cache).ggml_get_type_traits(TYPE_IDS[type_name(name)]).contents
    return {"name": tr.type_name.decode(), "block": tr.blck_size, "bytes": tr.type_size,
            "quantized": bool(tr.is_quantized)}


def _matrix(W: np.ndarray) -> np.ndarray:
    W = np.ascontiguousarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise QuantfixError(f"quantize expects a 2-D [rows, cols] matrix, got shape {W.shape}")
    return W


def quantize(name: str, W: np.ndarray, imatrix: Optional[np.ndarray] = None, cache: Optional[Path] = None) -> bytes:
    """``ggml_quantize_chunk(type, W, ...)``: the bytes of ``W`` [rows, cols] (float32; rows of
    ``cols`` values) in ``name`` exactly as llama-quantize computes them. ``imatrix`` [cols] is the
    per-column importance llama-quantize passes (the imatrix file's sums / counts: see
    ``imatrix.weights``). No fallback here: ``name`` must fit the rows (see ``effective_type``)."""
    t, W = type_name(name), _matrix(W)
    if t not in QUANTIZABLE:
        raise QuantfixError(f"ggml_quantize_chunk does not write {t}")
    rows, cols = W.shape
    size = rows * row_bytes(t, cols)
    if t in GGML_NEEDS_IMATRIX and imatrix is None:
        raise QuantfixError(f"ggml cannot quantize to {t} without an importance matrix")
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (cols,):
            raise QuantfixError(f"imatrix has shape {imat.shape}, the matrix has {cols} columns")
    out = ctypes.create_string_buffer(size)
    got = library(cache).ggml_quantize_chunk(TYPE_IDS[t], W.ctypes.data, out, 0, rows, cols,
                                             None if imat is None else imat.ctypes.data)
    assert got == size, f"ggml_quantize_chunk wrote {got} bytes for {t} {W.shape}, expected {size}"
    return out.raw


def dequantize(name: str, data: bytes, shape: Tuple[int, int], cache: Optional[Path] = None) -> np.ndarray:
    """The float32 [rows, cols] values ggml reads back from ``data`` (its type traits' to_float)."""
    t = type_name(name)
    rows, cols = shape
    if len(data) != rows * row_bytes(t, cols):
        raise QuantfixError(f"{len(data)} bytes are not a {t} matrix of shape {tuple(shape)}")
    if t == "F32":
        return np.frombuffer(data, dtype=np.float32).reshape(rows, cols).copy()
    fn = library(cache).ggml_get_type_traits(TYPE_IDS[t]).contents.to_float
    if not fn:
        raise QuantfixError(f"ggml has no dequantization for {t}")
    out = np.empty((rows, cols), dtype=np.float32)
    src = ctypes.create_string_buffer(bytes(data), len(data))
    _TO_FLOAT(fn)(ctypes.addressof(src), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * cols)
    return out


def roundtrip(name: str, W: np.ndarray, imatrix: Optional[np.ndarray] = None, cache: Optional[Path] = None) -> np.ndarray:
    """``W`` as llama.cpp computes with it after quantizing to ``name``: quantize, then dequantize."""
    W = _matrix(W)
    return dequantize(name, quantize(name, W, imatrix, cache), W.shape, cache)


def simulate(name: str, W: np.ndarray, imatrix: Optional[np.ndarray] = None,
             cache: Optional[Path] = None) -> Tuple[str, bytes]:
    """(type written, bytes) of what llama-quantize writes for a tensor ``W`` (its stored values as
    float32) asked to be ``name``: the fallback type for the row length, then its bytes."""
    W = _matrix(W)
    t = effective_type(name, W.shape[1])
    return t, quantize(t, W, imatrix, cache)
