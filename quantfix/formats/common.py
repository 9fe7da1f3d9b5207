"""What every checkpoint reader returns (``External``) and the integer grid a dequantized weight is
exported on (``grid_precision``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision
from quantfix.quantize import scales

CKPT, CKPT_APPROX = "ckpt", "ckpt_approx"


@dataclass
class External:
    plan: Plan
    weights: Dict[str, torch.Tensor]  # module -> dequantized weight [out, in], float32, CPU
    qparams: Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # module -> (scale, zero) [out, n_groups]
    format: str  # "gptq", "awq", "compressed-tensors", "bitsandbytes", "gguf"
    source_types: Dict[str, str] = field(default_factory=dict)  # module -> the format's own type (Q4_K, nf4...)
    gguf_names: Dict[str, str] = field(default_factory=dict)  # module -> GGUF tensor name (GGUF only)
    notes: list = field(default_factory=list)
    parent_agreement: Optional[float] = None  # the lowest module's sign agreement with the float parent (parent.py)

    def summary(self) -> str:
        types = {}
        for n, t in self.source_types.items():
            types[t] = types.get(t, 0) + 1
        kinds = ", ".join(f"{t} x{c}" for t, c in sorted(types.items()))
        return f"{self.format} ({kinds}); plan 0: {self.plan.summary_str()}"


def grid_precision(W: torch.Tensor, bits: int, group: int, symmetric: bool,
                   native: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[Precision, Tuple[torch.Tensor, torch.Tensor]]:
    """The ckpt precision of a dequantized weight and the (scale, zero) that the export packs it
    with: the format's own integer grid where it reproduces W exactly (``ckpt``), else min/max
    qparams fitted to W (``ckpt_approx``: the export re-rounds)."""
    if native is not None:
        s, z = native
        q = scales.quantize_with(W.float(), s.float(), z.float(), bits, group)
        if torch.equal(q, W.float()):
            return Precision(bits, group, symmetric, CKPT), (s.float(), z.float())
    s, z = scales.search_qparams(W.float(), bits, group, symmetric, "minmax")
    return Precision(bits, group, symmetric, CKPT_APPROX), (s.float(), z.float())


def check_group(group: int, in_f: int, name: str, path: str) -> int:
    if group in (0, -1, None) or group >= in_f:
        return 0
    if in_f % group:
        raise QuantfixError(f"{path}: group size {group} does not divide in_features={in_f} of {name}")
    return int(group)
