"""Plans in llama.cpp's types (GGUF mode): plan 0 from ``quant`` mapped to a type, the ladder of
types a module may climb (each rung as llama-quantize would write it on that module's rows: the
fallback applied), and the plan as ``llama-quantize --tensor-type`` entries.

A GGUF plan's precisions always name the type llama.cpp writes (Q4_K asked on a 576-wide row is
Q5_0 in the plan), so its labels, sizes and simulations are those of the file.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision
from quantfix.quantize import gguf

log = logging.getLogger(__name__)

# quant.bits -> the llama.cpp type plan 0 asks for (K-quants; 7 and 8 bits: Q8_0)
BITS_TO_TYPE = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 7: "Q8_0", 8: "Q8_0"}
FLOAT = "F16"


def precision(type_name: str, in_features: int) -> Precision:
    """The precision of a module asked to be ``type_name``: the type llama-quantize writes on its
    rows (F16: kept in float)."""
    t = gguf.effective(type_name, in_features) if type_name.upper() != FLOAT else FLOAT
    if t == FLOAT:
        return Precision(16, 0, True, gguf.algorithm_name("Q8_0"))
    g = gguf.TYPES[t]
    return Precision(g.bits, g.block, g.symmetric, gguf.algorithm_name(t))


def asked_type(p: Precision) -> str:
    """The type a precision of any family asks for in GGUF mode: its own when it is a llama.cpp
    type, else the K-quant of its width (F16 when float)."""
    if p.is_float:
        return FLOAT
    return p.alg.ggml_type if p.alg.llama_cpp else BITS_TO_TYPE[p.bits]


def to_gguf(plan: Plan) -> Plan:
    """Every module of ``plan`` in the llama.cpp type its width asks for, as written on its rows."""
    modules = {n: precision(asked_type(p), plan.shapes[n][1]) for n, p in plan.modules.items()}
    asked = sorted({asked_type(p) for p in plan.modules.values()})
    return plan.with_changes(modules, note=plan.note + f"; as llama.cpp types ({', '.join(asked)} asked; "
                                                      "fallbacks for row lengths applied)")


def with_tied_output(plan: Plan, model, type_name: str) -> Plan:
    """Add the output matrix when it is the input embedding (tied: GGUF stores one ``token_embd``,
    read by the embedding lookup and the output matmul), at ``type_name``: llama.cpp quantizes it
    like any tensor, and on the demo model it is a fifth of the weights. Untied or already planned:
    unchanged."""
    out_emb = model.get_output_embeddings()
    if not isinstance(out_emb, torch.nn.Linear) or out_emb.weight is not model.get_input_embeddings().weight:
        return plan
    name = next(n for n, m in model.named_modules() if m is out_emb)
    if name in plan.modules:
        return plan
    out_f, in_f = out_emb.weight.shape
    modules = dict(plan.modules, **{name: precision(type_name, int(in_f))})
    shapes = dict(plan.shapes, **{name: (int(out_f), int(in_f))})
    return Plan(modules, shapes, other_params=plan.other_params - int(out_f) * int(in_f),
                calibration=dict(plan.calibration), note=plan.note + f"; tied {name} (token_embd) planned too")


def budget_problem(plan0: Plan, budget: Optional[float]) -> Optional[str]:
    """The one line that refuses a budget below plan 0 in GGUF mode, or None. The search there only climbs from plan 0
    (``ladder_options``: nothing cheaper than a module has), so a budget below it has no plan; before this check such a
    run searched, shipped plan 0 over the budget and called it 'the lowest predicted KLD within' it (the demo at 4.6
    bits: 5.30, Q4_K written as Q5_0 on its 576-wide rows)."""
    if budget is None or plan0.avg_bits <= budget + 1e-6:
        return None
    need = math.ceil(plan0.avg_bits * 100 - 1e-6) / 100
    return (f"plan.budget.avg_bits={budget:g} is below plan 0 in llama.cpp's types ({plan0.summary_str()}: "
            f"{plan0.avg_bits:.3f} bits per weight, each type as llama.cpp writes it on the module's rows), and GGUF mode "
            f"only climbs from plan 0: raise the budget to at least {need:.2f}, or ask for a smaller plan 0 (quant.bits)")


def ladder_options(plan: Plan, ladder: Sequence[str]) -> Dict[str, Dict[str, Precision]]:
    """Each module's options: every rung of ``ladder`` (llama.cpp type names) as written on its
    rows (duplicates from fallbacks merged), costing at least what the module has now; the same
    cost in another type is a free swap (IQ4_NL for Q4_0). F16 is left out (the planner always
    offers float)."""
    out: Dict[str, Dict[str, Precision]] = {}
    for n, p in plan.modules.items():
        in_f = plan.shapes[n][1]
        now = p.bits_per_weight(in_f)
        opts = {}
        for t in ladder:
            if t.upper() == FLOAT:
                continue
            cand = precision(t, in_f)
            if not cand.is_float and cand != p and cand.bits_per_weight(in_f) >= now - 1e-9:
                opts[cand.label] = cand
        if opts:
            out[n] = opts
    return out


def tensor_types(plan: Plan, names: Mapping[str, str]) -> Dict[str, str]:
    """The plan as llama-quantize ``--tensor-type`` entries: GGUF tensor name -> type (F16 for a
    module kept in float), for every planned module (``names``: module -> GGUF tensor name)."""
    out = {}
    for n, p in plan.modules.items():
        if n not in names:
            raise QuantfixError(f"{n}: no GGUF tensor name for this module, so the GGUF export cannot place it")
        if not p.is_float and not p.alg.llama_cpp:
            raise QuantfixError(f"{n} is planned as {p.label}, not a llama.cpp type: the GGUF export writes only plans "
                                "in llama.cpp types (export.format=gguf from the start of the run)")
        out[names[n]] = FLOAT if p.is_float else p.alg.ggml_type
    return out


def summary(types: Mapping[str, str]) -> List[str]:
    """'Q5_0 x120' lines, most used first."""
    from collections import Counter

    return [f"{t} x{c}" for t, c in Counter(types.values()).most_common()]
