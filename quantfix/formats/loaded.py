"""Checkpoints transformers loads itself: compressed-tensors (llm-compressor) and bitsandbytes
(int8 / nf4 / fp4). The dense weights are what the loaded modules compute with; the scheme comes
from the quantization config (compressed-tensors: its stored scales and zero points, so a
checkpoint quantfix wrote reads back as the exact grid)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Tuple

import torch

from quantfix.errors import QuantfixError
from quantfix.formats import files
from quantfix.formats.common import External, check_group, grid_precision
from quantfix.plan import Plan, Precision


def _matches(target: str, name: str, module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


@torch.no_grad()
def dense_weight(mod, shape, name: str, path: str) -> torch.Tensor:
    """The effective float weight of a loaded (possibly still packed) linear module: its output on
    the identity matrix, minus the bias, transposed. Works whatever the kernel stores."""
    if mod is None:
        raise QuantfixError(f"{path}: no module {name}; is this a checkpoint of the same model?")
    w = getattr(mod, "weight", None)
    if type(mod).__name__ == "Linear8bitLt" and getattr(w, "SCB", None) is not None:  # LLM.int8: q * absmax / 127
        return (w.data.float() * w.SCB.float()[:, None] / 127).reshape(shape).contiguous()
    if type(mod).__name__ == "Linear4bit" and getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf  # the library's own NF4 / FP4 dequantizer

        return bnbf.dequantize_4bit(w.data, w.quant_state).float().reshape(shape).contiguous()
    if isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            and type(w).__name__ == "Parameter" and tuple(w.shape) == tuple(shape):
        return w.detach().to("cpu", torch.float32).clone()
    out_f, in_f = shape
    x = torch.eye(in_f, dtype=torch.float32)
    try:
        y = mod(x)
    except RuntimeError:  # kernels that compute in 16 bits
        y = mod(x.to(torch.float16)).float()
    bias = getattr(mod, "bias", None)
    if isinstance(bias, torch.Tensor):
        y = y - bias.float()
    if tuple(y.shape) != (in_f, out_f):
        raise QuantfixError(f"{path}: {name} has shape {tuple(y.shape)}, expected {(in_f, out_f)}")
    return y.T.contiguous().float()


def _stored(root: Path, names) -> Dict[str, torch.Tensor]:
    return files.read_tensors(root, lambda k: k.endswith((".weight_scale", ".weight_zero_point")) and
                              k.rsplit(".", 1)[0] in names)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def _load(path: str, decompress: bool = False, **kw):
    """The checkpoint loaded by transformers; a damaged file, a tensor its files lack (transformers
    would initialize it at random) or packed weights that do not decompress: one line."""
    from transformers import AutoModelForCausalLM

    files.safetensors_files(Path(path).expanduser())  # a damaged file is named before transformers reads it
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    except Exception as e:  # noqa: BLE001 - loaders raise many types; one line names it
        raise QuantfixError(f"could not load the quantized checkpoint {path} ({_first_line(e)})") from e
    lost = list(info.get("missing_keys") or []) + [k[0] if isinstance(k, tuple) else k
                                                    for k in info.get("mismatched_keys") or []]
    if lost:
        raise QuantfixError(f"{path}: {len(lost)} tensors are missing from its files or of the wrong shape (e.g. "
                            f"{sorted(lost)[0]}): the checkpoint is incomplete; {files.REDOWNLOAD}")
    if decompress:  # compressed-tensors decompresses packed weights on the first forward
        try:
            with torch.no_grad():
                model(input_ids=torch.zeros(1, 1, dtype=torch.long))
        except Exception as e:  # noqa: BLE001 - packed tensors whose stored shapes or values do not fit
            raise QuantfixError(f"the packed weights of {path} do not decompress ({_first_line(e)}): the checkpoint "
                                f"is damaged; {files.REDOWNLOAD}") from e
    return model


def _ct_schemes(qc: dict, plan0: Plan, mods: dict, path: str) -> Dict[str, Precision]:
    """compressed-tensors: each planned module's scheme from the config groups (float if ignored)."""
    ignore = qc.get("ignore") or []
    schemes = {}
    for name in plan0.modules:
        prec = Precision(16)
        if not any(_matches(t, name, mods[name]) for t in ignore):
            for group in (qc.get("config_groups") or {}).values():
                if any(_matches(t, name, mods[name]) for t in group.get("targets", [])):
                    w = group.get("weights") or {}
                    if w.get("type", "int") != "int":
                        raise QuantfixError(f"{path}: {name} uses {w.get('type')} weights; only int weights are "
                                            "supported")
                    g = check_group(int(w.get("group_size") or 0), plan0.shapes[name][1], name, path)
                    prec = Precision(int(w["num_bits"]), g, bool(w.get("symmetric", True)), "rtn")
                    break
        schemes[name] = prec
    return schemes


def _bnb_schemes(qc: dict, plan0: Plan, qmodel) -> Tuple[Dict[str, Precision], str]:
    """bitsandbytes: (each planned module's scheme as loaded, the kind: int8 / nf4 / fp4)."""
    four = bool(qc.get("load_in_4bit")) or "4bit" in str(qc.get("_load_in_4bit", ""))
    kind = str(qc.get("bnb_4bit_quant_type") or "nf4") if four else "int8"
    skip = qc.get("llm_int8_skip_modules") or []
    qmods = dict(qmodel.named_modules())
    schemes = {}
    for name in plan0.modules:
        qm = qmods.get(name)
        quantized = qm is not None and type(qm).__name__ in ("Linear8bitLt", "Linear4bit") and \
            not any(s in name for s in skip)
        # int8: one absmax scale per row; nf4 / fp4: 64-value blocks on a non-uniform grid
        block = getattr(getattr(getattr(qm, "weight", None), "quant_state", None), "blocksize", 64)
        schemes[name] = (Precision(4, block if plan0.shapes[name][1] % block == 0 else 0, True, "rtn") if four
                         else Precision(8, 0, True, "rtn")) if quantized else Precision(16)
    return schemes, kind


def read(path: str, plan0: Plan, model_fp, fmt: str) -> External:
    root = Path(path).expanduser()
    qc = files.quantization_config(root)
    if fmt == "compressed-tensors":
        schemes = _ct_schemes(qc, plan0, dict(model_fp.named_modules()), path)
        types = {n: f"compressed-tensors {p.label}" for n, p in schemes.items() if not p.is_float}
        qmodel = _load(path, decompress=True, dtype=torch.float32)
    else:  # bitsandbytes
        qmodel = _load(path, dtype=torch.float32, device_map="cpu")
        schemes, kind = _bnb_schemes(qc, plan0, qmodel)
        types = {n: f"bitsandbytes {kind}" for n, p in schemes.items() if not p.is_float}
    qmods = dict(qmodel.named_modules())
    stored = _stored(root, set(schemes)) if fmt == "compressed-tensors" else {}
    modules, weights, qps = {}, {}, {}
    for name, p in schemes.items():
        if p.is_float:
            modules[name] = p
            continue
        out_f, in_f = plan0.shapes[name]
        W = dense_weight(qmods.get(name), plan0.shapes[name], name, path)
        native = None
        if f"{name}.weight_scale" in stored:
            s = stored[f"{name}.weight_scale"].float().reshape(out_f, -1)
            z = stored.get(f"{name}.weight_zero_point")
            z = torch.zeros_like(s) if z is None else z.float().reshape(out_f, -1)
            native = (s, z)
        elif fmt == "bitsandbytes" and p.bits == 8:  # LLM.int8: W = q * absmax / 127 per row
            s = W.abs().amax(1, keepdim=True) / 127
            native = (torch.where(s == 0, torch.ones_like(s), s), torch.zeros_like(s))
        modules[name], qps[name] = grid_precision(W, p.bits, p.group_size, p.symmetric, native)
        weights[name] = W
    from quantfix.formats import parent

    note = parent.smoothing_note({k: v.detach() for k, v in qmodel.state_dict().items() if v.dim() == 1}, model_fp)
    del qmodel
    plan = plan0.with_changes(modules, note=f"existing {fmt} checkpoint {path}")
    return External(plan, weights, qps, fmt, types, notes=[note] if note else [])
