"""Simulated (fake) quantization: plain tensor math, no modules, no engines.

The formulas match compressed-tensors (the format llm-compressor writes), so an RTN plan
simulated here gives the same weights as the exported checkpoint: symmetric scale =
absmax / ((2^b - 1) / 2), codes clamped to [-2^(b-1), 2^(b-1) - 1]; asymmetric scale =
(max - min) / (2^b - 1) with a rounded zero point. GPTQ uses fixed per-group scales from the
original weights (as llm-compressor 0.14 does) and the Hessian of the layer input; AWQ searches
the per-input-channel scale exponent on the same Hessian, since ||dW X||^2 = tr(dW H dW^T).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def qparams(W: Tensor, bits: int, group_size: int, symmetric: bool) -> Tuple[Tensor, Tensor]:
    """Per-(row, group) scale and zero point, shapes [out, n_groups]."""
    out_f, in_f = W.shape
    g = group_size or in_f
    Wg = W.reshape(out_f, in_f // g, g)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = torch.clamp(Wg.amin(-1), max=0)
    hi = torch.clamp(Wg.amax(-1), min=0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.clamp(torch.round(qmin - lo / torch.where(scale == 0, torch.ones_like(scale), scale)), qmin, qmax)
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
    return scale, zero


def quant_dequant(x: Tensor, scale: Tensor, zero: Tensor, bits: int, out_dtype=None) -> Tensor:
    """Integers computed in x's dtype (as the engine packs them); dequantized in ``out_dtype``
    (default x's): a float16 checkpoint reloaded in float32 multiplies in float32."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.clamp(torch.round(x / scale + zero), qmin, qmax)
    if out_dtype is not None and out_dtype != x.dtype:
        q, zero, scale = q.to(out_dtype), zero.to(out_dtype), scale.to(out_dtype)
    return (q - zero) * scale


def rtn(W: Tensor, bits: int, group_size: int = 0, symmetric: bool = True) -> Tensor:
    """Round-to-nearest quantize-dequantize, per output channel (group_size=0) or per group."""
    out_f, in_f = W.shape
    g = group_size or in_f
    W32 = W.float()
    scale, zero = qparams(W32, bits, group_size, symmetric)
    Wg = W32.reshape(out_f, in_f // g, g)
    return quant_dequant(Wg, scale[..., None], zero[..., None], bits).reshape(out_f, in_f).to(W.dtype)


def _hinv_upper(H: Tensor, W: Tensor, damp: float) -> Tuple[Tensor, Tensor]:
    """Upper Cholesky factor of the damped inverse Hessian; dead input columns get zero weight."""
    H = H.clone()
    W = W.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    for attempt in range(5):
        try:
            L = torch.linalg.cholesky(H)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True), W
        except torch.linalg.LinAlgError:
            H.diagonal().add_(damp * 10 ** attempt * torch.mean(torch.diag(H)))
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after dampening")


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's knobs: Hessian dampening (share of its mean diagonal), columns per block, and the
    column order (descending diag(H): the engine's default "static" activation order)."""

    damp: float = 0.01
    block_size: int = 128
    actorder: bool = True


def gptq(W: Tensor, H: Tensor, bits: int, group_size: int = 0, symmetric: bool = True,
         qparams_: Optional[Tuple[Tensor, Tensor]] = None, opts: GPTQOptions = GPTQOptions()) -> Tensor:
    """GPTQ (Frantar et al. 2022) as llm-compressor 0.14 runs it: per-group scales fixed before the
    sweep (``qparams_`` = (scale, zero) [out, n_groups], default min/max of the original weights),
    columns visited in descending diag(H) order (``opts.actorder``), each column keeping its
    original group's scale."""
    damp, block_size, actorder = opts.damp, opts.block_size, opts.actorder
    out_f, in_f = W.shape
    g = group_size or in_f
    W0 = W.float()
    scale, zero = qparams_ if qparams_ is not None else qparams(W0, bits, group_size, symmetric)  # [out, n_groups]
    scale, zero = scale.float().to(W0.device), zero.float().to(W0.device)
    H = H.float().to(W.device)
    perm = torch.argsort(torch.diagonal(H), descending=True) if actorder else None
    if perm is not None:
        W0, H = W0[:, perm], H[perm][:, perm]
    g_idx = (perm if perm is not None else torch.arange(in_f, device=W0.device)) // g
    Hinv, Wd = _hinv_upper(H, W0, damp)
    Q = torch.zeros_like(Wd)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = Wd[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            s, z = scale[:, g_idx[col]], zero[:, g_idx[col]]
            w = W1[:, i]
            q = quant_dequant(w, s, z, bits)
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Wd[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(W.dtype)


def output_error(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """Sum over calibration tokens of ||(W - Wq) x||^2, from the Hessian H = sum x x^T."""
    D = (W.float() - Wq.float()).to(H.device)
    return float(torch.einsum("oi,ij,oj->", D, H.float(), D))


def awq_scales(act_absmean: Tensor, alpha: float) -> Tensor:
    s = act_absmean.float().clamp(min=1e-5).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def awq_search(weights: list[Tensor], H: Tensor, act_absmean: Tensor, bits: int, group_size: int,
               symmetric: bool, grid: int = 20) -> Tuple[float, Tensor]:
    """AWQ (Lin et al. 2023): one scale exponent alpha for all modules reading one input,
    chosen on a grid to minimize their summed output error. Returns (alpha, scales)."""
    best: Tuple[float, Optional[float], Optional[Tensor]] = (0.0, None, None)
    for k in range(grid):
        alpha = k / grid
        s = awq_scales(act_absmean, alpha).to(weights[0].device)
        err = sum(output_error(W, rtn(W.float() * s, bits, group_size, symmetric) / s, H) for W in weights)
        if best[1] is None or err < best[1]:
            best = (alpha, err, s)
    return best[0], best[2]


def awq(W: Tensor, scales: Tensor, bits: int, group_size: int = 0, symmetric: bool = True) -> Tensor:
    """The effective weight of an AWQ-quantized module: Q(W diag(s)) diag(1/s)."""
    s = scales.to(W.device).float()
    return (rtn(W.float() * s, bits, group_size, symmetric) / s).to(W.dtype)


def llm_int8_weight(W: Tensor, outlier_cols: Optional[Tensor] = None) -> Tensor:
    """LLM.int8 weight side: per-row absmax int8; outlier input columns stay in float."""
    Wq = rtn(W, 8, 0, True)
    if outlier_cols is not None and outlier_cols.numel():
        Wq[:, outlier_cols] = W[:, outlier_cols]
    return Wq


NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def nf4(W: Tensor, block_size: int = 64) -> Tensor:
    """NF4 (QLoRA): blockwise absmax over the flattened weight, nearest of 16 normal-float levels."""
    flat = W.float().reshape(-1, block_size)
    absmax = flat.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    levels = NF4_LEVELS.to(W.device)
    idx = torch.argmin((flat / absmax)[..., None].sub(levels).abs(), dim=-1)
    return (levels[idx] * absmax).reshape(W.shape).to(W.dtype)
