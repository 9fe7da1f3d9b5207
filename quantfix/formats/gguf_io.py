"""GGUF files in and out: a quantized GGUF read against its float parent (every tensor type the
``gguf`` package dequantizes), a GGUF re-quantized to a legacy type (gguf's Python quantizers), and
a repaired plan written as llama.cpp ``llama-quantize --tensor-type`` overrides.

Tensor names and layouts come from transformers' own GGUF loader (``get_gguf_hf_weights_map``
maps ``blk.N.attn_q.weight`` to ``model.layers.N.self_attn.q_proj.weight``; its tensor processors
undo llama.cpp's q/k row permutation), so a GGUF tensor lands on the module the float parent has.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from quantfix.errors import QuantfixError
from quantfix.formats import files
from quantfix.formats.common import External, grid_precision
from quantfix.plan import Plan, Precision

# GGUF type -> (bits, group, symmetric) of the nearest integer grid; "exact" types store
# w = d * (q - offset) with one fp16 d per 32 values, the value of largest magnitude on the grid's
# end (d = -w / 2^(b-1) for Q4_0 / Q5_0, |w| / 127 for Q8_0): read back bit for bit
SCHEMES = {
    "Q4_0": (4, 32, True), "Q4_1": (4, 32, False), "Q5_0": (5, 32, True), "Q5_1": (5, 32, False),
    "Q8_0": (8, 32, True), "Q8_1": (8, 32, True),
    "Q2_K": (2, 16, False), "Q3_K": (3, 16, True), "Q4_K": (4, 32, False), "Q5_K": (5, 32, False),
    "Q6_K": (6, 16, True), "Q8_K": (8, 256, True),
    "IQ4_NL": (4, 32, True), "IQ4_XS": (4, 32, True), "IQ3_XXS": (3, 32, True), "IQ3_S": (3, 32, True),
    "IQ2_XXS": (2, 32, True), "IQ2_XS": (2, 32, True), "IQ2_S": (2, 32, True), "IQ1_S": (2, 32, True),
    "IQ1_M": (2, 32, True), "TQ1_0": (2, 256, True), "TQ2_0": (2, 256, True), "MXFP4": (4, 32, True),
}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# the largest-magnitude value's integer on the grid (signed, compressed-tensors convention)
_END = {"Q4_0": -8, "Q5_0": -16, "Q8_0": 127}
# repaired width -> the llama.cpp type that holds at least that many bits
OVERRIDE_TYPES = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 7: "q8_0", 8: "q8_0"}


def _arch(reader) -> str:
    f = reader.fields.get("general.architecture")
    if f is None:
        raise QuantfixError("the GGUF file has no general.architecture: not a model file")
    try:
        return str(f.contents())
    except Exception as e:  # noqa: BLE001 - a field whose bytes do not decode
        raise QuantfixError(f"the GGUF file's general.architecture cannot be read ({type(e).__name__}): "
                            f"{files.REDOWNLOAD}") from e


def _name_map(model_fp, arch: str) -> Tuple[Dict[str, str], object]:
    """(gguf tensor name -> HF parameter name, transformers' tensor processor for the arch)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    cfg = model_fp.config.get_text_config() if hasattr(model_fp.config, "get_text_config") else model_fp.config
    pcfg = {k: getattr(cfg, k) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size",
                                        "num_hidden_layers") if getattr(cfg, k, None) is not None}
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=pcfg)
    try:
        mapping = get_gguf_hf_weights_map(model_fp, processor)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise QuantfixError(f"GGUF architecture {arch!r}: no tensor-name mapping to {type(model_fp).__name__} "
                            f"({str(e).splitlines()[0][:120]})") from e
    return mapping, processor


def _native(W: torch.Tensor, tname: str, group: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(scale, zero) of the exact legacy types, recovered from the dequantized weight."""
    end = _END.get(tname)
    if end is None:
        return None
    out_f, in_f = W.shape
    Wg = W.float().reshape(out_f, in_f // group, group)
    idx = Wg.abs().argmax(-1, keepdim=True)
    top = torch.gather(Wg, -1, idx)[..., 0]
    s = top.abs() / abs(end) if end > 0 else -top / abs(end)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s, torch.zeros_like(s)


def read(path: str, plan0: Plan, model_fp) -> External:
    from gguf.quants import dequantize

    reader = files.open_gguf(path)
    arch = _arch(reader)
    mapping, processor = _name_map(model_fp, arch)
    modules: Dict[str, Precision] = {}
    weights, qps, types, gnames, notes = {}, {}, {}, {}, []
    seen = set()
    for t in reader.tensors:
        hf = mapping.get(t.name, "")
        hf = hf[:-len(".weight")] if hf.endswith(".weight") else None
        if hf is None or hf not in plan0.modules:
            continue
        seen.add(hf)
        tname = t.tensor_type.name
        gnames[hf], types[hf] = t.name, tname
        if tname in FLOAT_TYPES:
            modules[hf] = Precision(16)
            continue
        if tname not in SCHEMES:
            raise QuantfixError(f"{path}: tensor {t.name} has GGUF type {tname}, which quantfix has no scheme for")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001 - a tensor whose bytes do not match its type and shape
            raise files.damaged(Path(path).expanduser(), e,
                                f"holds tensor {t.name}, which cannot be dequantized") from e
        arr = processor.process(weights=arr, name=t.name, tensor_key_mapping=mapping, parsed_parameters={}).weights
        W = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if tuple(W.shape) != tuple(plan0.shapes[hf]):
            raise QuantfixError(f"{path}: {t.name} has shape {tuple(W.shape)} but the float model's {hf} is "
                                f"{tuple(plan0.shapes[hf])}: model.name_or_path must be this GGUF's float parent")
        bits, group, sym = SCHEMES[tname]
        group = group if plan0.shapes[hf][1] % group == 0 else 0
        prec, qp = grid_precision(W, bits, group, sym, _native(W, tname, group) if group else None)
        modules[hf], weights[hf], qps[hf] = prec, W, qp
    if not seen:
        raise QuantfixError(f"{path}: none of its tensors maps to the float model's planned modules: "
                            "model.name_or_path must be this GGUF's float parent")
    missing = [n for n in plan0.modules if n not in seen]
    if missing:
        raise QuantfixError(f"{path}: no tensor for {len(missing)} planned modules (e.g. {missing[0]}): "
                            "model.name_or_path must be this GGUF's float parent")
    plan = plan0.with_changes(modules, note=f"existing GGUF {Path(path).name}")
    return External(plan, weights, qps, "gguf", types, gguf_names=gnames, notes=notes)


def requantize(src: str, dst: str, qtype: Callable[[str, object], Optional[str]]) -> Path:
    """Copy a GGUF file with the tensors ``qtype(name, tensor)`` names re-quantized to that legacy
    type (gguf's Python quantizers: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; from the dequantized values),
    every other tensor and all metadata as they are. Written atomically."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = files.open_gguf(src)
    tmp = Path(dst).with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=_arch(reader), endianess=reader.endianess)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    out = []
    for t in reader.tensors:
        want = qtype(t.name, t)
        if want is None or want == t.tensor_type.name:
            out.append((t.name, t.data, t.tensor_type))
            continue
        qt = gguf.GGMLQuantizationType[want]
        out.append((t.name, quantize(dequantize(t.data, t.tensor_type).astype(np.float32), qt), qt))
    for name, data, qt in out:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in out:
        writer.write_tensor_data(data)
    writer.close()
    tmp.rename(dst)
    return Path(dst)


def overrides(plan: Plan, ext: External) -> Tuple[Dict[str, str], str]:
    """(GGUF tensor name -> llama.cpp type, the base type) for the modules the repaired plan
    changed: each gets the smallest llama.cpp type holding its repaired width (f16 for float);
    modules still on the checkpoint's own weights keep their type."""
    from collections import Counter

    base = Counter(t for t in ext.source_types.values() if t not in FLOAT_TYPES).most_common(1)
    base_type = base[0][0] if base else "Q8_0"
    out = {}
    for n, p in plan.modules.items():
        if n not in ext.gguf_names or p.alg.external or ext.plan.modules.get(n) == p:
            continue
        want = "f16" if p.is_float else OVERRIDE_TYPES[p.bits]
        if want.upper() != ext.source_types.get(n, "").upper():
            out[ext.gguf_names[n]] = want
    return out, base_type


def write_overrides(plan: Plan, ext: External, out_dir: Path, gguf_path: str, parent: str) -> Path:
    """llama_quantize_overrides.txt in the run dir: one ``tensor=type`` per line, then the full
    imatrix-free llama-quantize command line that applies them."""
    ov, base = overrides(plan, ext)
    args = " ".join(f"--tensor-type {shlex.quote(_regex(name) + '=' + t)}" for name, t in sorted(ov.items(), key=_order))
    stem = Path(gguf_path).stem
    lines = [f"# quantfix repair of {gguf_path} (float parent: {parent})",
             f"# {len(ov)} tensors change type; every other tensor keeps {base} (the file's own types).",
             "# llama-quantize re-rounds these tensors with its own (imatrix-free) rounding, not quantfix's:",
             "# measure the result (llama-perplexity) before shipping it.",
             "# 1) a float GGUF of the parent: python convert_hf_to_gguf.py <parent dir> --outtype f16 "
             f"--outfile {stem}.f16.gguf",
             f"# 2) llama-quantize {args} {stem}.f16.gguf {stem}.repaired.gguf {base}",
             ""]
    lines += [f"{name}={t}" for name, t in sorted(ov.items(), key=_order)]
    path = Path(out_dir) / "llama_quantize_overrides.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _regex(name: str) -> str:
    return "^" + name.replace(".", r"\.") + "$"


def _order(item):
    parts = item[0].split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, item[0])
