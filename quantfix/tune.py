"""AutoRound tuning of a whole plan: the rounding and the scales learned block by block (SignSGD on
the block's output error), with the plan's per-module widths as AutoRound's layer config.

Unlike the per-module algorithms, AutoRound tunes every module of a decoder block together against
the block's float output, so it cannot be simulated per module and priced per option: the loop runs
it once on the plan its search chose (``loop.tune=autoround``) and measures the result as one more
trial. The result ships statically: per module the tuned integer codes, AutoRound's scales cast to
the checkpoint's dtype and the zero points, which llm-compressor packs as they are (the
``quantfix_static`` observer), so the checkpoint holds exactly the weights the trial measured.
"""
from __future__ import annotations

import copy
import gc
import logging
import os
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from quantfix.arch import layer_index
from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision
from quantfix.quantize import scales

log = logging.getLogger(__name__)

NAME = "autoround"


def tunable(p: Precision) -> bool:
    """Whether AutoRound can tune this module's precision: integer weights in compressed-tensors,
    not an existing checkpoint's own (a repair keeps the modules it leaves alone exactly)."""
    return not p.is_float and p.alg.tunable


def tuned_plan(plan: Plan) -> Plan:
    """The plan with every tunable module's rounding set to AutoRound (widths unchanged)."""
    modules = {n: Precision(p.bits, p.group_size, p.symmetric, NAME) if tunable(p) else p
               for n, p in plan.modules.items()}
    return plan.with_changes(modules, note=f"{plan.note}; AutoRound-tuned" if plan.note else "AutoRound-tuned")


def _layer_config(model, plan: Plan) -> Dict[str, dict]:
    """Every linear module of the model: the plan's width for the tunable ones, 16 bits (left
    alone) for the rest, so AutoRound touches nothing the plan does not quantize."""
    config = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        p = plan.modules.get(name)
        if p is not None and tunable(p):
            config[name] = {"bits": p.bits, "group_size": p.group_size or -1, "sym": p.symmetric, "data_type": "int"}
        else:
            config[name] = {"bits": 16}
    return config


def block_layouts(plan: Plan) -> int:
    """How many distinct decoder-block layouts (each tunable module's width, by its place in the
    block) the plan has. AutoRound's compiled block forward is specialised to one layout: every new
    layout costs a recompile (and past dynamo's limit, a fall back to eager)."""
    layouts: Dict[Optional[int], set] = {}
    for name, p in plan.modules.items():
        if tunable(p):
            i = layer_index(name)
            local = name.split(f".{i}.", 1)[1] if i is not None else name
            layouts.setdefault(i, set()).add((local, p.bits, p.group_size, p.symmetric))
    return len({frozenset(v) for v in layouts.values()})


MAX_COMPILED_LAYOUTS = 2


def compile_words(compiled: bool, alg_ext: bool) -> str:
    """What the tuning compiles, for its log line: AutoRound's algorithm extension never compiles the
    block forward, only the weight quantization function."""
    if not compiled:
        return "off"
    return "on for the quantization function only (the extension's block forward runs eager)" if alg_ext else "on"


def use_compile(layouts: int, setting: Optional[bool]) -> bool:
    """torch.compile for AutoRound's tuning of a plan of ``layouts`` block layouts: the setting when
    given; else only when there are at most MAX_COMPILED_LAYOUTS (a mixed plan recompiled AutoRound's
    block forward at every block: 14.8 s per block compiled vs 6.8 s eager, demo 4.5-bit plan, one H100)."""
    return setting if setting is not None else layouts <= MAX_COMPILED_LAYOUTS


def _scale_dtype(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


@torch.no_grad()
def _static_of(mod, p: Precision, dtype: torch.dtype, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, scale, zero point) in compressed-tensors' convention (signed codes, zero point in
    the signed range) from AutoRound's tuned layer: its unsigned codes are recovered from the
    quantize-dequantized weight and its own scale (exact: |error| < 0.5 of a step), then the weight
    is rebuilt on the checkpoint's scale grid, as ``scales.quantize_with`` (and the engine) round."""
    W = mod.weight.detach().float().cpu()
    out_f, in_f = W.shape
    g = p.group_size or in_f
    s = mod.scale.detach().float().cpu().reshape(out_f, -1)
    zp = mod.zp
    zp = zp.detach().float().cpu().reshape(out_f, -1) if torch.is_tensor(zp) else torch.full_like(s, float(zp))
    if s.shape[1] != in_f // g:
        raise QuantfixError(f"AutoRound returned {s.shape[1]} scales per row for a module with {in_f // g} groups")
    half = 2 ** (p.bits - 1)
    codes = torch.round(W.reshape(out_f, -1, g) / s[..., None] + zp[..., None]).clamp(0, 2 * half - 1)
    scale = s.to(dtype)
    zero = (zp - half).to(dtype)
    W_grid = ((codes - zp[..., None]) * scale.float()[..., None]).reshape(out_f, in_f)
    Wq = scales.quantize_with(W_grid.to(dtype), scale, zero, p.bits, p.group_size, out_dtype=out_dtype)
    return Wq, scale, zero


@contextmanager
def frozen_heap():
    """The objects alive now moved out of the garbage collector's sight for the duration (``gc.freeze``),
    after one collection. AutoRound calls ``gc.collect()`` about four times per block; each full
    collection walks every object of the process (500k-620k measured: torch, transformers, the run's
    own), 0.3-0.5 s each on a 2-core CPU (the demo's 30 blocks: 128 collections, 41-47 s), and finds
    nothing of ours to free: the objects it walks are alive. Frozen, its collections walk only what the
    tuning made, which they free as before. After, unfrozen, one more collection frees what the frozen
    ones could not reach (garbage held by objects that were frozen), as AutoRound's last collection did
    unfrozen. A heap frozen before (a server that froze before forking; the Python of the H100 machine
    here, where the objects made since were still walked: 128 collections, 34 s of a 126 s tuning) is
    frozen as a whole for the tuning and frozen again after."""
    was_frozen = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()
        if was_frozen:
            gc.freeze()


@dataclass
class TuneSettings:
    """AutoRound's knobs: iterations per block, batch size, seed, learning rate (None: its default)."""

    iters: int = 200
    batch_size: int = 8
    seed: int = 0
    lr: Optional[float] = None
    compile: Optional[bool] = None  # torch.compile in AutoRound; None: use_compile decides by the plan
    alg_ext: bool = False  # AutoRound's algorithm extension (SignRoundV2); symmetric plans only


def uses_alg_ext(plan: Plan, settings: TuneSettings) -> bool:
    """Whether the tuning of ``plan`` runs AutoRound's algorithm extension: asked for, and every tunable
    module symmetric (with it, an asymmetric module beside a symmetric first one came back from AutoRound
    with one zero point and signed scales)."""
    return settings.alg_ext and all(p.symmetric for p in plan.modules.values() if tunable(p))


def outlier_loss(plan: Plan, settings: TuneSettings) -> bool:
    """Whether AutoRound's algorithm extension leaves each block's largest output errors out of its loss when tuning
    ``plan`` (``stable_outlier_loss``): with the extension, when the scheme quantfix passes, the first tunable module's
    width, is below 4 bits (auto-round 0.15's rule for a symmetric integer scheme), for every block alike."""
    first = next((p for p in plan.modules.values() if tunable(p)), None)
    return first is not None and first.bits < 4 and uses_alg_ext(plan, settings)


def extension_words(plan: Plan, settings: TuneSettings) -> str:
    """What the tuning of ``plan`` runs of AutoRound's algorithm extension, for the log and the trial's action:
    '', ', algorithm extension' or ', algorithm extension with its outlier loss'."""
    if not uses_alg_ext(plan, settings):
        return ""
    return ", algorithm extension" + (" with its outlier loss" if outlier_loss(plan, settings) else "")


def _engine_kwargs(work, plan: Plan, samples: torch.Tensor, dtype: torch.dtype, settings: TuneSettings) -> dict:
    """AutoRound's keyword arguments for tuning ``plan`` on ``work`` (said in the log)."""
    n = samples.shape[0]
    bs = max(1, min(settings.batch_size, n))
    data = [samples[i:i + bs] for i in range(0, n - n % bs, bs)]  # whole batches (bs <= n)
    kwargs = dict(layer_config=_layer_config(work, plan), iters=settings.iters, nsamples=len(data) * bs,
                  seqlen=samples.shape[1], dataset=data, batch_size=bs, scale_dtype=_scale_dtype(dtype), seed=settings.seed)
    if settings.lr is not None:
        kwargs["lr"] = settings.lr
    if uses_alg_ext(plan, settings):
        kwargs["enable_alg_ext"] = True
    elif settings.alg_ext:
        log.warning("AutoRound's algorithm extension is for symmetric widths only: tuning this plan (%d asymmetric "
                    "modules) without it", sum(not p.symmetric for p in plan.modules.values() if tunable(p)))
    layouts = block_layouts(plan)
    kwargs["enable_torch_compile"] = compiled = use_compile(layouts, settings.compile)
    log.info("AutoRound: tuning %d modules (%d iterations per block, %d calibration samples, %d block layouts, "
             "torch.compile %s%s)", sum(tunable(p) for p in plan.modules.values()), settings.iters, len(data) * bs,
             layouts, compile_words(compiled, bool(kwargs.get("enable_alg_ext"))),
             extension_words(plan, settings))
    return kwargs


@contextmanager
def torch_globals_kept():
    """Torch's process-wide settings that AutoRound changes and leaves changed, as they were before, after
    (also on failure). Its construction turns on ``torch.use_deterministic_algorithms(True, warn_only=True)``
    and sets ``CUBLAS_WORKSPACE_CONFIG``; left on, the rest of the process (the loop's export and verification, a
    caller's own code) runs torch's deterministic kernels, warns on ops that have none, and fills every
    ``torch.empty`` (``torch.utils.deterministic.fill_uninitialized_memory``: 20 logits-sized float32 buffers, 16 x 512
    x 49152, took 26 s instead of 1 ms on a 2-core CPU). The demo's stages after the tuning measured the same either
    way (verification 36.0 / 36.1 s): the fix is to leave the process as it was found, not a speed-up of the loop."""
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def stable_topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """``torch.topk`` of a 1-D tensor with ties at the k-th value broken by the lower index (other calls: torch.topk).
    torch.topk returns the right values, but which of the elements tied at the k-th value it picks is not promised
    (on CUDA it may change from run to run); this picks every element above the k-th value, then the tied ones in index
    order."""
    top = torch.topk(x, k, dim=dim, largest=largest, sorted=sorted)
    if x.dim() != 1 or not largest or k <= 0 or dim not in (0, -1):
        return top
    kth = top.values.min()
    above = torch.nonzero(x > kth).view(-1)
    tied = torch.nonzero(x == kth).view(-1)[: k - above.numel()]
    idx = torch.cat([above, tied])
    if idx.numel() != k:  # NaN among the top (topk ranks it highest, comparisons do not): torch's own
        return top
    if sorted:  # by value, descending; equal values in index order (each group above is in index order)
        idx = idx[torch.sort(x[idx], descending=True, stable=True).indices]
    return torch.return_types.topk((x[idx], idx))


class _TorchStableTopk(types.ModuleType):
    """``torch`` as one AutoRound module sees it while quantfix tunes: every name torch's own but ``topk``."""

    def __init__(self):
        super().__init__("torch")
        self.topk = stable_topk

    def __getattr__(self, name):
        return getattr(torch, name)


@contextmanager
def stable_outlier_loss():
    """AutoRound's algorithm extension, for a first tuned width below 4 bits, leaves the 0.1% largest errors of each
    block's output out of the loss: a ``torch.topk`` over ~2M bfloat16 errors, where hundreds tie at the k-th value
    and torch does not promise the same subset of them from run to run (on CUDA). The likely source, not yet measured
    on a GPU, of the spread of the demo's 3.5-bit plan tuned on one H100 (KLD 0.2946-0.3201 in four runs; mostly W3,
    with the extension), where AutoScheme's tuning without the extension gave the same 0.30768 in twelve runs. During
    the tuning that module's ``torch.topk`` is ``stable_topk``. Yields whether it applied (False when this AutoRound
    has no such module or it calls torch by another name)."""
    try:
        from auto_round.algorithms.quantization.sign_roundv2 import quantizer as v2
    except ImportError:
        yield False
        return
    if getattr(v2, "torch", None) is not torch:
        yield False
        return
    v2.torch = _TorchStableTopk()
    try:
        yield True
    finally:
        v2.torch = torch


def tune(model, tokenizer, plan: Plan, samples: torch.Tensor, dtype: torch.dtype,
         settings: TuneSettings = TuneSettings()) -> Dict[str, Tuple[torch.Tensor, ...]]:
    """AutoRound on a copy of ``model`` (float weights in, the live model untouched) with the plan's
    widths, calibrated on ``samples`` ([n, seq_len] token ids). Returns module -> (weight, scale,
    zero point) of every tunable module, on the CPU: the weight in the model's dtype, the scale and
    zero point in ``dtype`` (the checkpoint's)."""
    try:
        from auto_round import AutoRound
    except ImportError as e:
        raise QuantfixError("loop.tune=autoround needs the auto-round package: pip install auto-round, "
                            "or set loop.tune=none") from e
    todo = {n: p for n, p in plan.modules.items() if tunable(p)}
    if not todo:
        return {}
    weight_dtype = next(model.parameters()).dtype
    first = next(iter(todo.values()))
    with frozen_heap(), torch_globals_kept(), stable_outlier_loss():
        work = copy.deepcopy(model)  # made after the freeze: the collections AutoRound calls see it, as before
        try:
            ar = AutoRound(work, tokenizer, bits=first.bits, group_size=first.group_size or -1, sym=first.symmetric,
                           **_engine_kwargs(work, plan, samples, dtype, settings))
            tuned, _ = ar.quantize()
        except QuantfixError:
            raise
        except Exception as e:  # the engine raises many types; the user needs its one line
            raise QuantfixError(f"AutoRound tuning failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                                "set loop.tune=none to ship the search's own rounding") from e
    mods = dict(tuned.named_modules())
    out = {}
    for name, p in todo.items():
        mod = mods.get(name)
        if mod is None or getattr(mod, "scale", None) is None:
            raise QuantfixError(f"AutoRound left {name} unquantized (no scale): its width {p.label} may be one it does "
                                "not support; set loop.tune=none")
        out[name] = _static_of(mod, p, dtype, weight_dtype)
    del work, tuned, ar
    return out
