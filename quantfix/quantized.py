"""An existing quantized checkpoint as a Plan plus its dequantized weights, for mode=diagnose."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Tuple

import torch

from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision


def _matches(target: str, name: str, module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


@torch.no_grad()
def _dense_weight(mod, shape, name: str, path: str) -> torch.Tensor:
    """The effective float weight of a loaded (possibly still packed) linear module: its output on
    the identity matrix, minus the bias, transposed. Works whatever the kernel stores."""
    if mod is None:
        raise QuantfixError(f"{path}: no module {name}; is this a checkpoint of the same model?")
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return w.detach().to("cpu", torch.float32).clone()
    out_f, in_f = shape
    y = mod(torch.eye(in_f, dtype=torch.float32))
    bias = getattr(mod, "bias", None)
    if isinstance(bias, torch.Tensor):
        y = y - bias.float()
    if tuple(y.shape) != (in_f, out_f):
        raise QuantfixError(f"{path}: {name} has shape {tuple(y.shape)}, expected {(in_f, out_f)}")
    return y.T.contiguous()


def load_quantized(path: str, plan0: Plan, model_fp) -> Tuple[Plan, Dict[str, torch.Tensor]]:
    """Read a compressed-tensors checkpoint: its plan (from config_groups/ignore) and the dense
    weights transformers decompresses it to."""
    from transformers import AutoModelForCausalLM

    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise QuantfixError(f"quantized checkpoint not found: {path} (no config.json); check quantized.name_or_path")
    qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise QuantfixError(f"{path}: quant_method={qc.get('quant_method')!r}; quantfix diagnoses compressed-tensors "
                            "checkpoints (llm-compressor output); export others with llm-compressor first")
    mods = dict(model_fp.named_modules())
    ignore = qc.get("ignore") or []
    modules: Dict[str, Precision] = {}
    for name in plan0.modules:
        prec = Precision(16)
        if not any(_matches(t, name, mods[name]) for t in ignore):
            for group in (qc.get("config_groups") or {}).values():
                if any(_matches(t, name, mods[name]) for t in group.get("targets", [])):
                    w = group.get("weights") or {}
                    if w.get("type", "int") != "int":
                        raise QuantfixError(f"{path}: {name} uses {w.get('type')} weights; only int weights are supported")
                    prec = Precision(int(w["num_bits"]), int(w.get("group_size") or 0), bool(w.get("symmetric", True)), "rtn")
                    break
        modules[name] = prec
    qmodel = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # compressed-tensors decompresses packed weights on the first forward
        qmodel(input_ids=torch.zeros(1, 1, dtype=torch.long))
    qmods = dict(qmodel.named_modules())
    weights = {}
    for name, p in modules.items():
        if p.is_float:
            continue
        weights[name] = _dense_weight(qmods.get(name), plan0.shapes[name], name, path)
    del qmodel
    plan = plan0.with_changes(modules, note=f"existing checkpoint {path}")
    return plan, weights
