"""Repack a compressed-tensors int checkpoint (e.g. quantfix's or llm-compressor's GPTQ export) into
the GPTQ format AutoGPTQ / GPTQModel / AutoRound write, with AutoRound's own packer
(auto_round_extension QuantLinear.pack, v1 zero points): a real GPTQ-format checkpoint of a known
calibration, to diagnose and repair with ``quantized.name_or_path``.

    PYTHONPATH=. python scripts/to_gptq_format.py <compressed-tensors dir> <float parent dir> <out dir>
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch


def main(src: str, parent: str, out: str) -> None:
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from quantfix import formats
    from quantfix.config import QuantConfig
    from quantfix.planner import initial_plan

    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    plan0, _ = initial_plan(model, QuantConfig(), {})
    ext = formats.read(src, plan0, model)
    schemes = {(p.bits, p.group_size, p.symmetric) for n, p in ext.plan.modules.items() if n in ext.weights}
    if len(schemes) != 1:
        raise SystemExit(f"GPTQ format holds one scheme per checkpoint; {src} has {sorted(schemes)}")
    ((bits, group, sym),) = schemes
    sd = {k: v for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: stored once, as the embeddings
    for name, W in ext.weights.items():
        scale, zero = ext.qparams[name]
        out_f, in_f = W.shape
        ql = QuantLinear(bits, group or in_f, in_f, out_f, bias=False, g_idx=True)
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = W.clone()
        ql.pack(lin, scale.half().float(), (zero + 2 ** (bits - 1)).round().to(torch.int32))
        del sd[f"{name}.weight"]
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            sd[f"{name}.{k}"] = getattr(ql, k).contiguous()
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(parent) / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group or -1, "sym": sym,
                                  "desc_act": False, "checkpoint_format": "gptq", "provider": "quantfix repack"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in Path(parent).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, dst / f.name)
    print(f"wrote {dst}: GPTQ W{bits}g{group} {'sym' if sym else 'asym'}, {len(ext.weights)} modules")


if __name__ == "__main__":
    main(*sys.argv[1:4])
