"""Sequential GPTQ: the GPTQ modules of a chosen plan rounded again layer by layer, each layer's
Hessians collected on the inputs that the plan's own quantized layers before it produce (as
llm-compressor's sequential pipeline calibrates), where the search's simulations use the float
model's Hessians for every layer (computed once, shared by every option of every plan).

Like AutoRound's tuning it depends on the whole plan, so it is not an option the planner prices: the
loop runs it on the plan its search chose and measures it as one more trial (``loop.sequential_gptq``),
kept only where it measures better. Each module keeps the scales its search chose (the same
observer, on the float weight); only the error-compensating rounding sees other Hessians. The weights
ship statically, as measured.

Measured on the demo (SmolLM2-135M, C4 32x512 calibration, WikiText-2 16x512, CPU, parameters rounded to
the export dtype as the trials see them; scripts/bench_sequential.py, benchmarks/sequential_cpu_demo.json),
KLD float Hessians -> sequential: uniform GPTQ-imatrix W4g64 0.2214 -> 0.2065, W3g64 0.8726 -> 0.6966;
GPTQ min/max W4g64 0.3233 -> 0.2809, but W3g64 1.7849 -> 1.8027. On the loop's own mixed plans it did
not pay: budget 4.0 bits 0.2273 -> 0.2292 (each input group's Hessian after the groups before it in the
layer are rounded, "true sequential": 0.2330), the threshold loop's 5.18-bit plan 0.0542 -> 0.0532
(still failing). Hence off by default, and measured, not assumed, where it is on.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from quantfix import calib
from quantfix.plan import Plan, Precision
from quantfix.quantize import algorithms
from quantfix.weights import set_weight

NAME = "gptq_seq"


def requantizable(p: Precision) -> bool:
    """A module sequential GPTQ rounds again: a GPTQ-family precision (error-compensating sweep)."""
    return not p.is_float and p.alg.sweeps_options_together


def sequential_plan(plan: Plan) -> Plan:
    """The plan with every GPTQ-family module's rounding set to sequential GPTQ (widths unchanged)."""
    modules = {n: Precision(p.bits, p.group_size, p.symmetric, NAME) if requantizable(p) else p
               for n, p in plan.modules.items()}
    return plan.with_changes(modules, note=f"{plan.note}; sequential GPTQ" if plan.note else "sequential GPTQ")


@torch.no_grad()
def requantize(bank, plan: Plan, samples: torch.Tensor, batch_size: int = 4,
               progress: bool = True) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GPTQ of ``plan``'s GPTQ-family modules, layer after layer on the plan's quantized inputs:
    module -> (weight, scale, zero point) on the CPU, the weight in its own dtype, for
    ``WeightBank.use_tuned`` under ``sequential_plan(plan)``. Each layer's modules are float while
    its statistics are collected (llm-compressor's order), then hold the plan's weights (this
    rounding for the GPTQ ones, the bank's simulation for the rest) for the next layer's inputs.
    The live model holds the float weights before and after."""
    todo = {n: p for n, p in plan.modules.items() if n in bank.modules and requantizable(p)}
    if not todo:
        return {}
    bank.restore()
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    owner = {id(m): n for n, m in bank.modules.items()}

    def after_layer(layer, stats: calib.CalibStats) -> None:
        names = [owner[id(m)] for m in layer.modules() if id(m) in owner]
        mine = [n for n in names if n in todo]
        for key in dict.fromkeys(stats.module_input[n] for n in mine):  # one sweep per input and width
            group = [n for n in mine if stats.module_input[n] == key]
            for p in dict.fromkeys(todo[n] for n in group):
                members = [n for n in group if todo[n] == p]
                # the scales first, from the float statistics (the search's; the sweep finds them cached)
                qps = [tuple(t.cpu() for t in bank.qparams(n, p)) for n in members]
                for n, w, qp in zip(members, _sweep(bank, members, p, stats), qps):
                    out[n] = (w.cpu(), *qp)
            stats.inputs.pop(key, None)  # an 8B model's Hessians would take 33 GB if all were kept
        for n in names:
            p = plan.modules.get(n, Precision())
            if n in out:
                set_weight(bank.modules[n], out[n][0])
            elif not p.is_float:
                set_weight(bank.modules[n], bank.simulate(n, p))

    try:
        calib.collect_layers(bank.model, samples, list(todo), batch_size, progress=progress, after_layer=after_layer)
    finally:
        for n in bank.modules:
            set_weight(bank.modules[n], bank.originals[n])
    return out


def _sweep(bank, names, p: Precision, stats: calib.CalibStats):
    """GPTQ of ``names`` (one input, one width) on ``stats``' Hessian with the bank's scales."""
    Ws = [bank.original(n) for n in names]
    # on the CPU one factorization and a batched sweep (gptq.sweep: the engine's arithmetic, ~10x faster
    # than its per-column loop here: 170 of the demo's 385 s went there); a CPU run flushes denormal
    # floats (the recipe's set-up), which the demo's massive activations make plenty of
    qs = algorithms.gptq_options(Ws, [p], {p: [bank.inputs_with(n, p, stats.of(n)) for n in names]})[p]
    return [q.to(bank.originals[n].dtype) for q, n in zip(qs, names)]
