"""Weight scale search: bit-exact replicas of llm-compressor 0.14 weight observers.

Findings (llm-compressor 0.14.0.1 oneshot on CPU, tiny Llama with x10 columns, 8x32 tokens, int4 g32, 2304 groups;
minmax scales would match only 40-60% of them): (a) QuantizationModifier with "observer": "imatrix_mse" works
in oneshot (it infers the sequential pipeline); saved weight_scale == search_qparams(W, "imatrix", importance=
E[x^2] measured here in fp32) in 2304/2304 groups (fp32, sym) and 2303/2304 (bf16, asym; zero points 2304/2304).
(b) GPTQModifier observes the ORIGINAL weights: "mse" 2304/2304 (fp32 and bf16); "imatrix_mse" 2304/2304 with the
observer's own E[x^2] but 2275/2304 with the fp model's (layer 1 sees GPTQ-quantized layer-0 outputs, propagate_error).

`search_qparams(W, bits, group_size, symmetric, method)` returns (scale, zero), both shaped
[out, n_groups] (group_size 0 = per output channel, n_groups 1) in W's dtype, like
`fake.qparams`; `zero.to(torch.int8)` is the stored `weight_zero_point`.
  * "minmax"  = `fake.qparams` (llm-compressor's default `memoryless_minmax`).
  * "mse"     = `memoryless_mse` (what `"observer": "mse"` becomes for weights): shrink
                min/max by p = 1 - i/grid, i < int(maxshrink*grid), keep per-group best of
                sum |QDQ(w) - w|^norm (strict <), stop after `patience` consecutive steps in
                which NO group improved. Everything in the weight dtype (bf16 error sums too).
  * "imatrix" = `imatrix_mse`: the same search with i <= max(1, int(maxshrink*grid)),
                defaults maxshrink 0.95, grid 20, norm 3.0, patience 5 (p = 1.00 .. 0.05);
                QDQ in the weight dtype, error |QDQ(w) - w|^norm * imp in float32, where
                imp = E[x^2] / (mean(E[x^2]) + tiny) per input column. Without usable
                importance (None, non-finite, negative, all zero, wrong length) the library
                falls back to the unweighted error with the same imatrix defaults; so do we.
The math follows compressed-tensors 0.19 `calculate_qparams` / `fake_quantize` (INT only):
sym scale = absmax / (bit_range / 2), asym scale = (max - min) / bit_range and
zp = round(clamp(qmin - min / scale)), zero scales -> finfo(dtype).eps; QDQ =
(round(clamp(x / s + zp)) - zp) * s. The CPU eager path is replicated (the CUDA Triton MSE
kernel uses per-group patience and is NOT what this reproduces).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from quantfix.quantize import fake

Tensor = torch.Tensor

__all__ = ["METHODS", "importance_from_activations", "quantize_with", "search_imatrix_many", "search_qparams"]

METHODS = ("minmax", "mse", "imatrix")

_MSE_DEFAULTS = {"maxshrink": 0.20, "patience": 5, "grid": 100.0, "norm": 2.4, "expand": 1.0}
_IMATRIX_DEFAULTS = {"maxshrink": 0.95, "patience": 5, "grid": 20, "norm": 3.0, "expand": 1.0}


def _observed(W: Tensor, group_size: int) -> Tensor:
    """The observer's view of a weight: (1, rows, n_groups, group) or (1, rows, 1, cols)."""
    if not group_size:
        return W.unsqueeze(-2).unsqueeze(0)
    if W.shape[-1] % group_size:
        raise ValueError(f"in_features {W.shape[-1]} is not divisible by group_size {group_size}")
    return W.unflatten(-1, (-1, group_size)).unsqueeze(0)


def _range(bits: int, device=None) -> tuple[Tensor, Tensor]:
    """compressed-tensors `calculate_range` for INT: float32 0-dim q_min, q_max."""
    bit_range = 2.0 ** bits  # filled where they are used: a host tensor copied to an accelerator waits for it
    return (torch.full((), -bit_range / 2, dtype=torch.float32, device=device),
            torch.full((), bit_range / 2 - 1, dtype=torch.float32, device=device))


def _calc_qparams(mn: Tensor, mx: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """compressed-tensors `calculate_qparams` for INT weights (no global scale, no scale_dtype).
    Returns the scale in mn's dtype and the int8 zero point."""
    mn = torch.min(mn, torch.zeros_like(mn))
    mx = torch.max(mx, torch.zeros_like(mx))
    bit_min, bit_max = _range(bits, mn.device)
    bit_range = bit_max - bit_min
    if symmetric:
        max_val_pos = torch.max(torch.abs(mn), torch.abs(mx))
        scales = max_val_pos / (bit_range.to(max_val_pos.dtype) / 2)
        zps = torch.zeros(scales.shape, dtype=mn.dtype, device=mn.device)
    else:
        scales = (mx - mn) / bit_range.to(mx.dtype)
        zps = bit_min - (mn / scales)
        zps = torch.clamp(zps, bit_min, bit_max)
    eps = torch.finfo(scales.dtype).eps
    scales = torch.where(scales == 0, torch.full((), eps, dtype=scales.dtype, device=scales.device), scales)
    zp_dtype = torch.int8 if bits <= 8 else (torch.int16 if bits <= 16 else torch.int32)
    ii = torch.iinfo(zp_dtype)
    zps = torch.round(torch.clamp(zps, ii.min, ii.max)).to(zp_dtype)
    return scales, zps


def _qdq(x: Tensor, scale: Tensor, zp: Tensor | None, q_min: Tensor, q_max: Tensor) -> Tensor:
    """compressed-tensors `_quantize_dequantize` (INT): clamp, round half-to-even, rescale. ``zp`` None:
    a symmetric grid's zero point 0 left out (the engine's += 0 / -= 0 only turn a -0 into +0: the
    searches' errors come out the same bits). On the CPU the bounds are clamped to as numbers: the same
    values (integers, exact in any float dtype) and bits, but a half-precision weight's clamp to float32 tensor
    bounds takes a slow path (6.3 ms against 0.18 ms for a demo down_proj's grid in float16: the options
    simulated in the export's float16 spent a fifth of their time there)."""
    if q_min.device.type == "cpu":
        q_min, q_max = q_min.item(), q_max.item()
    if zp is None:
        return (x / scale).clamp_(q_min, q_max).round_().mul_(scale)
    scaled = x / scale
    scaled += zp.to(x.dtype)
    if scaled.dtype != scale.dtype:  # never in the searches (scale has the weight's dtype)
        quantized = torch.round(torch.clamp(scaled, q_min, q_max))
        return (quantized.to(scale.dtype) - zp.to(scale.dtype)) * scale
    # the same ops as compressed-tensors, done in place (same kernels, same bits, less memory)
    return scaled.clamp_(q_min, q_max).round_().sub_(zp.to(scale.dtype)).mul_(scale)


def _prepare_importance(importance: Tensor | None, W: Tensor, group_size: int) -> Tensor | None:
    """IMatrixMSEObserver._prepare_importance: validate, normalize by the mean, broadcast."""
    if importance is None:
        return None
    imp = importance.detach().reshape(-1)
    if bool(~torch.isfinite(imp).all() | (imp < 0).any() | (imp == 0).all()):  # one read
        return None
    if imp.numel() != W.shape[-1]:
        return None
    imp = imp.to(device=W.device, dtype=torch.float32)
    imp = imp / (imp.mean() + torch.finfo(torch.float32).tiny)
    imp_2d = imp.unsqueeze(0).expand(W.shape[0], -1)
    return _observed(imp_2d, group_size)


def _kwargs(defaults: dict, observer_kwargs: dict) -> dict:
    unknown = set(observer_kwargs) - set(defaults) - {"strict", "triton_error_buffer"}
    if unknown:
        raise TypeError(f"unknown observer kwargs: {sorted(unknown)}")
    kw = dict(defaults)
    kw.update({k: v for k, v in observer_kwargs.items() if k in defaults})
    return kw


@torch.no_grad()
def _search_mse(obs: Tensor, bits: int, symmetric: bool, maxshrink: float, patience: int,
                grid: float, norm: float, expand: float) -> tuple[Tensor, Tensor]:
    """llmcompressor.observers.mse_quant._grid_search_mse (CPU eager path)."""
    if expand < 1.0:
        raise ValueError(f"expand value must be at least 1.0, got {expand}")
    q_min, q_max = _range(bits, obs.device)
    min_val = torch.amin(obs, dim=(0, -1)) * expand
    max_val = torch.amax(obs, dim=(0, -1)) * expand
    best_error = torch.full_like(min_val, torch.finfo(min_val.dtype).max)
    best_min, best_max = min_val.clone(), max_val.clone()
    no_improve = 0
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        smin, smax = min_val * p, max_val * p
        s, z = _calc_qparams(smin, smax, bits, symmetric)
        q = _qdq(obs, s.unsqueeze(-1), None if symmetric else z.unsqueeze(-1), q_min, q_max).to(obs.dtype)
        err = torch.sum(q.sub_(obs).abs_().pow_(norm), dim=(0, -1))
        improved = err < best_error
        if torch.any(improved):
            best_error[improved] = err[improved]
            best_min[improved] = smin[improved]
            best_max[improved] = smax[improved]
            no_improve = 0
        else:
            no_improve += 1
            if no_improve >= patience:
                break
    return best_min, best_max


def _imatrix_steps(obs: Tensor, bits: int, symmetric: bool, imp: Tensor | None, bounds, settings):
    """The imatrix search's grid, one step at a time: (weighted error per (row, group), the step's
    shrunk min, max); the range shrinks by 1/grid a step, down to maxshrink."""
    (min_val, max_val), (maxshrink, grid, norm) = bounds, settings
    q_min, q_max = _range(bits, obs.device)
    obs_f = obs.float()
    for i in range(max(1, int(maxshrink * grid)) + 1):
        p = 1 - i / grid
        smin, smax = p * min_val, p * max_val
        s, z = _calc_qparams(smin, smax, bits, symmetric)
        q = _qdq(obs, s.unsqueeze(-1), None if symmetric else z.unsqueeze(-1), q_min, q_max).float()
        q.sub_(obs_f).abs_().pow_(norm)
        if imp is not None:
            q.mul_(imp)
        yield q.sum(dim=(0, -1)), smin, smax


@torch.no_grad()
def _search_imatrix(obs: Tensor, bits: int, symmetric: bool, imp: Tensor | None,
                    kwargs: dict, one_sync: bool | None = None) -> tuple[Tensor, Tensor]:
    """llmcompressor.observers.imatrix._grid_search (``kwargs``: maxshrink, patience, grid, norm, expand).
    ``one_sync`` (default: off the CPU): every grid step computed without reading a result back,
    then the engine's early stop replayed from one read (``_replay_imatrix``), the same result."""
    maxshrink, patience, grid, norm, expand = _imatrix_settings(kwargs)
    min_val = torch.amin(obs, dim=(0, -1)) * expand
    max_val = torch.amax(obs, dim=(0, -1)) * expand
    if one_sync if one_sync is not None else obs.device.type != "cpu":
        return _replay_imatrix(obs, bits, symmetric, imp, (min_val, max_val), (maxshrink, patience, grid, norm))
    best_error = torch.full(min_val.shape, torch.finfo(torch.float32).max, dtype=torch.float32,
                            device=min_val.device)
    best_min, best_max = min_val.clone(), max_val.clone()
    no_improve = 0
    for err, smin, smax in _imatrix_steps(obs, bits, symmetric, imp, (min_val, max_val), (maxshrink, grid, norm)):
        improved = err < best_error
        if torch.any(improved):
            best_error[improved] = err[improved]
            best_min[improved] = smin[improved]
            best_max[improved] = smax[improved]
            no_improve = 0
        else:
            no_improve += 1
            if patience > 0 and no_improve >= patience:
                break
    return best_min, best_max


def _imatrix_settings(kwargs: dict) -> tuple:
    """(maxshrink, patience, grid, norm, expand) of the imatrix observer's kwargs, checked."""
    maxshrink, patience, grid, norm, expand = (kwargs[k] for k in ("maxshrink", "patience", "grid", "norm", "expand"))
    if grid <= 0 or patience < 0 or not (0 <= maxshrink <= 1) or not (
            isinstance(norm, (int, float)) and math.isfinite(norm) and norm > 0):
        raise ValueError(f"bad imatrix observer kwargs: maxshrink={maxshrink} grid={grid} "
                         f"patience={patience} norm={norm}")
    return maxshrink, patience, grid, norm, expand


def _patience_stop(improved: list, patience: int) -> int:
    """The last grid step the engine's loop runs, given which steps improved any of its groups."""
    no_improve = 0
    for i, any_i in enumerate(improved):
        no_improve = 0 if any_i else no_improve + 1
        if not any_i and patience > 0 and no_improve >= patience:
            return i
    return len(improved) - 1


def _replay_imatrix(obs: Tensor, bits: int, symmetric: bool, imp: Tensor | None, bounds, settings,
                    segments: list | None = None):
    """``_search_imatrix``'s loop without its per-step reads (on an accelerator each ``torch.any`` and
    masked write waits for the device: four waits a step, 20 steps, every module and width): every
    step's error, then one read of which steps improved anything, the engine's patience stop replayed
    on it, and per (row, group) the step of its last strict improvement up to the stop. ``segments``:
    ``obs`` holds several weights' groups one after another (``search_imatrix_many``), this many
    (row, group)s each: each weight's stop is replayed on its own groups, as its own search stops."""
    min_val, max_val = bounds
    maxshrink, patience, grid, norm = settings
    errs, mins, maxs = zip(*_imatrix_steps(obs, bits, symmetric, imp, bounds, (maxshrink, grid, norm)))
    err = torch.stack(errs)
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)  # NaN never improves
    big = torch.full_like(err[:1], torch.finfo(torch.float32).max)
    before = torch.cat([big, torch.minimum(torch.cummin(err, dim=0).values[:-1], big)])  # best so far
    improved = err < before
    steps = torch.arange(len(errs), device=err.device).view(-1, *([1] * (err.dim() - 1)))
    if segments is None:
        last = _patience_stop(improved.flatten(1).any(dim=1).tolist(), patience)  # the one read
        pick = torch.where(improved[: last + 1], steps[: last + 1], -1).amax(dim=0)  # -1: never improved
    else:
        flat = improved.flatten(1)  # [steps, every weight's (row, group)s]
        seg = torch.repeat_interleave(torch.arange(len(segments), device=err.device),
                                      torch.tensor(segments, device=err.device))
        hits = torch.zeros(len(errs), len(segments), device=err.device).index_add_(1, seg, flat.float())
        lasts = [_patience_stop(col, patience) for col in (hits > 0).T.tolist()]  # the one read
        until = torch.tensor(lasts, device=err.device)[seg].view(1, *err.shape[1:])
        pick = torch.where(improved & (steps <= until), steps, -1).amax(dim=0)
    take = pick.clamp(min=0).unsqueeze(0)
    best_min = torch.where(pick >= 0, torch.stack(mins).gather(0, take).squeeze(0), min_val)
    best_max = torch.where(pick >= 0, torch.stack(maxs).gather(0, take).squeeze(0), max_val)
    return best_min, best_max


@torch.no_grad()
def search_qparams(W: Tensor, bits: int, group_size: int, symmetric: bool, method: str = "minmax",
                   importance: Tensor | None = None, **observer_kwargs) -> tuple[Tensor, Tensor]:
    """Per-(row, group) scale and zero point as llm-compressor's weight observer would store them.

    W: [out, in] weight, searched in its own dtype (bf16 stays bf16). group_size 0 = per channel.
    method: "minmax" | "mse" (memoryless_mse) | "imatrix" (imatrix_mse).
    importance: for "imatrix", the per-input-channel E[x^2] (length in_features), i.e. the
        observer's `_imatrix_sum / _imatrix_count` in float32 (see `importance_from_activations`).
    observer_kwargs: maxshrink, patience, grid, norm, expand (the observers' `observer_kwargs`).
    Returns (scale, zero) shaped [out, n_groups] in W's dtype; zero is integer-valued
    (`zero.to(torch.int8)` equals the stored weight_zero_point).
    """
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {W.dtype}")
    W = W.detach()
    obs = _observed(W, group_size)  # also checks that group_size divides in_features
    if method == "minmax":
        if importance is not None or observer_kwargs:
            raise ValueError("minmax takes no importance or observer kwargs")
        return fake.qparams(W, bits, group_size, symmetric)
    if method == "mse":
        if importance is not None:
            raise ValueError("importance is only used by method='imatrix'")
        mn, mx = _search_mse(obs, bits, symmetric, **_kwargs(_MSE_DEFAULTS, observer_kwargs))
    elif method == "imatrix":
        imp = _prepare_importance(importance, W, group_size)
        mn, mx = _search_imatrix(obs, bits, symmetric, imp, _kwargs(_IMATRIX_DEFAULTS, observer_kwargs))
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    scale, zp = _calc_qparams(mn, mx, bits, symmetric)
    return scale, zp.to(scale.dtype)


# (row, group) elements one batched search holds (its float32 temporaries take a few times this)
BATCH_ELEMENTS = 2 ** 25


def batches(sizes: list, limit: int | None = None) -> list:
    """Consecutive indexes of ``sizes`` grouped so that each group's total stays within ``limit``
    (default ``BATCH_ELEMENTS``); an item larger than the limit is a group of its own."""
    limit = BATCH_ELEMENTS if limit is None else limit
    out: list = []
    total = 0
    for i, n in enumerate(sizes):
        if out and total + n <= limit:
            out[-1].append(i)
            total += n
        else:
            out.append([i])
            total = n
    return out


@torch.no_grad()
def search_imatrix_many(Ws: list, bits: int, group_size: int, symmetric: bool, importances: list,
                        **observer_kwargs) -> list:
    """``search_qparams(W, bits, group_size, symmetric, "imatrix", importance=imp)`` for each W of ``Ws``
    with its importance (None: unweighted), as a few grid searches over many weights' (row, group)s at
    once: one per group length, dtype and device, within ``BATCH_ELEMENTS``. Each (row, group) gets the
    single search's arithmetic (an absent importance weighs by exactly 1) and each weight the early stop
    its own search makes (``_replay_imatrix``'s segments): the same scales and zero points, bit for bit
    (tests). On an accelerator one batch is one short kernel sequence where each search was its own (the
    demo's 2100 imatrix searches at 15 ms each were 31 of the option simulation's 54 s on an H100)."""
    kw = _kwargs(_IMATRIX_DEFAULTS, observer_kwargs)
    settings = _imatrix_settings(kw)  # checked before any search
    out: list = [None] * len(Ws)
    buckets: dict = {}
    for i, W in enumerate(Ws):
        if W.dim() != 2 or not W.is_floating_point():
            raise ValueError(f"expected a 2-D floating-point weight, got {tuple(W.shape)} {W.dtype}")
        g = group_size or W.shape[-1]
        if W.shape[-1] % g:
            raise ValueError(f"in_features {W.shape[-1]} is not divisible by group_size {group_size}")
        buckets.setdefault((g, W.dtype, W.device), []).append(i)
    for (g, _, _), idx in buckets.items():
        for group in batches([Ws[i].numel() for i in idx]):
            chunk = [idx[k] for k in group]
            if len(chunk) == 1:  # alone: the single search (no copy of its importance per row)
                out[chunk[0]] = search_qparams(Ws[chunk[0]], bits, group_size, symmetric, "imatrix",
                                               importances[chunk[0]], **kw)
            else:
                _search_chunk(Ws, importances, chunk, (bits, group_size, symmetric, g), settings, out)
    return out


def _search_chunk(Ws: list, importances: list, chunk: list, spec: tuple, settings: tuple, out: list) -> None:
    """One batched imatrix search over the weights ``chunk`` indexes (same group length ``g``; ``settings``
    as ``_imatrix_settings`` returns them); results into ``out``."""
    bits, group_size, symmetric, g = spec
    maxshrink, patience, grid, norm, expand = settings
    obs = torch.cat([_observed(Ws[i].detach(), group_size).reshape(1, -1, 1, g) for i in chunk], dim=1)
    imps = [_prepare_importance(importances[i], Ws[i], group_size) for i in chunk]
    imp = None
    if any(m is not None for m in imps):
        imp = torch.cat([(m if m is not None else torch.ones((), device=obs.device)).expand(
            *_observed(Ws[i], group_size).shape).reshape(1, -1, 1, g) for i, m in zip(chunk, imps)], dim=1)
    sizes = [Ws[i].numel() // g for i in chunk]
    min_val = torch.amin(obs, dim=(0, -1)) * expand
    max_val = torch.amax(obs, dim=(0, -1)) * expand
    mn, mx = _replay_imatrix(obs, bits, symmetric, imp, (min_val, max_val), (maxshrink, patience, grid, norm), sizes)
    scale, zp = _calc_qparams(mn, mx, bits, symmetric)
    for i, s, z in zip(chunk, scale.split(sizes), zp.split(sizes)):
        rows = Ws[i].shape[0]
        out[i] = (s.reshape(rows, -1), z.to(s.dtype).reshape(rows, -1))


@torch.no_grad()
def quantize_with(W: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, out_dtype=None) -> Tensor:
    """Fake-quantize W with given [out, n_groups] qparams, in W's dtype, exactly as
    compressed-tensors `fake_quantize` does with the stored scale / zero point; dequantized in
    ``out_dtype`` (default W's: the dtype the checkpoint is reloaded in)."""
    out_f, in_f = W.shape
    g = group_size or in_f
    Wg = W.reshape(out_f, in_f // g, g)
    s = scale.to(W.dtype).reshape(out_f, -1)[..., None]
    z = zero.to(W.dtype).reshape(out_f, -1)[..., None]
    out_dtype = out_dtype or W.dtype
    return fake.quant_dequant(Wg, s, z, bits, out_dtype).reshape(out_f, in_f).to(out_dtype)


@torch.no_grad()
def importance_from_activations(xs: Iterable[Tensor]) -> Tensor:
    """Per-input-channel E[x^2] accumulated like the imatrix_mse forward-pre hook: a float32
    running sum of per-batch sums of x^2 over all leading dims, divided by the token count."""
    total: Tensor | None = None
    count = 0
    for x in xs:
        x_f = x.detach().to(torch.float32)
        token_sum = x_f.pow(2).sum(dim=list(range(x_f.dim() - 1)))
        total = torch.zeros_like(token_sum) if total is None else total
        total.add_(token_sum)
        count += math.prod(x_f.shape[:-1])
    if total is None or count == 0:
        raise ValueError("no activations")
    return total / torch.tensor(count, dtype=torch.int64).float()
