"""One entry per quantization algorithm: how it simulates, how it exports, its label and its cost.

Adding an algorithm means adding one ``Algorithm`` to ``REGISTRY`` (and its test): the config
check, the plan's labels and sizes, the simulated trial weights and the exported checkpoint all
read it from here. The tensor math lives in ``fake.py``; the engines are imported lazily.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch

from quantfix.quantize import fake, scales

if TYPE_CHECKING:  # only for type hints: plan.py imports this module
    from quantfix.plan import Precision
    from quantfix.quantize.calib import InputStats

FLOAT_BITS = 16
COMPRESSED_TENSORS = "compressed-tensors"
BITSANDBYTES = "bitsandbytes"


@dataclass
class SimInputs:
    """What a simulation may use besides the weight: the module's calibration statistics (None
    without calibration data), the AWQ scales of its input (computed on demand) and the knobs."""

    stats: Optional["InputStats"] = None
    awq_scales: Callable[[], Optional[torch.Tensor]] = lambda: None
    gptq_damp: float = 0.01
    gptq_block: int = 128
    int8_threshold: float = 6.0


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: str  # the checkpoint format: compressed-tensors (llm-compressor) or bitsandbytes
    summary: str  # one line for errors and docs
    bits: Tuple[int, ...]  # the integer widths it supports
    simulate: Callable[[torch.Tensor, "Precision", SimInputs], torch.Tensor]
    # storage bits per weight for a module with in_features inputs (scales, zero points included)
    bits_per_weight: Callable[["Precision", int], float]
    label: Callable[["Precision"], str]
    # llm-compressor modifiers for the config groups of a compressed-tensors plan
    modifiers: Optional[Callable[[dict, List[str], object], list]] = None
    # transformers' BitsAndBytesConfig for a bitsandbytes plan: (skipped modules, compute dtype, quant config)
    bnb_config: Optional[Callable[[List[str], torch.dtype, object], object]] = None
    calibrated: bool = False  # simulation and export read calibration data
    # modules that read one input can be simulated in one call on their stacked rows
    stack_rows: bool = False
    fixed_group: Optional[Callable[[int], int]] = None  # the group size it forces (None: any valid size)
    export_needs_cuda: bool = False

    def check_bits(self, bits: int) -> Optional[str]:
        if bits in self.bits:
            return None
        allowed = f"{self.bits[0]}..{self.bits[-1]}" if len(self.bits) > 2 else "/".join(map(str, self.bits))
        return f"{self.name} supports bits {allowed} (got {bits})"


# ---- sizes and labels ---------------------------------------------------------------------------

def _int_bits(p: "Precision", in_features: int) -> float:
    group = p.group_size or in_features
    per_group = 16 + (0 if p.symmetric else p.bits)  # a 16-bit scale, plus a zero point if asymmetric
    return p.bits + per_group / group


def _int_label(p: "Precision") -> str:
    g = f"g{p.group_size}" if p.group_size else "ch"
    return f"W{p.bits}{g}{'' if p.symmetric else 'a'}"


# ---- simulations --------------------------------------------------------------------------------

def _sim_rtn(W, p, _inputs: SimInputs):
    return fake.rtn(W, p.bits, p.group_size, p.symmetric)


def _sim_mse(W, p, _inputs: SimInputs):
    scale, zero = scales.search_qparams(W, p.bits, p.group_size, p.symmetric, "mse")
    return scales.quantize_with(W, scale, zero, p.bits, p.group_size)


def _sim_gptq(W, p, inputs: SimInputs):
    if inputs.stats is None:
        return _sim_rtn(W, p, inputs)
    return fake.gptq(W, inputs.stats.hessian.to(W.device), p.bits, p.group_size, p.symmetric,
                     inputs.gptq_damp, inputs.gptq_block)


def _sim_awq(W, p, inputs: SimInputs):
    scales = inputs.awq_scales()
    if scales is None:
        return _sim_rtn(W, p, inputs)
    return fake.awq(W, scales, p.bits, p.group_size, p.symmetric)


def _sim_llm_int8(W, _p, inputs: SimInputs):
    cols = None
    if inputs.stats is not None:
        cols = torch.nonzero(inputs.stats.absmax > inputs.int8_threshold).flatten().to(W.device)
    return fake.llm_int8_weight(W, cols)


def _sim_nf4(W, p, _inputs: SimInputs):
    return fake.nf4(W, p.group_size or 64)


# ---- exports (llm-compressor modifiers) -----------------------------------------------------------

def _rtn_modifiers(config_groups: dict, ignore: List[str], _q) -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(config_groups=config_groups, ignore=ignore)]


def _mse_modifiers(config_groups: dict, ignore: List[str], q) -> list:
    for g in config_groups.values():
        g["weights"]["observer"] = "mse"  # the engine runs the same search: bit-exact with _sim_mse
    return _rtn_modifiers(config_groups, ignore, q)


def _gptq_modifiers(config_groups: dict, ignore: List[str], q) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(config_groups=config_groups, ignore=ignore, dampening_frac=q.gptq_dampening,
                         block_size=q.gptq_block_size)]


def _awq_modifiers(config_groups: dict, ignore: List[str], q) -> list:
    from llmcompressor.modifiers.transform import AWQModifier

    return [AWQModifier()] + _rtn_modifiers(config_groups, ignore, q)


def _llm_int8_config(skip: List[str], _dtype, q):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.llm_int8_threshold, llm_int8_skip_modules=skip)


def _nf4_config(skip: List[str], dtype, _q):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


INT_BITS = tuple(range(2, 9))

REGISTRY: Dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("rtn", COMPRESSED_TENSORS, "round to nearest, min/max scales", INT_BITS, _sim_rtn, _int_bits,
              _int_label, _rtn_modifiers),
    Algorithm("mse", COMPRESSED_TENSORS, "round to nearest, clipping searched for the least weight error (llm-compressor "
              "'mse' observer)", INT_BITS, _sim_mse, _int_bits, lambda p: _int_label(p) + "-mse", _mse_modifiers),
    Algorithm("gptq", COMPRESSED_TENSORS, "GPTQ: error-compensating rounding on the calibration Hessian",
              INT_BITS, _sim_gptq, _int_bits, _int_label, _gptq_modifiers, calibrated=True, stack_rows=True),
    Algorithm("awq", COMPRESSED_TENSORS, "AWQ: activation-aware per-channel scales, then RTN", INT_BITS,
              _sim_awq, _int_bits, _int_label, _awq_modifiers, calibrated=True, export_needs_cuda=True),
    Algorithm("llm_int8", BITSANDBYTES, "LLM.int8 (bitsandbytes): int8 rows, outlier columns in float", (8,),
              _sim_llm_int8, lambda p, in_f: 8 + 32 / in_f, lambda p: "LLM.int8", bnb_config=_llm_int8_config,
              calibrated=True, fixed_group=lambda requested: 0),
    Algorithm("nf4", BITSANDBYTES, "NF4 (bitsandbytes): 4-bit normal-float blocks", (4,), _sim_nf4,
              lambda p, in_f: 4 + 32 / (p.group_size or 64), lambda p: f"NF4g{p.group_size or 64}",
              bnb_config=_nf4_config, fixed_group=lambda requested: requested or 64),
)}

NAMES = tuple(REGISTRY)
BNB_NAMES = tuple(n for n, a in REGISTRY.items() if a.family == BITSANDBYTES)


def get(name: str) -> Algorithm:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"algorithm={name!r}: choose one of {', '.join(NAMES)}") from None


def bits_problem(bits: int, allow_float: bool = False) -> Optional[str]:
    """The one rule for a module's width: 2..8 integer bits, or 16 (kept in float) where allowed."""
    if 2 <= bits <= 8 or (allow_float and bits == FLOAT_BITS):
        return None
    return f"bits={bits} is out of range: use 2..8" + (", or 16 to keep the module in float" if allow_float else "")
