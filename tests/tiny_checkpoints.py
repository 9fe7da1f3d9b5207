"""Quantized checkpoints of the tiny Llama, built for real with the formats' own writers (gguf's
quantizer, AutoRound's packer), for the tests that read or repair them; and plan 0 to read them
against."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantfix.quantize import fake, scales
from tests.conftest import save_model_dir, tiny_llama


def plan0(model):
    """Plan 0 of ``model`` at W4g32 (the template a checkpoint is read against)."""
    from quantfix.config import QuantConfig
    from quantfix.planner import initial_plan

    plan, _ = initial_plan(model, QuantConfig(group_size=32), {})
    return plan


def autoround_checkpoint(tmp_path, tokenizer, fmt: str, sym: bool, bits: int = 4, group: int = 32):
    """A checkpoint AutoRound writes of the tiny Llama (``fmt``: auto_gptq, auto_awq; iters=0: its RTN)."""
    pytest.importorskip("auto_round")
    from auto_round import AutoRound

    model = tiny_llama()
    ar = AutoRound(model, tokenizer, bits=bits, group_size=group, sym=sym, iters=0, nsamples=2, seqlen=32,
                   dataset=["The quick brown fox jumps over the lazy dog. " * 8] * 4)
    out = tmp_path / f"{fmt}_{bits}_{group}_{sym}"
    ar.quantize_and_save(str(out), format=fmt)
    (sub,) = [p for p in out.iterdir() if p.is_dir()]  # AutoRound writes into out/w{bits}g{group}
    return sub


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row permutation."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path, types):
    """A GGUF file of the tiny Llama's decoder linears (llama.cpp names and q/k layout), each
    quantized to types[kind] with gguf's own quantizer."""
    import gguf
    from gguf.quants import quantize
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    cfg = model.config
    mapping = {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor()).items()}
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    for name, mod in model.named_modules():
        if not name.endswith("proj"):
            continue
        arr = mod.weight.detach().float().numpy()
        if name.endswith("q_proj"):
            arr = gguf_permute(arr, cfg.num_attention_heads)
        elif name.endswith("k_proj"):
            arr = gguf_permute(arr, cfg.num_key_value_heads)
        qt = gguf.GGMLQuantizationType[types[name.rsplit(".", 1)[-1]]]
        data = arr if qt == gguf.GGMLQuantizationType.F32 else quantize(arr, qt)
        w.add_tensor(mapping[name + ".weight"], data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GGUF_TYPES = {"q_proj": "Q4_0", "k_proj": "Q8_0", "v_proj": "Q5_0", "o_proj": "Q4_1", "gate_proj": "Q4_0",
              "up_proj": "Q5_1", "down_proj": "F32"}


def gptq_checkpoint(model, tokenizer, path: Path, bits: int = 4, group: int = 32, shards: int = 1) -> Path:
    """A GPTQ-format checkpoint of ``model`` (round-to-nearest on the GPTQ grid), packed by AutoRound's
    own QuantLinear (v1 zero points, as AutoGPTQ writes them); ``shards`` > 1 splits the tensors
    over that many files with an index, as the hub stores large models."""
    qlin = pytest.importorskip("auto_round_extension.torch.qlinear_torch_zp")
    from safetensors.torch import save_file

    save_model_dir(model, tokenizer, path)
    (path / "model.safetensors").unlink()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in plan0(model).modules:
        W = sd.pop(f"{name}.weight").float()
        out_f, in_f = W.shape
        s, z = fake.qparams(W, bits, group, True)
        s = s.half().float()
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = scales.quantize_with(W, s, z, bits, group)
        ql = qlin.QuantLinear(bits, group, in_f, out_f, bias=False, g_idx=True)
        ql.pack(lin, s, (z + 2 ** (bits - 1)).round().to(torch.int32))
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            sd[f"{name}.{k}"] = getattr(ql, k).contiguous()
    keys = sorted(sd)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else \
        ["model.safetensors"]
    weight_map = {k: files[i * shards // len(keys)] for i, k in enumerate(keys)}
    for f in files:
        save_file({k: sd[k] for k in keys if weight_map[k] == f}, str(path / f), metadata={"format": "pt"})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": True,
                                  "desc_act": False, "checkpoint_format": "gptq"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path
