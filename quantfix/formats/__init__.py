"""Existing quantized checkpoints in: one entry point, ``read``, for every format quantfix takes as
``quantized.name_or_path``.

Each reader returns an ``External``: plan 0 (every module's scheme as the checkpoint stores it:
bits, group, symmetry, in a ``ckpt`` / ``ckpt_approx`` precision) and, per quantized module, the
dequantized weight and the integer-grid scale / zero point that reproduce it in compressed-tensors
(``ckpt``: bit for bit; ``ckpt_approx``: the format's grid is not an integer one, e.g. a float
minimum (Q4_1, K-quants), a non-uniform grid (NF4, i-quants) or act-order groups: the export
re-rounds those weights to the nearest integer grid and says so).

Formats: compressed-tensors (llm-compressor), GPTQ (AutoGPTQ / GPTQModel / AutoRound), AWQ
(AutoAWQ / AutoRound, GEMM layout), bitsandbytes (int8 / nf4 / fp4) and GGUF files (every type
gguf dequantizes) read against their float parent.
"""
from __future__ import annotations

from pathlib import Path

import torch

from quantfix.errors import QuantfixError
from quantfix.formats.common import CKPT, CKPT_APPROX, External, check_group, grid_precision  # noqa: F401
from quantfix.plan import Plan


def detect(path: str) -> str:
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise QuantfixError(f"GGUF file not found: {p}; check quantized.name_or_path")
        return "gguf"
    cfg = p / "config.json"
    if not cfg.exists():
        raise QuantfixError(f"quantized checkpoint not found: {path} (no config.json, not a .gguf file); check "
                            "quantized.name_or_path")
    from quantfix.formats.files import quantization_config

    qc = quantization_config(p)
    method = str(qc.get("quant_method") or "").lower()
    if not method and (p / "quantize_config.json").exists():  # AutoGPTQ's own file, older checkpoints
        method = "gptq"
    if method in ("gptq", "awq", "compressed-tensors", "bitsandbytes"):
        return method
    if method == "auto-round":
        packing = str(qc.get("packing_format") or "")
        if "gptq" in packing:
            return "gptq"
        if "awq" in packing:
            return "awq"
    raise QuantfixError(f"{path}: quant_method={method or None!r} is not a format quantfix reads; it reads "
                        "compressed-tensors, gptq, awq, bitsandbytes and .gguf files")


def read(path: str, plan0: Plan, model_fp, gguf_parent_ok: bool = True) -> External:
    """The checkpoint at ``path`` as plan 0 plus its dequantized weights (module names and shapes
    those of the float parent ``model_fp``, whose planned modules ``plan0`` lists). Refused in one
    line when a file is damaged (``files``) or a module's weight is not a quantization of the float
    parent's (``parent``: a checkpoint of another model of the same shapes)."""
    fmt = detect(path)
    if fmt == "gguf":
        from quantfix.formats import gguf_io

        ext = gguf_io.read(path, plan0, model_fp)
    elif fmt in ("gptq", "awq"):
        from quantfix.formats import packed

        ext = packed.read(path, plan0, fmt, model_fp)
    else:
        from quantfix.formats import loaded

        ext = loaded.read(path, plan0, model_fp, fmt)
    for name, w in ext.weights.items():
        if tuple(w.shape) != tuple(plan0.shapes[name]):
            raise QuantfixError(f"{path}: {name} has shape {tuple(w.shape)} but the float model's is "
                                f"{tuple(plan0.shapes[name])}: model.name_or_path must be this checkpoint's float parent")
        if not torch.isfinite(w).all():
            raise QuantfixError(f"{path}: the dequantized weight of {name} holds NaN/Inf: the checkpoint is damaged")
    from quantfix.formats import parent

    agree = parent.check(path, ext.weights, model_fp)
    ext.parent_agreement = min(agree.values()) if agree else None
    return ext
