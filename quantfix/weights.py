"""A module's weight wherever it lives: on an accelerator, on the CPU, or offloaded by accelerate
(read and written through its hook's weights map), and how much room an accelerator has left."""
from __future__ import annotations

import gc
from contextlib import nullcontext
from typing import Optional

import torch


# Weights that accelerate offloaded (device_map with "cpu"/"disk" entries beside accelerators) sit
# on the meta device between forward passes; their values live in the hook's weights_map. These
# helpers read and write a module's weight wherever it lives.

def offload_map(module):
    """(weights map, its writable store) of a module whose accelerate hook offloads its weights,
    else None: the hook loads ``weights_map[name]``, and a tensor put in the store under
    ``weights_map.prefix + name`` replaces the offloaded one."""
    hook = getattr(module, "_hf_hook", None)
    wm = getattr(hook, "weights_map", None) if hook is not None and getattr(hook, "offload", False) else None
    return None if wm is None else (wm, getattr(wm.dataset, "state_dict", wm.dataset))


def _offload_map(module):
    off = offload_map(module)
    return None if off is None or module.weight.device.type != "meta" else off[0]


def weight_of(module) -> torch.Tensor:
    """The module's weight (detached), also when accelerate offloaded it to the CPU or disk."""
    wm = _offload_map(module)
    return module.weight.detach() if wm is None else wm["weight"]


def weight_device(module) -> torch.device:
    """Where the module computes: its weight's device, or the execution device of an offloaded one."""
    if _offload_map(module) is None:
        return module.weight.device
    dev = module._hf_hook.execution_device
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def device_room(dev, nbytes: int, reserve: float) -> bool:
    """Whether ``nbytes`` more can live on accelerator ``dev`` and still leave ``reserve`` (a
    fraction of its memory) free: the driver's free memory plus what torch's allocator holds
    unused. Always False on the CPU (the caller's fallback is the host)."""
    dev = torch.device(dev)
    if dev.type != "cuda":
        return False
    free, total = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    cap = _memory_fraction(dev) * total  # device_memory_gb
    if cap < total:
        free, total = min(free, cap - torch.cuda.memory_allocated(dev)), cap
    return free - nbytes >= reserve * total


def _memory_fraction(dev) -> float:
    """torch's per-process memory fraction of a GPU (1.0 where this torch cannot tell)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(get(dev)) if get is not None else 1.0


def capped_memory() -> Optional[dict]:
    """accelerate's max_memory under ``device_memory_gb``: per GPU the cap less what is allocated
    already, the host's available memory for the rest; None when no GPU is capped."""
    if not torch.cuda.is_available():
        return None
    caps = {i: _memory_fraction(i) * torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())}
    if all(c >= torch.cuda.get_device_properties(i).total_memory for i, c in caps.items()):
        return None
    import psutil

    out = {i: max(0, int(c - torch.cuda.memory_allocated(i))) for i, c in caps.items()}
    out["cpu"] = psutil.virtual_memory().available
    return out


def cap_device_memory(gb: float) -> None:
    """At most ``gb`` GB of each visible GPU for this process (torch's allocator raises past it;
    ``device_room`` plans within it)."""
    for i in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(i).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 1e9 / total), i)


@torch.no_grad()
def set_weight(module, w: torch.Tensor) -> None:
    """Overwrite the module's weight values in place (or the offloaded copy that its hook loads)."""
    wm = _offload_map(module)
    if wm is None:
        module.weight.copy_(w.to(module.weight.device, module.weight.dtype))
        return
    store = offload_map(module)[1]
    store[wm.prefix + "weight"] = w.to("cpu", wm["weight"].dtype).contiguous()


@torch.no_grad()
def round_params(model, dtype: torch.dtype) -> None:
    """Round every floating parameter to ``dtype``'s values, kept in its own dtype (also the copies
    accelerate offloaded: the weights map its hooks load from). Buffers (rotary frequencies) stay:
    the reloaded model recomputes them."""
    for module in model.modules():
        off = offload_map(module)
        for name, p in module.named_parameters(recurse=False):
            if not p.is_floating_point():
                continue
            if p.device.type != "meta":
                p.data = p.data.to(dtype).to(p.dtype)
            elif off is not None and name in off[0]:
                t = off[0][name]
                off[1][off[0].prefix + name] = t.to(dtype).to(t.dtype).contiguous()


def input_device(model) -> torch.device:
    """The device the input ids go to: that of the input embeddings."""
    return weight_device(model.get_input_embeddings())


@torch.no_grad()
def detached_copy(module, device: torch.device, weights: Optional[dict] = None):
    """A deep copy of ``module`` without accelerate hooks, every parameter on ``device`` (offloaded
    ones loaded from their weights_map), with ``weights`` ({param name: tensor}) swapped in: a
    throw-away module to rerun one layer with other weights, whatever the device map."""
    import copy

    other = copy.deepcopy(module)
    src = dict(module.named_modules())
    if getattr(module, "_hf_hook", None) is not None or any(hasattr(m, "_hf_hook") for m in src.values()):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(other, recurse=True)
    for mname, m in other.named_modules():
        for pname, p in list(m.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if weights is not None and full in weights:
                value = weights[full]
            elif p.device.type == "meta":
                value = src[mname]._hf_hook.weights_map[pname]
            else:
                value = p
            m._parameters[pname] = torch.nn.Parameter(value.to(device, p.dtype), requires_grad=False)
    return other


def free_memory(device: torch.device) -> None:
    """Give back what was freed: Python's garbage, and the accelerator's cached blocks."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (a CPU with AVX512-BF16 or AMX tiles: on this
    2-core EPYC 2.9x the float32 product of the demo's shapes; a CUDA GPU that supports bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def pass_dtype(setting: str, model) -> Optional[torch.dtype]:
    """The dtype a pass that gathers statistics of the float model computes in (None: the model's own):
    the one-pass sensitivity estimates (``diagnose.sensitivity.dtype``) and the calibration pass
    (``data.dtype``). ``auto``: bfloat16 for a float32 model on a device with native bfloat16 products, as
    a bfloat16 model computes them on a GPU. The sensitivity passes rank parts and options, and in bfloat16
    on the CPU demo they take ~37% less time with the same ranking (layers against exact 0.939 -> 0.935,
    module scores 0.9997 Spearman against float32); the calibration pass's Hessians differ by 0.26% (median,
    Frobenius) and it takes 42% less time (benchmarks/README.md). The trials, the references, the
    verification and the diagnosis's other measurements stay in the model's dtype."""
    setting = str(getattr(setting, "value", setting))
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if setting == "model":
        return None
    if setting == "bfloat16":
        return None if model_dtype == torch.bfloat16 else torch.bfloat16
    return torch.bfloat16 if model_dtype == torch.float32 and native_bf16(input_device(model)) else None


def autocast(model, dtype: Optional[torch.dtype]):
    """The model's forward under autocast to ``dtype`` (its backward follows the casts); a no-op for None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(input_device(model).type, dtype=dtype)
