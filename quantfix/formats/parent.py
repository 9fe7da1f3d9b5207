"""Is an existing checkpoint a quantization of its float parent? Per module, the signs of the
dequantized checkpoint weight Q against the float weight W, weighted by |W|, over the values Q
keeps (not rounded to zero):

    agreement = sum of |W| sign(Q) sign(W) / sum of |W|   (over Q != 0)

Why this statistic:
- A quantizer keeps the sign of every weight it does not round to zero, except where its error
  exceeds the weight: round-to-nearest with zero on the grid (compressed-tensors and GPTQ-format
  RTN, NF4, int8, Q4_0 / Q8_0) flips none; a float minimum (Q4_1, K-quants) or GPTQ's error
  feedback flips only weights smaller than their rounding error, which carry little |W|.
- It is blind to any positive rescaling of the checkpoint: AWQ stores Q(W diag(s)) (the smoothing
  folded into the previous norm or linear), groups have their own scales.
- Another model's weight is independent of W: agreement 0 +- about 1.25 / sqrt(n), n values.
- Relative error ||Q - W|| / ||W|| does not separate the two (honest 2-bit GPTQ per channel up
  to 1.43 on SmolLM2, a re-initialized parent's weight 1.00, AWQ as stored up to 7.4), and the
  cosine of Q and W drops to 0.24 on AWQ as stored.

Measured (2026-12; min..max over modules):
- SmolLM2-135M (the demo's float parent; layers 0, 15, 29, 21 modules), simulated with
  quantfix's own quantizers: RTN and mse 2-8 bits (groups 16, 32, 64, per channel; sym and asym),
  NF4, int8, gguf's Q4_0 / Q5_0 / Q8_0, AWQ (effective and as stored, alpha 0.5 and 1): 1.000;
  Q4_1 / Q5_1 >= 0.996; GPTQ (calibrated on pydoc) 4-bit >= 0.993, 3-bit >= 0.974, 2-bit g32 >=
  0.921, 2-bit per channel >= 0.895; a Q2_K-like grid (2-bit, float minimum, 16-value blocks,
  4-bit sub-scales; gguf cannot write llama.cpp's K-quants) 0.922..0.951. Another weight of the
  same shape (the same module 13 layers on, float or 2-4 bits; a re-initialized one): -0.013..0.009.
- The demo's own GGUF (Q4_1) against its converted parent, and re-quantized to Q4_0: 1.000 on all
  210 modules; against a re-initialized parent of the same config: about 0.001, all refused.
- Tiny Llama (hidden 64), checkpoints written by the libraries (AutoRound GPTQ 2/4-bit and AWQ,
  quantfix's compressed-tensors RTN / GPTQ 2- and 4-bit / llm-compressor AWQ, bitsandbytes int8 /
  nf4 / fp4, GGUF Q4_0 / Q4_1 / Q8_0): >= 0.988 read against their parent, -0.078..0.085 against
  another seed's model (2048-value modules, 2-bit: the widest noise seen).
The limit 0.5 sits 0.4 below the lowest honest value and 0.4 above the widest mismatch. A module
is compared on at most ``MAX_ROWS`` evenly spaced rows (noise at 256 x 4096 values: 0.002).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from quantfix.errors import QuantfixError

LIMIT = 0.5
MAX_ROWS = 256


def agreement(Q: torch.Tensor, W: torch.Tensor) -> Optional[float]:
    """|W|-weighted sign agreement of Q with W over the values Q keeps; 0 when Q keeps none of a
    nonzero W (min/max scales put the largest weight of every group on a nonzero level: no
    quantizer zeroes a whole weight); None when W is all zero (no evidence)."""
    W = W.float()
    sq = torch.sign(Q).float()
    total = float((W.abs() * sq.abs()).sum())
    if total > 0:
        return float((sq * W).sum()) / total  # |W| sign(W) = W
    return 0.0 if bool((W != 0).any()) else None


def _rows(n: int) -> torch.Tensor:
    if n <= MAX_ROWS:
        return torch.arange(n)
    return torch.linspace(0, n - 1, MAX_ROWS).round().long()


def agreements(weights: Dict[str, torch.Tensor], model_fp) -> Dict[str, float]:
    """Module -> agreement of the checkpoint's dequantized weight with the float parent's."""
    from quantfix.weights import weight_of

    mods = dict(model_fp.named_modules())
    out = {}
    for name, Q in weights.items():
        rows = _rows(Q.shape[0])
        W = weight_of(mods[name])
        a = agreement(Q[rows].cpu(), W[rows.to(W.device)].to("cpu", torch.float32))
        if a is not None:
            out[name] = a
    return out


def check(path: str, weights: Dict[str, torch.Tensor], model_fp) -> Dict[str, float]:
    """Refuse a checkpoint one of whose modules is not a quantization of the float parent's weight;
    returns every module's agreement."""
    a = agreements(weights, model_fp)
    bad: List[Tuple[str, float]] = [(n, v) for n, v in a.items() if v < LIMIT]
    if bad:
        name, v = bad[0]
        raise QuantfixError(
            f"{path} is not a quantization of the float model: {name} keeps the float weight's signs at {v:.3f} "
            f"(|W|-weighted; a 2-8 bit quantization of it gives 0.9-1, another model's weight ~0; limit {LIMIT}; "
            f"{len(bad)} of {len(a)} modules below): model.name_or_path must be the float model this checkpoint "
            "was quantized from" + ("" if len(bad) == len(a) else " (if it is: some modules only, the checkpoint is "
                                    "damaged; re-download it)"))
    return a


def smoothing_note(stored: Dict[str, torch.Tensor], model_fp, tol: float = 0.01) -> Optional[str]:
    """A note when the checkpoint's own 1-D tensors (norm weights, biases) differ from the float
    parent's by more than ``tol`` of their largest value (a bfloat16 copy differs by <= 0.004): AWQ or
    SmoothQuant folded their scales into them, so the stored linear weights belong with those
    tensors, while quantfix measures them with the parent's (an llm-compressor AWQ checkpoint of the
    tiny Llama measured KLD 0.0170 so against 0.0136 loaded whole)."""
    if model_fp is None:
        return None
    own = dict(model_fp.state_dict())
    differ = []
    for k, t in stored.items():
        p = own.get(k)
        if t.dim() != 1 or p is None or tuple(p.shape) != tuple(t.shape) or not t.is_floating_point() \
                or p.device.type == "meta":
            continue
        scale = float(p.float().abs().max().clamp(min=1e-12))
        if float((t.float().cpu() - p.float().cpu()).abs().max()) > tol * scale:
            differ.append(k)
    if not differ:
        return None
    return (f"{len(differ)} norm/bias tensors of the checkpoint differ from the float parent's (e.g. {differ[0]}): "
            "smoothing (AWQ, SmoothQuant) was folded into them; quantfix measures the checkpoint's linear weights "
            "with the parent's, so its metrics of this checkpoint are approximate")
