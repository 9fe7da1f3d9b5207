"""Stage: export. Turn a Plan into a real checkpoint with a real engine, atomically.

compressed-tensors plans (rtn, gptq, awq) go through llm-compressor's ``oneshot`` with one config
group per distinct precision (mixed precision via ``config_groups`` + ``ignore``); bitsandbytes
plans (llm_int8, nf4) through transformers' ``BitsAndBytesConfig``. The checkpoint is written to a
temporary folder beside the target (``.checkpoint-*``) and renamed into place only when complete; a
full disk is one clear error, and temporary folders left by a killed run are removed by the next.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from quantfix.arch import is_expert
from quantfix.cache import is_disk_full  # noqa: F401 - also part of this module's API
from quantfix.errors import QuantfixError
from quantfix.weights import offload_map, set_weight, weight_device, weight_of
from quantfix.plan import Plan
from quantfix.quantize import algorithms

log = logging.getLogger(__name__)


def llmcompressor_recipe(plan: Plan, q) -> list:
    """The llm-compressor modifiers that write a compressed-tensors plan: plan-wide transforms
    (AWQ smoothing) first, then one QuantizationModifier with one config group per distinct (bits,
    group, symmetry, observer). The observer comes from each module's registry entry: the engine's
    own min/max or mse search where it reproduces the simulation bit for bit, ``quantfix_static``
    (the simulation's own scales, weights already rounded) for GPTQ and imatrix. Float modules and
    lm_head are ignored."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    groups: Dict[tuple, List[str]] = defaultdict(list)
    ignore, transforms = ["lm_head"], {}
    for name, p in plan.modules.items():
        if p.is_float:
            ignore.append(name)
            continue
        alg = algorithms.get(p.algorithm)
        groups[(p.bits, p.group_size, p.symmetric, alg.export_observer)].append(name)
        if alg.transforms is not None:
            transforms[alg.name] = alg.transforms
    if not groups:
        return []
    check_experts_uniform(plan)
    config_groups = {f"group_{i}": {"targets": [_target(n) for n in sorted(names)],
                                    "weights": _weights(bits, group, sym, observer)}
                     for i, ((bits, group, sym, observer), names) in enumerate(sorted(groups.items()))}
    return [m for make in transforms.values() for m in make(q)] + \
        [QuantizationModifier(config_groups=config_groups, ignore=ignore)]


def _target(name: str) -> str:
    """A config-group target for one module. MoE experts are named by an anchored ``re:`` pattern:
    transformers' compressed-tensors loader dequantizes the experts with the scheme of the group
    whose ``re:`` targets name experts (integrations/compressed_tensors.get_experts_scheme), and
    falls back to the first group otherwise, which may be another precision."""
    return f"re:^{re.escape(name)}$" if is_expert(name) else name


def check_experts_uniform(plan: Plan) -> None:
    """transformers (5.17) reloads a compressed-tensors MoE checkpoint by dequantizing every
    expert with ONE scheme and merging them into 3-D parameters; experts of different widths,
    or float experts beside quantized ones (their plain ``weight`` is not among the packed keys
    the merge reads), would reload as wrong or missing weights. The planner keeps them uniform
    (planner.harmonize_experts); a plan that is not is refused here, before anything is written."""
    schemes = {(p.bits, p.group_size, p.symmetric) if not p.is_float else "float"
               for n, p in plan.modules.items() if is_expert(n)}
    if len(schemes) > 1:
        raise QuantfixError(f"the plan gives MoE experts {len(schemes)} different precisions "
                            f"({', '.join(sorted(map(str, schemes)))}): transformers reloads a compressed-tensors MoE "
                            "checkpoint with one scheme for all experts, so give every expert the same bits, group size "
                            "and symmetry (a plan written by quantfix does)")
    if schemes == {"float"} and any(not p.is_float for n, p in plan.modules.items() if not is_expert(n)):
        raise QuantfixError("the plan keeps the MoE experts in float beside quantized modules: transformers 5.17 does "
                            "not reload float experts from a compressed-tensors checkpoint (they come back MISSING); "
                            "quantize the experts (e.g. 8 bits) or keep the whole model in float")


def _weights(bits: int, group: int, symmetric: bool, observer: str) -> dict:
    w = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group else "channel",
         "observer": algorithms.OBSERVERS[observer]}
    if group:
        w["group_size"] = group
    return w


def _calibration_dataset(samples: torch.Tensor):
    import datasets

    ids = samples.tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def _export_llmcompressor(model, tokenizer, plan: Plan, samples: torch.Tensor, tmp: Path, q,
                          trust_remote_code: bool = False) -> None:
    from llmcompressor import oneshot

    recipe = llmcompressor_recipe(plan, q)
    if recipe:
        kwargs = {}
        _register_static_observer()
        if any(p.alg.calibrates_at_export for p in plan.modules.values() if not p.is_float):
            _cpu_safe_llmcompressor()
            kwargs = dict(dataset=_calibration_dataset(samples), num_calibration_samples=samples.shape[0],
                          max_seq_length=samples.shape[1], processor=tokenizer, shuffle_calibration_samples=False)
        oneshot(model=model, recipe=recipe, trust_remote_code_model=trust_remote_code, **kwargs)
    model.save_pretrained(tmp, save_compressed=True)
    _expert_names_for_reload(model, tmp)


def expert_leaf_renames(model_type: str) -> Dict[str, str]:
    """{linearized expert leaf: the leaf transformers' MoE loader reads} for ``model_type``: the
    per-expert source names of its conversion mapping into ``experts.gate_up_proj`` /
    ``experts.down_proj`` (Mixtral: gate_proj -> w1, up_proj -> w3, down_proj -> w2; Qwen-MoE:
    unchanged)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    out: Dict[str, str] = {}
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        targets = list(getattr(conv, "target_patterns", []) or [])
        sources = list(getattr(conv, "source_patterns", []) or [])
        leaves = [m.group(1) for m in (re.search(r"experts\.\*\.([A-Za-z0-9_]+)\.weight", p) for p in sources) if m]
        if len(leaves) != len(sources):
            continue
        if any(t.endswith("experts.gate_up_proj") for t in targets) and len(leaves) == 2:
            out.update({"gate_proj": leaves[0], "up_proj": leaves[1]})
        elif any(t.endswith("experts.down_proj") for t in targets) and len(leaves) == 1:
            out["down_proj"] = leaves[0]
    return {k: v for k, v in out.items() if k != v}


def _expert_names_for_reload(model, tmp: Path) -> None:
    """Name the saved per-expert weights as the model type's loader expects them (see
    ``expert_leaf_renames``), in the weight files, their index and the quantization config."""
    if not any(is_expert(n) for n, _ in model.named_modules()):
        return
    renames = expert_leaf_renames(model.config.model_type)
    if not renames:
        return
    import json

    from safetensors.torch import load_file, save_file

    pat = re.compile(r"(experts(?:\\)?\.\d+(?:\\)?\.)(" + "|".join(map(re.escape, renames)) + r")(?=(?:\\)?\.|\$|$)")

    def fix(key: str) -> str:
        return pat.sub(lambda m: m.group(1) + renames[m.group(2)], key)

    for f in sorted(tmp.glob("*.safetensors")):
        tensors = load_file(str(f))
        save_file({fix(k): v for k, v in tensors.items()}, str(f), metadata={"format": "pt"})
    index = tmp / "model.safetensors.index.json"
    if index.exists():
        d = json.loads(index.read_text())
        d["weight_map"] = {fix(k): v for k, v in d.get("weight_map", {}).items()}
        index.write_text(json.dumps(d, indent=2))
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.get("quantization_config") or {}
    for group in (qc.get("config_groups") or {}).values():
        group["targets"] = [fix(t) for t in group.get("targets", [])]
    if "ignore" in qc:
        qc["ignore"] = [fix(t) for t in qc["ignore"]]
    cfg_path.write_text(json.dumps(cfg, indent=2))


STATIC_ATTR = "_quantfix_qparams"


def _register_static_observer() -> None:
    """Register llm-compressor weight observer ``quantfix_static``: it hands the engine the scale
    and zero point quantfix's simulation rounded with (set on each module as ``STATIC_ATTR``), so
    the engine packs exactly the weights the trials measured (GPTQ, imatrix) without a second
    calibration pass of its own."""
    from llmcompressor.observers import Observer
    from llmcompressor.observers.min_max import MemorylessMinMaxObserver

    registered = {n.replace("-", "_") for n in Observer.registered_names()}  # the registry normalizes names
    if algorithms.OBSERVERS["static"] in registered:
        return

    @Observer.register(algorithms.OBSERVERS["static"])
    class QuantfixStaticObserver(MemorylessMinMaxObserver):
        def attach(self, module) -> None:
            self._qparams = getattr(module, STATIC_ATTR, None)

        @torch.no_grad()
        def get_qparams(self):
            if getattr(self, "_qparams", None) is None:
                raise RuntimeError("quantfix_static observer: no scales were handed over for this module")
            scale, zero = self._qparams
            self.delete_statistics(check_fused=False)
            return {"scale": scale, "zero_point": zero.to(torch.int8), "global_scale": None}


@torch.no_grad()
def _install_static(model, static: Dict[str, tuple]) -> None:
    """Put the simulated weights in the model and attach their scales for the static observer."""
    mods = dict(model.named_modules())
    for name, (w, scale, zero) in static.items():
        set_weight(mods[name], w)
        dev, dtype = weight_device(mods[name]), weight_of(mods[name]).dtype
        setattr(mods[name], STATIC_ATTR, (scale.to(dev, dtype), zero.to(dev, dtype)))


def _cpu_safe_llmcompressor() -> None:
    """llm-compressor 0.14 pins host memory in its activation cache (AWQ), which raises "Cannot access
    accelerator device" on a machine without one; pinning is only an optimization, so skip it there."""
    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *a, **k: None


def _export_bnb(fp_path: str, plan: Plan, tmp: Path, dtype: torch.dtype, q, trust_remote_code: bool = False) -> None:
    from transformers import AutoModelForCausalLM

    skip = ["lm_head"] + [n for n, p in plan.modules.items() if p.is_float]
    bnb = algorithms.get(plan.algorithm()).bnb_config(skip, dtype, q)
    model = AutoModelForCausalLM.from_pretrained(fp_path, quantization_config=bnb, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    model.save_pretrained(tmp)
    del model


TEMP_PREFIX = ".checkpoint-"
FINGERPRINT_FILE = "quantfix_fingerprint.txt"


def clean_stale_temp(out_dir: Path) -> List[Path]:
    """Remove the ``.checkpoint-*`` temporary folders that a killed export left in the run dir
    (a finished export renames its folder to ``checkpoint``, a failed one removes it)."""
    removed = []
    for tmp in sorted(Path(out_dir).glob(TEMP_PREFIX + "*")):
        if tmp.is_dir() and not tmp.is_symlink():
            size = dir_size(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("removed %s (%.1f MB) left by an interrupted export", tmp, size / 1e6)
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cast_sources(model, static: Optional[Dict[str, tuple]] = None):
    """(name, tensor) of every floating tensor a cast of the model touches: parameters and buffers,
    accelerate's offloaded copies, and the simulated weights and scales installed for the export."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.device.type != "meta":
            yield name, t
    for m in model.modules():
        off = offload_map(m)
        if off is not None:
            yield from ((k, v) for k, v in off[1].items() if k.startswith(off[0].prefix) and v.is_floating_point())
    for name, tensors in (static or {}).items():
        yield from ((f"{name}.{part}", t) for part, t in zip(("weight", "scale", "zero_point"), tensors))


@torch.no_grad()
def safe_export_dtype(model, dtype: Optional[torch.dtype], static: Optional[Dict[str, tuple]] = None):
    """(dtype to export in, warning or None): ``dtype``, unless a tensor the cast touches holds a
    value beyond its range (float16: |x| > 65504 becomes inf), then bfloat16 (float32's range)."""
    if dtype is None or not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(torch.float32).max:
        return dtype, None
    limit = torch.finfo(dtype).max
    worst, peak = None, 0.0
    for name, t in _cast_sources(model, static):
        if t.numel() and torch.finfo(t.dtype).max > limit:
            m = float(t.detach().abs().amax())
            if m > peak:
                worst, peak = name, m
    if worst is None or peak <= limit:
        return dtype, None
    return torch.bfloat16, (f"export.dtype={str(dtype).replace('torch.', '')} would turn {worst} (max |x| {peak:.4g} "
                            f"> {limit:.0f}) into inf: the checkpoint is exported in bfloat16 instead")


@dataclass
class ExportSpec:
    """What the export writes: the plan, where the float parent lives (bitsandbytes reloads it), the
    quant settings, the checkpoint dtype, the simulated weights of the statically exported modules
    (``WeightBank.export_tensors``: module -> (weight, scale, zero point)), the calibration samples
    (for engines that calibrate at export, AWQ) and the run's fingerprint (a resumed run re-verifies
    only a checkpoint of its own inputs)."""

    plan: Plan
    fp_path: str
    quant: Any
    dtype: Optional[torch.dtype] = None
    static: Optional[Dict[str, tuple]] = None
    samples: Optional[torch.Tensor] = None
    fingerprint: Optional[str] = None
    trust_remote_code: bool = False


def choose_dtype(model, model_dtype: torch.dtype, want: str):
    """(dtype the checkpoint's float parts are written in, warning or None), decided before any
    trial so that the trials measure it. ``export.dtype=auto``: the model's dtype when it is
    16-bit, float16 when it is float32. A 16-bit model exports in its own dtype (another 16-bit
    dtype would round the weights the trials measured differently: said in the warning); float16
    that would overflow becomes bfloat16 (``safe_export_dtype``)."""
    warning = None
    half = model_dtype if model_dtype != torch.float32 else torch.float16
    target = half if want == "auto" else getattr(torch, want)
    if model_dtype != torch.float32 and target not in (model_dtype, torch.float32):
        warning = (f"export.dtype={want} ignored: the model computes in {str(model_dtype).replace('torch.', '')}, "
                   f"which the checkpoint keeps so that it is what the trials measured; for a {want} checkpoint "
                   f"set model.dtype={want}")
        target = model_dtype
    target, overflow = safe_export_dtype(model, target)
    return target, warning or overflow


def same_checkpoint(ckpt: Path, plan: Plan, fingerprint: str) -> bool:
    """Whether ``ckpt`` is this plan exported by a run with this fingerprint (same model, data, config)."""
    fp = ckpt / FINGERPRINT_FILE
    return (ckpt / "quantfix_plan.yaml").exists() and fp.exists() and fp.read_text().strip() == fingerprint \
        and Plan.load(ckpt / "quantfix_plan.yaml").modules == plan.modules


def export(model, tokenizer, spec: ExportSpec, out_dir: Path) -> Tuple[Path, List[str]]:
    """Write ``out_dir/checkpoint`` (weights, config, tokenizer, quantfix_plan.yaml) atomically;
    returns it and the warnings the report must carry.

    The model passed in must hold the float weights; it is modified in place (quantized).
    ``spec.static`` is required when the plan has statically exported modules. An export dtype too
    narrow for the weights (float16 and |x| > 65504) becomes bfloat16, with a warning: never an inf
    checkpoint."""
    plan, static = spec.plan, spec.static
    needed = [n for n, p in plan.modules.items() if not p.is_float and p.alg.static_export]
    missing = [n for n in needed if n not in (static or {})]
    if missing:
        raise ValueError(f"export: no simulated weights for {len(missing)} statically exported modules, e.g. {missing[0]}")
    target = out_dir / "checkpoint"
    if target.exists():
        raise QuantfixError(f"{target} already exists: pick a new output dir (hydra.run.dir=...) or remove it")
    tmp = _temp_dir(out_dir)
    export_dtype, warning = safe_export_dtype(model, spec.dtype, {n: static[n] for n in needed})
    warnings = [warning] if warning else []
    if warning:
        log.warning("%s", warning)
    try:
        _write(model, tokenizer, spec, export_dtype, {n: static[n] for n in needed}, tmp)
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise QuantfixError(f"no space left on device while writing the checkpoint to {out_dir}: free space or "
                                "pick another hydra.run.dir (the partial checkpoint was removed)") from e
        raise
    return target, warnings


def _temp_dir(out_dir: Path) -> Path:
    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=TEMP_PREFIX))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a checkpoint is shared like any saved model
    except OSError as e:
        raise QuantfixError(f"cannot write to {out_dir} ({e.strerror}): pick a writable hydra.run.dir") from e
    return tmp


def _write(model, tokenizer, spec: ExportSpec, export_dtype, static: Dict[str, tuple], tmp: Path) -> None:
    """The checkpoint's files into ``tmp``: weights (engine by plan family), tokenizer, plan, fingerprint."""
    plan = spec.plan
    if export_dtype is not None and export_dtype != next(model.parameters()).dtype:
        _cast(model, export_dtype)
    if algorithms.BITSANDBYTES in plan.families():
        _export_bnb(spec.fp_path, plan, tmp, export_dtype or next(model.parameters()).dtype, spec.quant,
                    spec.trust_remote_code)
    else:
        _install_static(model, static)
        _export_llmcompressor(model, tokenizer, plan, spec.samples, tmp, spec.quant, spec.trust_remote_code)
    tokenizer.save_pretrained(tmp)
    plan.save(tmp / "quantfix_plan.yaml")
    if spec.fingerprint:
        (tmp / FINGERPRINT_FILE).write_text(spec.fingerprint + "\n")


@torch.no_grad()
def _cast(model, dtype: torch.dtype) -> None:
    """model.to(dtype) that also works when accelerate spread or offloaded the model (where .to()
    is refused): cast every floating tensor in place, offloaded copies included."""
    if not getattr(model, "hf_device_map", None):
        model.to(dtype)
        return
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and t.is_floating_point() and t.device.type != "meta":
                t.data = t.data.to(dtype)
        off = offload_map(m)
        if off is not None:
            wm, store = off
            for key in list(store):
                if key.startswith(wm.prefix) and store[key].is_floating_point():
                    store[key] = store[key].to(dtype)
            for name, t in list(m._parameters.items()):  # the meta placeholders carry the dtype too
                if t is not None and t.device.type == "meta" and t.is_floating_point():
                    m._parameters[name] = torch.nn.Parameter(t.to(dtype), requires_grad=False)
    model.config.dtype = dtype


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
