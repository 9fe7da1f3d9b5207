"""Stage: plan. Plan 0 from the ``quant`` config, and the next plan when a trial fails.

Two policies climb modules up ``loop.ladder`` (e.g. W4g64 -> W4g32 -> W8 -> FP16):
``PredictivePlanner`` (the default) predicts each module's KLD at every option from the diagnosis
and picks the cheapest plan predicted to pass, refitting on every measurement;
``GreedyPlanner`` promotes the modules whose calibration output error drops the most per added
bit, ``loop.bits_step`` average bits per iteration.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch

from quantfix.config import parse_rung
from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision, layer_index, valid_group_size
from quantfix.quantize import algorithms

if TYPE_CHECKING:
    from quantfix.diagnose.findings import Finding

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
        fixed = algorithms.get(q.algorithm).fixed_group
        if fixed is not None:
            group = fixed(q.group_size)
        else:
            group, warn = valid_group_size(q.group_size, in_f, q.strict, n)
            if warn:
                key = f"{q.group_size}->{group} (in_features={in_f})"
                adjusted[key] = adjusted.get(key, 0) + 1
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
                # formats with a fixed layout (bitsandbytes) climb the integer rungs as RTN
                alg = p.algorithm if algorithms.get(p.algorithm).fixed_group is None else "rtn"
                cand = Precision(bits, g, p.symmetric, alg)
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


def ladder_options(plan: Plan, ladder: Ladder) -> Dict[str, Dict[str, Precision]]:
    """Every precision up the ladder from each module's current one (FP16 excluded: it costs nothing
    to score, its KLD contribution is 0)."""
    out: Dict[str, Dict[str, Precision]] = {}
    for n, p in plan.modules.items():
        _, in_f = plan.shapes[n]
        opts, cur = {}, p
        while True:
            cur = ladder.next(cur, in_f)
            if cur is None or cur.is_float:
                break
            opts[cur.label] = cur
        if opts:
            out[n] = opts
    return out


@dataclass
class Step:
    module: str
    precision: Precision
    gain: float  # predicted KLD removed
    cost: float  # bits added
    reason: str


class PredictivePlanner:
    """Predict, then verify. Each module's KLD contribution at each option on the ladder comes from
    the diagnosis (one Fisher pass); the cheapest assignment predicted to pass is a prefix of the
    upgrades sorted by predicted KLD removed per added bit (multiple-choice knapsack, greedy over
    each module's convex hull). A multiplicative correction, refit on every measured trial, maps
    the additive prediction to the measured KLD."""

    def __init__(self, plan0: Plan, module_kld: Dict[str, float], option_kld: Dict[str, Dict[str, float]],
                 options: Dict[str, Dict[str, Precision]], findings: List["Finding"]):
        self.plan0 = plan0
        self.module_kld = module_kld
        self.reasons = self._reasons(findings)
        self.steps: List[Step] = []
        for n, p in plan0.modules.items():
            out_f, in_f = plan0.shapes[n]
            numel = out_f * in_f
            pts = [(p.bits_per_weight(in_f) * numel, max(module_kld.get(n, 0.0), 0.0), p)]
            for label, q in options.get(n, {}).items():
                pts.append((q.bits_per_weight(in_f) * numel, max(option_kld.get(n, {}).get(label, 0.0), 0.0), q))
            pts.append((Precision(16).bits_per_weight(in_f) * numel, 0.0, Precision(16, 0, True, p.algorithm)))
            self.steps += self._hull_steps(n, pts)
        self.steps.sort(key=lambda st: -st.gain / max(st.cost, 1e-9))
        self.correction = 1.0

    def _reasons(self, findings: List["Finding"]) -> Dict[str, str]:
        """module -> the kind of the first finding that names it (or its layer)."""
        r: Dict[str, str] = {}
        for f in findings:
            for m in f.modules:
                r.setdefault(m, f.kind)
            for layer in f.layers:
                for n in self.plan0.modules:
                    if layer_index(n) == layer:
                        r.setdefault(n, f.kind)
        self.spread = any(f.kind == "spread_evenly" for f in findings)
        return r

    def _hull_steps(self, name: str, pts) -> List[Step]:
        """Lower convex hull of (bits, kld) from the current option: upgrades with falling efficiency."""
        pts = sorted(pts, key=lambda t: (t[0], t[1]))
        hull = [pts[0]]
        for pt in pts[1:]:
            if pt[1] >= hull[-1][1]:
                continue  # costs more, removes nothing
            while len(hull) >= 2:
                (b1, k1, _), (b2, k2, _) = hull[-2], hull[-1]
                if (k1 - pt[1]) / (pt[0] - b1) >= (k1 - k2) / (b2 - b1):
                    hull.pop()
                else:
                    break
            hull.append(pt)
        steps = []
        for (b1, k1, p1), (b2, k2, p2) in zip(hull, hull[1:]):
            reason = self.reasons.get(name, "sensitivity")
            if p2.bits == p1.bits and p2.group_size != p1.group_size:
                reason = "spread_evenly" if self.spread else "sensitivity (smaller group)"
            steps.append(Step(name, p2, k1 - k2, b2 - b1, reason))
        return steps

    def plan_at(self, k: int) -> Plan:
        changes: Dict[str, Precision] = {}
        for st in self.steps[:k]:
            changes[st.module] = st.precision
        reasons: Dict[str, int] = {}
        for st in self.steps[:k]:
            reasons[st.reason] = reasons.get(st.reason, 0) + 1
        note = f"predictive: first {k} of {len(self.steps)} upgrades; drivers: " + \
               ", ".join(f"{r} x{c}" for r, c in sorted(reasons.items(), key=lambda t: -t[1]))
        return self.plan0.with_changes(changes, note=note)

    def raw_prediction(self, k: int) -> float:
        return max(sum(max(v, 0.0) for v in self.module_kld.values()) - sum(st.gain for st in self.steps[:k]), 0.0)

    def predict(self, k: int) -> float:
        return self.correction * self.raw_prediction(k)

    def calibrate(self, k: int, measured_kld: float) -> None:
        raw = self.raw_prediction(k)
        if raw > 1e-9:
            self.correction = measured_kld / raw

    def first_passing(self, target_kld: float, margin: float = 0.9, after: int = -1) -> Optional[int]:
        """The smallest prefix predicted to reach margin x target (and longer than ``after``)."""
        for k in range(max(0, after + 1), len(self.steps) + 1):
            if self.predict(k) <= margin * target_kld:
                return k
        return None

    def largest_within(self, avg_bits: float) -> int:
        """The longest prefix whose plan stays within the average-bits budget."""
        budget = avg_bits * self.plan0.n_params
        used = sum(self.plan0.module_bits(n) for n in self.plan0.modules)
        k = 0
        for st in self.steps:
            if used + st.cost > budget + 1e-6:
                break
            used += st.cost
            k += 1
        return k

    def frontier(self, points: int = 40) -> List[Tuple[float, float]]:
        """Predicted (avg bits, KLD) along the upgrade sequence: the planner's Pareto curve."""
        out, used = [], sum(self.plan0.module_bits(n) for n in self.plan0.modules)
        stride = max(1, len(self.steps) // points)
        for k in range(len(self.steps) + 1):
            if k % stride == 0 or k == len(self.steps):
                out.append((used / self.plan0.n_params, self.predict(k)))
            if k < len(self.steps):
                used += self.steps[k].cost
        return out

    def drivers(self, k: int) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        for st in self.steps[:k]:
            out.setdefault(st.reason, []).append(f"{st.module} -> {st.precision.label}")
        return out
