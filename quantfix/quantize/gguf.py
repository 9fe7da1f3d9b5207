"""llama.cpp's tensor types as quantfix simulates them: the weight rounded by ggml's own quantizer
(``llamacpp.ggml``: the bytes llama-quantize writes, with the module's imatrix and the row-length
fallback) and the activation rounding of ggml's CPU matmul.

Why the activations: ggml computes a quantized matmul as a dot product of the weight's blocks with
the input quantized to the weight type's ``vec_dot_type`` (ggml-cpu.c ``type_traits_cpu``): Q8_0
(blocks of 32, one fp16 scale: Q4_0, Q5_0, Q8_0, IQ4_NL), Q8_1 (the same values plus a block sum:
Q4_1, Q5_1) or Q8_K (blocks of 256, one float32 scale: the K-quants, IQ4_XS). F16 weights take
fp16 inputs. Measured on SmolLM2-135M (6 x 512 WikiText-2 tokens, second half of each window, as
llama-perplexity scores): its Q4_1 GGUF against its own F16 parent measures KLD 0.00279 in
llama-perplexity; the same weights in PyTorch measure 0.0000018 without activation rounding and
0.00277 with it (top-1 0.960 vs llama.cpp's 0.965). fp16 inputs of F16 weights add 0.0000014: not
simulated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch

from quantfix.llamacpp import ggml


@dataclass(frozen=True)
class GGMLType:
    name: str  # ggml's spelling: Q4_K
    bits: int  # the integer width it is closest to (a plan's ``bits``)
    block: int  # values per block (a plan's ``group_size``)
    symmetric: bool
    vec_dot: str  # the activation type of its CPU matmul


# the weight types quantfix plans with: those ggml_quantize_chunk writes without an imatrix
TYPES: Dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("Q2_K", 2, 256, False, "Q8_K"), GGMLType("Q3_K", 3, 256, True, "Q8_K"),
    GGMLType("Q4_0", 4, 32, True, "Q8_0"), GGMLType("Q4_1", 4, 32, False, "Q8_1"),
    GGMLType("IQ4_NL", 4, 32, True, "Q8_0"), GGMLType("IQ4_XS", 4, 256, True, "Q8_K"),
    GGMLType("Q4_K", 4, 256, False, "Q8_K"), GGMLType("Q5_0", 5, 32, True, "Q8_0"),
    GGMLType("Q5_1", 5, 32, False, "Q8_1"), GGMLType("Q5_K", 5, 256, False, "Q8_K"),
    GGMLType("Q6_K", 6, 256, True, "Q8_K"), GGMLType("Q8_0", 8, 32, True, "Q8_0"),
)}


def algorithm_name(type_name: str) -> str:
    """The registry entry of a ggml type: ``Q4_K`` -> ``gguf_q4_k``."""
    return "gguf_" + ggml.type_name(type_name).lower()


def effective(type_name: str, in_features: int) -> str:
    """What llama-quantize writes for ``type_name`` on rows of ``in_features`` (the fallback table);
    F16 when no quantized type fits."""
    return ggml.effective_type(type_name, in_features)


def stored_bits(type_name: str, in_features: int) -> float:
    """Bits per weight as llama.cpp stores the type on rows of ``in_features`` (after the fallback;
    super-block scales included: Q4_K 4.5, Q6_K 6.5625, Q4_K on 576-wide rows -> Q5_0 5.5)."""
    return ggml.bits_per_weight(effective(type_name, in_features))


@torch.no_grad()
def roundtrip(type_name: str, W: torch.Tensor, importance: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``W`` as llama.cpp computes with it: stored in ``dtype`` in the float GGUF (F16), quantized by
    ggml to the type that fits its rows, with ``importance`` (E[x^2] per input channel: the imatrix
    llama-quantize reads), dequantized. Returned in float32 on W's device."""
    t = effective(type_name, W.shape[1])
    Wn = W.detach().to(dtype).float().cpu().numpy()
    if t in ggml.FLOAT_TYPES:
        return torch.from_numpy(Wn).to(W.device)
    imp = None if importance is None else np.ascontiguousarray(importance.float().cpu().numpy(), dtype=np.float32)
    return torch.from_numpy(ggml.roundtrip(t, Wn, imp)).to(W.device)


def act_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x as ggml's quantize_row_q8_0 (x86) leaves it: blocks of 32 along the last dim, d = amax/127
    stored in fp16, q = round-half-even(x * 127/amax); the values d16 * q. Also Q8_1's values."""
    xb = x.float().reshape(-1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, _div(127, amax), torch.zeros_like(amax))
    return (torch.round(xb * inv) * _div(amax, 127).half().float()).reshape(x.shape).to(x.dtype)


def _div(a, b) -> torch.Tensor:
    """a / b correctly rounded to float32, as C computes it (torch's vectorized float32 division
    by a tensor may be off by an ulp: a reciprocal, then a product); in float64, then rounded."""
    a = a.double() if isinstance(a, torch.Tensor) else a
    b = b.double() if isinstance(b, torch.Tensor) else b
    return (a / b).float()


def act_q8_k(x: torch.Tensor) -> torch.Tensor:
    """x as ggml's quantize_row_q8_K_ref leaves it: blocks of 256, iscale = -127/max (max: the
    value of largest magnitude, signed), q = min(127, round(iscale * x)), d = 1/iscale in float32."""
    xb = x.float().reshape(-1, 256)
    mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
    iscale = torch.where(mx != 0, _div(-127, mx), torch.zeros_like(mx))
    d = torch.where(mx != 0, _div(1, iscale), torch.zeros_like(mx))
    return (torch.clamp(torch.round(iscale * xb), max=127) * d).reshape(x.shape).to(x.dtype)


ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"Q8_0": act_q8_0, "Q8_1": act_q8_0, "Q8_K": act_q8_k}


def activation(type_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The input rounding of a matmul with a ``type_name`` weight, straight-through for gradients
    (the diagnosis's Taylor and Fisher passes backpropagate through it)."""
    fn = ACTIVATIONS[TYPES[type_name].vec_dot]

    def rounded(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 256 and fn is act_q8_k or x.shape[-1] % 32:
            return x  # no such matmul: the type never gets these rows (the fallback picked another)
        return x + (fn(x.detach()) - x).detach()
    return rounded
