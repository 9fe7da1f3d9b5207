"""Stage: verify. The exported checkpoint reloaded from disk with plain transformers (what a user's
deployment does), measured, and compared with the trial that measured its plan.

Verify means checked: weights the reload reports missing (initialized at random), unexpected or of
the wrong shape fail the run; so do the thresholds, the task gates, a non-finite output, and a
checkpoint whose KLD is more than ``EXACT_EXPORT_GAP`` from its trial's where every module exports
exactly as simulated.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from quantfix import export as exp
from quantfix import verdict
from quantfix.config import ModelConfig, ThresholdsConfig
from quantfix.errors import QuantfixError
from quantfix.loading import placement_kwargs
from quantfix.evaluate import Metrics
from quantfix.runreport import TrialRecord, Verification

log = logging.getLogger(__name__)

# a checkpoint whose every module the export writes exactly as simulated must measure what its
# trial did: beyond this gap (relative KLD, plus an absolute floor for near-float plans) the run fails
EXACT_EXPORT_GAP = 0.02
INEXACT_EXPORT_WARN = 0.25


@dataclass
class ReloadSpec:
    """How the checkpoint is loaded back: the run's dtype, device and placement settings."""

    dtype: torch.dtype
    device: torch.device
    model: ModelConfig


def reload(ckpt: Path, spec: ReloadSpec, problems: Optional[List[str]] = None):
    """The checkpoint loaded back with plain transformers (what a user's deployment does), with the
    run's device map when it has one (a model larger than one card stays spread out); one it cannot
    load is a failed run, said in one line. What the load reports as missing (initialized at
    random), unexpected (ignored) or of the wrong shape is appended to ``problems``."""
    from transformers import AutoModelForCausalLM

    m = spec.model
    kwargs = placement_kwargs(m.device_map, dict(m.max_memory) if m.max_memory else None, m.offload_folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=spec.dtype, output_loading_info=True,
                                                           trust_remote_code=m.trust_remote_code, **kwargs)
    except QuantfixError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise QuantfixError(f"transformers could not reload the exported checkpoint {ckpt} ({type(e).__name__}: "
                            f"{first}): it is not usable as written; run with export.enabled=false for this model") from e
    if problems is not None:
        problems += load_problems(info)
    bnb = getattr(model, "hf_quantizer", None) is not None and "bitsandbytes" in type(model.hf_quantizer).__name__.lower()
    if not m.device_map and not bnb:
        model.to(spec.device)
    _decompress_now(model)
    if not m.device_map and not bnb:
        _widen_to(model, spec.dtype)
    model.eval()
    return model


@dataclass
class Measured:
    """A reloaded checkpoint's measurements: its metrics, task rows and task failures, and where it
    turns non-finite (None: nowhere)."""

    metrics: Metrics
    tasks: Dict[str, dict]
    task_failed: List[str]
    nonfinite_at: Optional[str] = None


Measure = Callable[[object], Measured]


def verify(ckpt: Path, spec: ReloadSpec, measure: Measure, trial: TrialRecord, thresholds: ThresholdsConfig,
           base: Metrics) -> Tuple[Verification, List[str]]:
    """Reload ``ckpt``, measure it (``measure(model)`` -> metrics, task rows, task failures, where
    it turns non-finite or None: ``Measured``) and judge it against the thresholds and its ``trial``.
    Returns the verification and the warnings the report must carry."""
    problems: List[str] = []
    model = reload(ckpt, spec, problems)
    got = measure(model)
    del model
    m, where = got.metrics, got.nonfinite_at
    gap, agree_fails, warnings = agreement(trial, m)
    fails = problems + verdict.check(m, base, thresholds) + got.task_failed + agree_fails
    if where is not None:
        warnings.append(f"the reloaded checkpoint gives non-finite values, starting at {where}")
        fails.append(f"checkpoint non-finite at {where}")
    return Verification(str(ckpt), exp.dir_size(ckpt), m, fails, got.tasks, gap), warnings


def agreement(trial: TrialRecord, m: Metrics) -> Tuple[Optional[float], List[str], List[str]]:
    """The reloaded checkpoint against the trial that measured its plan: (gap in % of the trial's
    KLD, failures, warnings). Where every quantized module exports exactly as simulated (min/max or
    searched RTN through the engine's observers, GPTQ/imatrix packed as simulated) the KLDs must
    agree within EXACT_EXPORT_GAP, else the run fails naming both; otherwise (AWQ smoothing and
    bitsandbytes quantize again at export) a large gap is warned about."""
    if trial is None or not math.isfinite(m.kld_mean):
        return None, [], []
    sim = trial.metrics.kld_mean
    gap = abs(m.kld_mean - sim) / max(sim, 1e-4)
    exact = all(p.alg.exports_exactly for p in trial.plan.modules.values() if not p.is_float)
    if exact and gap > EXACT_EXPORT_GAP:
        return round(100 * gap, 2), [f"the reloaded checkpoint's KLD {m.kld_mean:.5f} differs from its trial's "
                                     f"{sim:.5f} by {100 * gap:.1f}% (> {100 * EXACT_EXPORT_GAP:.0f}% for an exact "
                                     "export): the checkpoint is not what was measured"], []
    warnings = []
    if not exact and gap > INEXACT_EXPORT_WARN:
        warnings.append(f"the reloaded checkpoint's KLD {m.kld_mean:.5f} differs from its trial's {sim:.5f} by "
                        f"{100 * gap:.0f}% ({trial.plan.rounding_str()}: not all exported as simulated)")
    return round(100 * gap, 2), [], warnings


# a GGUF holds the trial's weights bit for bit (ggml's quantizer, quantfix's imatrix) and its trial
# simulated llama.cpp's activation rounding: llama-perplexity's KLD beyond this gap from the
# trial's (relative, floored at GGUF_GAP_FLOOR for near-float plans) means the file is not what was
# measured, and fails the run. Measured agreement: see gguf_export / benchmarks/README.md
GGUF_EXPORT_GAP = 0.5
GGUF_GAP_FLOOR = 0.002


def llama_metrics(r: Dict) -> Tuple[Metrics, Metrics]:
    """(the GGUF's metrics, the F16 parent's) from llama-perplexity's --kl-divergence statistics,
    over the tokens it scored: PPL, KLD, and 'same top p' as top-1 agreement."""
    n = int(r["n_tokens"])
    p99 = r["kld_p99"] if r.get("kld_p99") is not None else r["kld_mean"]
    q = Metrics(r["ppl"], math.log(r["ppl"]) if r["ppl"] > 0 else math.nan, r["kld_mean"], p99,
                r.get("kld_max", p99), r["same_top_p"], n)
    base = Metrics(r["ppl_base"], math.log(r["ppl_base"]) if r["ppl_base"] > 0 else math.nan, 0.0, 0.0, 0.0, 1.0, n)
    return q, base


def verify_gguf(path: Path, measure: Callable[[], Dict], trial: TrialRecord,
                thresholds: ThresholdsConfig) -> Tuple[Verification, List[str]]:
    """A GGUF judged by llama.cpp's own tool: llama-perplexity's KLD, PPL (against the F16
    parent's own PPL on the same tokens) and same-top-token share against the thresholds, and its
    KLD against the trial that predicted it (``GGUF_EXPORT_GAP``). Any failure fails the verdict."""
    r = measure()
    m, base = llama_metrics(r)
    fails = verdict.check(m, base, thresholds)
    warnings: List[str] = []
    sim = trial.metrics.kld_mean if trial is not None else None
    gap = None
    if sim is not None and math.isfinite(m.kld_mean):
        gap = abs(m.kld_mean - sim) / max(sim, GGUF_GAP_FLOOR)
        if gap > GGUF_EXPORT_GAP:
            fails.append(f"llama-perplexity's KLD {m.kld_mean:.5f} differs from the trial's prediction {sim:.5f} by "
                         f"{100 * gap:.0f}% (> {100 * GGUF_EXPORT_GAP:.0f}%): the GGUF is not what was measured")
    r = dict(r, ppl_increase_pct=round(100 * (m.ppl / base.ppl - 1), 3) if base.ppl > 0 else None)
    v = Verification(str(path), Path(path).stat().st_size, m, fails, export_gap_pct=None if gap is None else
                     round(100 * gap, 2), format="gguf", llama_perplexity=r, predicted_kld=sim)
    return v, warnings


@torch.no_grad()
def _widen_to(model, dtype: torch.dtype) -> None:
    """Cast the floating tensors that transformers left narrower than the requested ``dtype``:
    5.17 does not cast weights it renames on load (GPT-NeoX's ``embed_out`` -> ``lm_head``,
    Mixtral's ``block_sparse_moe.gate`` -> ``mlp.gate``), so a float32 reload computes with a float16
    head or router and fails (``expected m1 and m2 to have the same dtype``). Widening is exact."""
    if not dtype.is_floating_point:
        return
    bits = torch.finfo(dtype).bits
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and t.is_floating_point() and t.dtype != dtype and torch.finfo(t.dtype).bits < bits:
                t.data = t.data.to(dtype)


def load_problems(info: Dict[str, list]) -> List[str]:
    """One line per kind of key trouble in transformers' loading info."""
    out = []
    for key, what in (("missing_keys", "missing from the checkpoint (initialized at random on reload)"),
                      ("unexpected_keys", "in the checkpoint but ignored on reload"),
                      ("mismatched_keys", "of the wrong shape (initialized at random on reload)")):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(key) or []]
        if keys:
            out.append(f"checkpoint weights {what}: {len(keys)}, e.g. {sorted(keys)[0]}")
    return out


def _decompress_now(model) -> None:
    """compressed-tensors decompresses a loaded checkpoint in a forward pre-hook on the first call,
    and that hook swaps accelerate's hooks for its own offloading. On a model spread over several
    GPUs the swap happens after the top-level call already picked accelerate's forward, which then
    fails ("no attribute '_hf_hook'"; measured on 2 H200s, transformers 5.17, compressed-tensors
    0.19). Running that pre-hook once, outside any forward, leaves the model ready."""
    handle = getattr(model, "ct_decompress_hook", None)
    if handle is None:
        return
    hook = model._forward_pre_hooks.get(handle.id)
    if hook is not None:
        hook(model, ())
    if getattr(model, "ct_decompress_hook", None) is not None:  # the hook removes itself; make sure
        model.ct_decompress_hook.remove()
        delattr(model, "ct_decompress_hook")
