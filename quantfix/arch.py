"""The model's own structure, whatever its family: decoder blocks, quantizable modules and their roles.

- Decoder blocks come from transformers' own description of the model: ``get_decoder()`` and the
  block class named in ``_no_split_modules`` (``model.layers`` of Llama, ``transformer.h`` of GPT-2,
  ``gpt_neox.layers``, ``model.decoder.layers`` of OPT, ...), not from one attribute path.
- Quantizable modules are the matmuls inside those blocks. Two layouts are rewritten once, when
  the float model is loaded, into plain ``nn.Linear`` modules, so that every stage (calibration,
  simulation, GPTQ, sensitivity, export) sees one kind of module:
  MoE experts (3-D parameters in transformers 5) through llm-compressor's own ``linearize_moe``
  (the per-expert layout its ``oneshot`` quantizes and transformers' MoE loader maps back), and
  GPT-2's ``Conv1D`` (weight stored [in, out]) as ``nn.Linear`` with the weight transposed.
- Roles (attention in/out, MLP in/out, expert in/out, router) come from where a module sits and
  what it is called in the common families; the diagnosis reasons about roles, not names.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Optional

import torch

from quantfix.errors import QuantfixError

log = logging.getLogger(__name__)

ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT = "attn_in", "attn_out", "mlp_in", "mlp_out"
EXPERT_IN, EXPERT_OUT, ROUTER, OTHER = "expert_in", "expert_out", "router", "other"
# roles whose input is the (normed) residual stream: a channel outlier there is a residual-stream channel
RESIDUAL_ROLES = frozenset({ATTN_IN, MLP_IN, EXPERT_IN})
ATTENTION_ROLES = frozenset({ATTN_IN, ATTN_OUT})

_ATTN_PARENTS = {"self_attn", "attn", "attention", "self_attention", "mixer"}
_ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "wqkv", "query", "key", "value",
            "q", "k", "v", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}
_ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "o", "wo", "proj"}
_MLP_IN = {"gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "dense_h_to_4h", "w1", "w3", "fc_in", "wi",
           "wi_0", "wi_1"}
_MLP_OUT = {"down_proj", "fc2", "dense_4h_to_h", "w2", "fc_out", "c_proj", "wo"}
_ROUTERS = {"gate", "router", "shared_expert_gate", "classifier"}


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks, in order: the ModuleList (under ``get_decoder()``) whose entries are of
    the block class the model names in ``_no_split_modules``; else the longest ModuleList of
    identical modules there."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(base, torch.nn.Module):
        base = model
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    lists = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    named = [m for m in lists if all(type(x).__name__ in block_names for x in m)]
    same = [m for m in lists if len({type(x) for x in m}) == 1]
    pick = max(named or same, key=len, default=None)
    if pick is None:
        raise QuantfixError(f"{type(model).__name__}: no list of decoder blocks found (get_decoder() has no "
                            "ModuleList of the blocks named in _no_split_modules): this architecture is not supported")
    return pick


def layer_prefixes(model) -> Dict[int, str]:
    """Layer index -> qualified module name of that block (``transformer.h.3``)."""
    ids = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
    return {ids[id(m)]: n for n, m in model.named_modules() if id(m) in ids}


def layer_index(name: str) -> Optional[int]:
    """The decoder block a module belongs to: the first numeric component of its qualified name
    (``model.layers.3.…``, ``transformer.h.3.…``, ``model.decoder.layers.3.…``); None outside blocks."""
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def is_expert(name: str) -> bool:
    return re.search(r"\.experts\.\d+\.", name) is not None


def module_type(name: str) -> str:
    """The kind of module across layers (and experts): ``q_proj``, ``c_attn``, ``experts.down_proj``."""
    leaf = name.rsplit(".", 1)[-1]
    return f"experts.{leaf}" if is_expert(name) else leaf


def module_role(name: str) -> str:
    """attn_in / attn_out / mlp_in / mlp_out / expert_in / expert_out / router / other."""
    parts = name.split(".")
    leaf = parts[-1].lower()
    parents = {p.lower() for p in parts[:-1]}
    if leaf in _ROUTERS or (leaf.endswith("_gate") and "shared_expert" in leaf):
        return ROUTER
    if is_expert(name):
        if leaf in _MLP_IN:
            return EXPERT_IN
        if leaf in _MLP_OUT:
            return EXPERT_OUT
        return OTHER
    in_attn = bool(parents & _ATTN_PARENTS)
    if in_attn and leaf in _ATTN_IN:
        return ATTN_IN
    if in_attn and leaf in _ATTN_OUT:
        return ATTN_OUT
    if leaf in _MLP_IN:
        return MLP_IN
    if leaf in _MLP_OUT:
        return MLP_OUT
    if leaf in _ATTN_IN:
        return ATTN_IN
    if leaf in _ATTN_OUT:
        return ATTN_OUT
    return OTHER


def is_router(module: torch.nn.Module, name: str) -> bool:
    """A router picks experts: a gate by name, or a linear map to the number of experts / to one
    logit (Qwen2-MoE's shared_expert_gate); quantizing it changes which experts run."""
    if module_role(name) == ROUTER:
        return True
    out = getattr(module, "out_features", None)
    return out == 1


# ---- one module kind for every stage ---------------------------------------------------------------

def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None


@torch.no_grad()
def linearize(model) -> Dict[str, int]:
    """Rewrite MoE experts (3-D parameters) and GPT-2 ``Conv1D`` modules as ``nn.Linear`` in place,
    with identical outputs; returns what was rewritten ({"experts": n blocks, "conv1d": n})."""
    done = {"experts": 0, "conv1d": 0}
    conv = _conv1d_type()
    if conv is not None:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, conv):
                w = mod.weight  # [in, out]
                if w.device.type == "meta":
                    raise QuantfixError(f"{name} (Conv1D) is offloaded by the device map: quantfix rewrites Conv1D "
                                        "as nn.Linear at load, which needs its weights in memory; load the model "
                                        "without CPU/disk offload (model.device_map=null or enough max_memory)")
                lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
                lin.weight.copy_(w.t())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
                lin.requires_grad_(False)
                lin.quantfix_conv1d = True
                model.set_submodule(name, lin)
                done["conv1d"] += 1
    has_3d = any(p.ndim == 3 for p in model.parameters())
    if has_3d:
        try:
            from llmcompressor.modeling.moe.linearize import get_non_linearized_moes, linearize_moe
        except ImportError as e:  # pragma: no cover - llm-compressor is a dependency
            raise QuantfixError(f"{type(model).__name__} stores MoE experts as 3-D parameters and llm-compressor's "
                                f"linearize_moe is not importable ({e}): install llmcompressor>=0.14") from e
        moes = get_non_linearized_moes(model)
        if moes and any(p.device.type == "meta" for _, m in moes for p in m.parameters()):
            raise QuantfixError(f"{type(model).__name__}: MoE experts offloaded by the device map cannot be rewritten "
                                "as linear modules (llm-compressor's linearize_moe needs their weights in memory); load "
                                "the model without CPU/disk offload (model.device_map=null or enough max_memory)")
        if moes:
            try:
                linearize_moe(model)
            except Exception as e:
                raise QuantfixError(f"{type(model).__name__}: llm-compressor cannot rewrite its MoE experts as linear "
                                    f"modules ({str(e).splitlines()[0][:160]}): this MoE layout is not supported") from e
            log.info("MoE: %d expert blocks rewritten as per-expert linear modules", len(moes))
            done["experts"] = len(moes)
        left = [n for n, p in model.named_parameters() if p.ndim == 3]
        if left:
            raise QuantfixError(f"{type(model).__name__}: {left[0]} is a 3-D parameter that llm-compressor does not "
                                "linearize: this MoE layout is not supported")
        model.requires_grad_(False)
    return done


def quantizable(model) -> Dict[str, torch.nn.Module]:
    """name -> nn.Linear of every matmul inside the decoder blocks, routers left out (in order)."""
    prefixes = layer_prefixes(model)
    out: Dict[str, torch.nn.Module] = {}
    for _, prefix in sorted(prefixes.items()):
        block = model.get_submodule(prefix)
        for n, m in block.named_modules():
            full = f"{prefix}.{n}" if n else prefix
            if isinstance(m, torch.nn.Linear) and not is_router(m, full):
                out[full] = m
    return out


# model types whose compressed-tensors checkpoint transformers (5.17) cannot load back correctly
NOT_RELOADABLE = {
    "falcon": "transformers cannot reload a compressed-tensors Falcon checkpoint: FalconLinear is not nn.Linear, so "
              "llm-compressor writes it unpacked (\"dense\": the float weights, which reload as the float model), and "
              "written packed, FalconPreTrainedModel._init_weights reads the .weight that packed modules no longer have",
}


def export_blocker(model) -> Optional[str]:
    """Why this model's quantized checkpoint could not be written or reloaded correctly, or None."""
    conv1d = conv1d_modules(model)
    if conv1d:
        return (f"{type(model).__name__} computes with transformers' Conv1D ({conv1d[0]}, weight stored [in, out]): "
                "compressed-tensors quantizes nn.Linear only, so its checkpoint would not reload in transformers")
    return NOT_RELOADABLE.get(getattr(model.config, "model_type", ""))


def conv1d_modules(model) -> List[str]:
    return [n for n, m in model.named_modules() if getattr(m, "quantfix_conv1d", False)]
