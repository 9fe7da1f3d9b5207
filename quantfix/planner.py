"""Stage: plan. Plan 0 from the ``quant`` config, and the next plan when a trial fails.

The greedy policy climbs each module up ``loop.ladder`` (e.g. W4g64 -> W4g32 -> W8 -> FP16),
picking the modules whose measured calibration output error drops the most per added bit,
until the step adds ``loop.bits_step`` average bits.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from quantfix.config import parse_rung
from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision, valid_group_size

log = logging.getLogger(__name__)


def target_modules(model, targets: List[str], ignore: List[str], keep_embeddings: bool) -> List[str]:
    out_emb = model.get_output_embeddings()
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if mod is out_emb:
            if keep_embeddings:
                continue
            tied = out_emb.weight is model.get_input_embeddings().weight
            if tied:
                log.warning("lm_head shares its weight with the input embeddings: keeping it in float")
                continue
            names.append(name)
            continue
        if any(re.search(t, name) for t in targets) and not any(re.search(i, name) for i in ignore):
            names.append(name)
    if not names:
        raise QuantfixError(f"quant.targets {targets} match no linear module of {type(model).__name__}: "
                            "check the regexes (they are matched with re.search against module names)")
    return names


def initial_plan(model, q, calibration: Dict[str, object]) -> Tuple[Plan, List[str]]:
    """Plan 0: every targeted module at quant.bits / quant.group_size; returns (plan, warnings)."""
    names = target_modules(model, q.targets, q.ignore, q.keep_embeddings)
    mods = dict(model.named_modules())
    modules, shapes, warnings = {}, {}, []
    adjusted: Dict[str, int] = {}
    for n in names:
        out_f, in_f = mods[n].weight.shape
        group = q.group_size
        if q.algorithm in ("llm_int8",):
            group = 0
        elif q.algorithm == "nf4":
            group = q.group_size or 64
        else:
            group, warn = valid_group_size(q.group_size, in_f, q.strict, n)
            if warn:
                adjusted[f"{q.group_size}->{group} (in_features={in_f})"] = adjusted.get(
                    f"{q.group_size}->{group} (in_features={in_f})", 0) + 1
        modules[n] = Precision(q.bits, group, q.symmetric, q.algorithm)
        shapes[n] = (int(out_f), int(in_f))
    for change, count in adjusted.items():
        warnings.append(f"quant.group_size {change.split('->')[0]} does not divide in_features: using "
                        f"{change.split('->')[1]} for {count} modules (set quant.strict=true to fail instead)")
    for w in warnings:
        log.warning(w)
    total = sum(p.numel() for p in model.parameters())
    other = total - sum(o * i for o, i in shapes.values())
    plan = Plan(modules, shapes, other_params=int(other), calibration=dict(calibration), note="plan 0 (quant config)")
    return plan, warnings


@dataclass
class Ladder:
    rungs: List[Tuple[int, int]]

    @classmethod
    def parse(cls, entries: List[str]) -> "Ladder":
        return cls([parse_rung(e) for e in entries])

    def next(self, p: Precision, in_f: int) -> Optional[Precision]:
        """The next precision up the ladder from p (None at the top)."""
        cur_bits = p.bits_per_weight(in_f)
        for bits, group in self.rungs:
            if bits >= 16:
                cand = Precision(16, 0, True, p.algorithm)
            else:
                g, _ = valid_group_size(group, in_f, False, "")
                cand = Precision(bits, g, p.symmetric, p.algorithm if p.algorithm != "nf4" else "rtn")
            if cand.bits_per_weight(in_f) > cur_bits + 1e-9 and cand.bits >= p.bits:
                return cand
        return None


class GreedyPlanner:
    """Promote the modules with the largest error reduction per added bit."""

    def __init__(self, ladder: Ladder, error_fn: Callable[[str, Precision], float], bits_step: float):
        self.ladder = ladder
        self.error_fn = error_fn
        self.bits_step = bits_step
        self._err: Dict[Tuple[str, Precision], float] = {}

    def error(self, name: str, p: Precision) -> float:
        key = (name, p)
        if key not in self._err:
            self._err[key] = 0.0 if p.is_float else self.error_fn(name, p)
        return self._err[key]

    def ranked_promotions(self, plan: Plan) -> List[Tuple[str, Precision, float]]:
        """(module, next precision, score) for every module that can climb, best first."""
        out = []
        for n, p in plan.modules.items():
            out_f, in_f = plan.shapes[n]
            nxt = self.ladder.next(p, in_f)
            if nxt is None:
                continue
            gain = self.error(n, p) - self.error(n, nxt)
            cost = (nxt.bits_per_weight(in_f) - p.bits_per_weight(in_f)) * out_f * in_f
            out.append((n, nxt, gain / cost))
        out.sort(key=lambda t: -t[2])
        return out

    def next_plan(self, plan: Plan) -> Optional[Tuple[Plan, List[Tuple[str, Precision]]]]:
        """The next plan and the ordered list of its changes (None when nothing can climb)."""
        ranked = self.ranked_promotions(plan)
        if not ranked:
            return None
        budget = self.bits_step * plan.n_params
        changes, added = [], 0.0
        for n, nxt, _ in ranked:
            out_f, in_f = plan.shapes[n]
            changes.append((n, nxt))
            added += (nxt.bits_per_weight(in_f) - plan.modules[n].bits_per_weight(in_f)) * out_f * in_f
            if added >= budget:
                break
        new = plan.with_changes(dict(changes), note=f"greedy: promoted {len(changes)} modules with the largest "
                                                    "calibration output error per added bit")
        return new, changes
