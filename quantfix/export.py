"""Stage: export. Turn a Plan into a real checkpoint with a real engine, atomically.

compressed-tensors plans (rtn, gptq, awq) go through llm-compressor's ``oneshot`` with one config
group per distinct precision (mixed precision via ``config_groups`` + ``ignore``); bitsandbytes
plans (llm_int8, nf4) through transformers' ``BitsAndBytesConfig``. The checkpoint is written to a
temporary folder beside the target and renamed into place only when complete.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from quantfix.config import BNB_ALGORITHMS
from quantfix.errors import QuantfixError
from quantfix.plan import Plan

log = logging.getLogger(__name__)


def llmcompressor_recipe(plan: Plan, dampening: float = 0.01, block_size: int = 128) -> list:
    """The llm-compressor modifiers that reproduce a compressed-tensors plan."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups: Dict[tuple, List[str]] = defaultdict(list)
    ignore = ["lm_head"]
    for name, p in plan.modules.items():
        if p.is_float:
            ignore.append(name)
        else:
            groups[(p.bits, p.group_size, p.symmetric)].append(name)
    config_groups = {}
    for i, ((bits, group, sym), names) in enumerate(sorted(groups.items())):
        weights = {"num_bits": bits, "type": "int", "symmetric": sym,
                   "strategy": "group" if group else "channel", "observer": "memoryless_minmax"}
        if group:
            weights["group_size"] = group
        config_groups[f"group_{i}"] = {"targets": sorted(names), "weights": weights}
    if not config_groups:
        return []
    alg = plan.algorithm()
    if alg == "gptq":
        return [GPTQModifier(config_groups=config_groups, ignore=ignore, dampening_frac=dampening, block_size=block_size)]
    quant = QuantizationModifier(config_groups=config_groups, ignore=ignore)
    if alg == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), quant]
    return [quant]


def _calibration_dataset(samples: torch.Tensor):
    import datasets

    ids = samples.tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def _export_llmcompressor(model, tokenizer, plan: Plan, samples: torch.Tensor, tmp: Path, q) -> None:
    from llmcompressor import oneshot

    recipe = llmcompressor_recipe(plan, q.gptq_dampening, q.gptq_block_size)
    if recipe:
        kwargs = {}
        if plan.algorithm() in ("gptq", "awq"):
            kwargs = dict(dataset=_calibration_dataset(samples), num_calibration_samples=samples.shape[0],
                          max_seq_length=samples.shape[1], processor=tokenizer, shuffle_calibration_samples=False)
        oneshot(model=model, recipe=recipe, **kwargs)
    model.save_pretrained(tmp, save_compressed=True)


def _export_bnb(fp_path: str, plan: Plan, tmp: Path, dtype: torch.dtype, q) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    skip = ["lm_head"] + [n for n, p in plan.modules.items() if p.is_float]
    if plan.algorithm() == "llm_int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.llm_int8_threshold, llm_int8_skip_modules=skip)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                 llm_int8_skip_modules=skip)
    model = AutoModelForCausalLM.from_pretrained(fp_path, quantization_config=bnb, dtype=dtype)
    model.save_pretrained(tmp)
    del model


def export(model, tokenizer, plan: Plan, samples: torch.Tensor, out_dir: Path, fp_path: str, q,
           export_dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``out_dir/checkpoint`` (weights, config, tokenizer, quantfix_plan.yaml) atomically.

    The model passed in must hold the float weights; it is modified in place (quantized)."""
    target = out_dir / "checkpoint"
    if target.exists():
        raise QuantfixError(f"{target} already exists: pick a new output dir (hydra.run.dir=...) or remove it")
    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".checkpoint-"))
    except OSError as e:
        raise QuantfixError(f"cannot write to {out_dir} ({e.strerror}): pick a writable hydra.run.dir") from e
    try:
        if export_dtype is not None and export_dtype != next(model.parameters()).dtype:
            model.to(export_dtype)
        family = {p.algorithm in BNB_ALGORITHMS for p in plan.modules.values() if not p.is_float}
        if True in family:
            _export_bnb(fp_path, plan, tmp, export_dtype or next(model.parameters()).dtype, q)
        else:
            _export_llmcompressor(model, tokenizer, plan, samples, tmp, q)
        tokenizer.save_pretrained(tmp)
        plan.save(tmp / "quantfix_plan.yaml")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def reload(path: Path, dtype: torch.dtype, device: torch.device, device_map: Optional[str] = None,
           max_memory: Optional[dict] = None, offload_folder: Optional[str] = None):
    """Load a checkpoint back with plain transformers (what a user's deployment does). With the
    run's device map, the checkpoint is loaded on the host and then spread with accelerate's
    dispatch_model (loading a compressed-tensors checkpoint with from_pretrained(device_map=...)
    converts accelerate's hooks to compressed-tensors offloading and, across two GPUs, left the
    top-level forward pointing at a removed hook: measured with transformers 5.17 and
    compressed-tensors 0.19)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    bnb = getattr(model, "hf_quantizer", None) is not None and "bitsandbytes" in type(model.hf_quantizer).__name__.lower()
    if device_map and not bnb:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        mm = {(int(k) if str(k).isdigit() else k): v for k, v in (max_memory or {}).items()} or None
        no_split = getattr(model, "_no_split_modules", None) or []
        if device_map in ("auto", "balanced", "balanced_low_0"):
            mm = get_balanced_memory(model, max_memory=mm, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=device_map == "balanced_low_0")
        dmap = infer_auto_device_map(model, max_memory=mm, no_split_module_classes=no_split, dtype=dtype)
        if offload_folder is None and "disk" in dmap.values():
            offload_folder = tempfile.mkdtemp(prefix="quantfix-offload-")
        model = dispatch_model(model, dmap, offload_dir=offload_folder)
    elif not bnb:
        model.to(device)
    model.eval()
    return model
