"""Stage: plan. Plan 0 from the ``quant`` config, and the next plan when a trial fails.

Two policies climb modules up ``loop.ladder`` (e.g. W4g64 -> W4g32 -> W8 -> FP16):
``PredictivePlanner`` (the default) predicts each module's KLD at every option from the diagnosis
and picks the cheapest plan predicted to pass, refitting on every measurement;
``GreedyPlanner`` promotes the modules whose calibration output error drops the most per added
bit, ``loop.bits_step`` average bits per iteration.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from quantfix import arch
from quantfix.config import Rung, parse_rung
from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision, layer_index, valid_group_size
from quantfix.quantize import algorithms

if TYPE_CHECKING:
    from quantfix.diagnose.findings import Finding

log = logging.getLogger(__name__)


def target_modules(model, targets: List[str], ignore: List[str], keep_embeddings: bool) -> List[str]:
    """The modules plan 0 quantizes: every matmul of the decoder blocks (nn.Linear; GPT-2's Conv1D
    and MoE experts were rewritten as such at load, quantfix.arch) whose name matches a
    ``quant.targets`` regex and no ``quant.ignore`` one, routers left out; and lm_head unless
    keep_embeddings (or tied to the input embeddings)."""
    candidates = list(arch.quantizable(model))
    if not candidates:
        raise QuantfixError(f"{type(model).__name__}: its decoder blocks hold no linear module to quantize: "
                            "this architecture is not supported")
    names = [n for n in candidates if any(re.search(t, n) for t in targets) and not any(re.search(i, n) for i in ignore)]
    out_emb = model.get_output_embeddings()
    if out_emb is not None and not keep_embeddings and isinstance(out_emb, torch.nn.Linear):
        if out_emb.weight is model.get_input_embeddings().weight:
            log.warning("lm_head shares its weight with the input embeddings: keeping it in float")
        else:
            names.append(next(n for n, m in model.named_modules() if m is out_emb))
    if not names:
        raise QuantfixError(f"quant.targets {list(targets)} (minus quant.ignore {list(ignore)}) match none of the "
                            f"{len(candidates)} linear modules of {type(model).__name__}'s decoder blocks (e.g. "
                            f"{candidates[0]}): fix the regexes (re.search on module names), or leave quant.targets "
                            "at its default to quantize them all")
    return names


def group_problem(model, q, ladder: List[str]) -> Optional[str]:
    """A group size (``quant.group_size``, a ``loop.ladder`` rung) that divides none of the input
    widths of the modules plan 0 quantizes: no module could use it (one that divides some widths is
    replaced by the nearest divisor where it does not, with a warning). None when all are usable."""
    names = target_modules(model, q.targets, q.ignore, q.keep_embeddings)
    mods = dict(model.named_modules())
    widths = sorted({int(mods[n].weight.shape[1]) for n in names})
    wanted = [("quant.group_size", q.group_size)] if algorithms.get(q.algorithm).fixed_group is None else []
    wanted += [(f"loop.ladder entry {r}", parse_rung(r).group) for r in ladder if parse_rung(r).bits < 16]
    for where, g in wanted:
        if g and not any(w % g == 0 for w in widths):
            common = [d for d in (32, 64, 128, 256) if all(w % d == 0 for w in widths)]
            return (f"{where}: group size {g} divides none of the model's input widths ({', '.join(map(str, widths))}): "
                    f"use {' or '.join(map(str, common)) if common else 'a divisor of them'}, or 0 (per channel)")
    return None


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
    return harmonize_experts(plan), warnings


EXPERT_CEILING = Precision(8, 0, True, "rtn")


def harmonize_experts(plan: Plan) -> Plan:
    """MoE experts move as one group: every expert gets the widest storage (bits, group size) any
    expert has in ``plan``, its own algorithm kept; a float expert means W8 per channel for all.
    transformers reloads a compressed-tensors MoE checkpoint with one scheme for every expert,
    and not at all with float experts beside quantized ones (export.check_experts_uniform), so a
    plan with unequal experts would export wrong weights. Never narrower than asked: the plan's
    error can only drop."""
    experts = [n for n in plan.modules if arch.is_expert(n)]
    if not experts:
        return plan
    if all(plan.modules[n].is_float for n in experts) and all(p.is_float for p in plan.modules.values()):
        return plan

    def width(n: str) -> Tuple[float, float]:
        p = plan.modules[n]
        return (float("inf"), 0.0) if p.is_float else (p.bits, p.bits_per_weight(plan.shapes[n][1]))

    widest = plan.modules[max(experts, key=width)]
    if widest.is_float:
        widest = EXPERT_CEILING
    changes = {}
    for n in experts:
        p = plan.modules[n]
        alg = p.algorithm if not p.is_float and algorithms.get(p.algorithm).check_bits(widest.bits) is None else "rtn"
        group, _ = valid_group_size(widest.group_size, plan.shapes[n][1], False, n)
        q = Precision(widest.bits, group, widest.symmetric, alg)
        if q != p:
            changes[n] = q
    if not changes:
        return plan
    note = plan.note + f"; MoE experts widened to one precision ({widest.label.split('-')[0]}, {len(changes)} changed)"
    return plan.with_changes(changes, note=note)


@dataclass
class Ladder:
    rungs: List[Rung]

    @classmethod
    def parse(cls, entries: List[str]) -> "Ladder":
        return cls([parse_rung(e) for e in entries])

    def precision(self, rung: Rung, p: Precision, in_f: int, algorithm: Optional[str] = None) -> Precision:
        """``rung`` for a module now at ``p`` (its symmetry unless the rung names one; its algorithm, or
        ``algorithm``), the group size the nearest divisor of in_features."""
        if rung.bits >= 16:
            return Precision(16, 0, True, p.algorithm)
        g, _ = valid_group_size(rung.group, in_f, False, "")
        sym = p.symmetric if rung.symmetric is None else rung.symmetric
        return Precision(rung.bits, g, sym, algorithm or p.algorithm)

    def next(self, p: Precision, in_f: int) -> Optional[Precision]:
        """The next precision up the ladder from p (None at the top)."""
        cur_bits = p.bits_per_weight(in_f)
        # formats with a fixed layout (bitsandbytes) climb the integer rungs as RTN
        alg = p.algorithm if algorithms.get(p.algorithm).fixed_group is None else "rtn"
        for rung in self.rungs:
            cand = self.precision(rung, p, in_f, alg)
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
        return harmonize_experts(new), changes


def ladder_options(plan: Plan, ladder: Ladder, algorithms_: Sequence[str] = (),
                   below: bool = False) -> Dict[str, Dict[str, Precision]]:
    """Each module's options: every rung of the ladder that costs at least what it has now (with
    ``below``, the cheaper rungs too: a budget may take a module under plan 0's width), in each of
    ``algorithms_`` (default: the module's own), including the same width in another algorithm (a
    free swap when it rounds better). FP16 is left out: it costs nothing to score, its KLD
    contribution is 0. Algorithms that must own the whole plan (AWQ, bitsandbytes) keep their own."""
    out: Dict[str, Dict[str, Precision]] = {}
    for n, p in plan.modules.items():
        _, in_f = plan.shapes[n]
        own = algorithms.get(p.algorithm)
        algs = [p.algorithm] if not algorithms_ or not own.mixable else list(algorithms_)
        if own.fixed_group is not None:  # bitsandbytes formats climb the integer rungs as RTN
            algs = ["rtn"]
        opts: Dict[str, Precision] = {}
        for rung in ladder.rungs:
            if rung.bits >= 16:
                continue
            for a in algs:
                if rung.bits >= 8 and len(algs) > 1 and algorithms.get(a).simulate_many is not None:
                    continue  # GPTQ at 8 bits removes < 0.002 KLD over imatrix on the demo: not worth a sweep
                cand = ladder.precision(rung, p, in_f, a)
                above = cand.bits >= p.bits and cand.bits_per_weight(in_f) >= p.bits_per_weight(in_f) - 1e-9
                if cand != p and (above or below) and algorithms.get(a).check_bits(rung.bits) is None:
                    opts[cand.label] = cand
        if opts:
            out[n] = opts
    return out


# measured KLD ~ raw ** power: what the demo's trials fit (0.63 from W4g64 RTN to its first
# predicted plan); used until a second trial lets the power be fit on the model at hand
PRIOR_POWER = 0.65


@dataclass(frozen=True)
class Space:
    """Where a planner's plans start. ``floor`` None: from plan 0 (the threshold search climbs from
    it); a number: from each module's cheapest option at or above ``floor`` bits per weight (a
    budget: 0 takes the ladder's cheapest rung, below plan 0 when the ladder goes there; 4.25 keeps
    every module at W4g64 or wider). ``weigh``: precision -> multiplier of its predicted KLD (what
    the measured plans taught: low-bit modules interact more than their single scores say)."""

    floor: Optional[float] = None
    weigh: Optional[Callable[[Precision], float]] = None


def has_calibrated_twin(p: Precision, options: Iterable[Precision]) -> bool:
    """``p`` rounds without the calibration data (RTN) and one of ``options`` stores the same width
    (bits, group, symmetry) rounded with it: budget mode never chooses ``p`` (``_points``)."""
    return not p.is_float and not p.alg.calibrated and any(
        q.alg.calibrated and (q.bits, q.group_size, q.symmetric) == (p.bits, p.group_size, p.symmetric) for q in options)


def fit_power(measured: List[Tuple[float, float]]) -> Tuple[float, float]:
    """(scale, power) of measured ~ scale * raw ** power over (raw, measured) points: through the
    last point with the prior power while the raw values do not differ, else log-log least squares
    (power in [0.5, 2]) anchored on the latest measurement (the next plans are closest to it)."""
    raw, meas = measured[-1]
    pts = {(round(math.log(r), 9), math.log(m)) for r, m in measured}
    if len({x for x, _ in pts}) < 2:
        return meas / raw ** PRIOR_POWER, PRIOR_POWER
    xs, ys = zip(*sorted(pts))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    power = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    power = min(max(power, 0.5), 2.0)
    return meas / raw ** power, power


@dataclass
class Step:
    module: str
    precision: Precision
    gain: float  # predicted KLD removed
    cost: float  # bits added (0: a swap to a better-rounding algorithm at the same width)
    reason: str  # the finding kind that drove it (or "sensitivity")
    action: str = ""  # what changes, e.g. "W4g64 -> W4g64-gptq-imx"


class PredictivePlanner:
    """Predict, then verify. Each module's KLD contribution at each option on the ladder comes from
    the diagnosis (one Fisher pass); the cheapest assignment predicted to pass is a prefix of the
    upgrades sorted by predicted KLD removed per added bit (multiple-choice knapsack, greedy over
    each module's convex hull), with free swaps to a better-rounding algorithm at the same width first.
    A power law, refit on every measured trial, maps the additive prediction to the measured KLD."""

    def __init__(self, plan0: Plan, module_kld: Dict[str, float], option_kld: Dict[str, Dict[str, float]],
                 options: Dict[str, Dict[str, Precision]], findings: List["Finding"], space: "Space" = None):
        self.plan0, self.space = plan0, space or Space()
        self.module_kld = module_kld
        self.reasons = self._reasons(findings)
        self.steps: List[Step] = []
        self.base: Dict[str, Precision] = {}  # each module's precision before any step
        self.kld: Dict[str, Dict[Precision, float]] = {}  # module -> precision -> predicted KLD (weighted)
        base_bits = base_kld = 0.0
        for n in plan0.modules:
            start, rest = self._points(n, module_kld, option_kld, options)
            self.base[n] = start[2]
            base_bits, base_kld = base_bits + start[0], base_kld + start[1]
            self.steps += self._hull_steps(n, start, rest)
        self.base_bits, self.base_kld = base_bits, base_kld
        self.steps.sort(key=lambda st: -st.gain / max(st.cost, 1e-9))
        self.measured: List[Tuple[float, float]] = []  # (raw prediction, measured KLD) of every trial
        self.scale, self.power = 1.0, PRIOR_POWER

    def _points(self, n: str, module_kld, option_kld, options):
        """(the module's starting point, the points it may climb to): (bits, predicted KLD, precision).
        From plan 0's precision (threshold search), or from the cheapest point at or above the
        space's floor (budget: the ladder may go below plan 0)."""
        p = self.plan0.modules[n]
        out_f, in_f = self.plan0.shapes[n]
        numel, weigh = out_f * in_f, self.space.weigh or (lambda q: 1.0)
        cur = (p.bits_per_weight(in_f) * numel, weigh(p) * max(module_kld.get(n, 0.0), 0.0), p)
        pts = [(q.bits_per_weight(in_f) * numel, weigh(q) * max(option_kld.get(n, {}).get(label, 0.0), 0.0), q)
               for label, q in options.get(n, {}).items()]
        pts.append((Precision(16).bits_per_weight(in_f) * numel, 0.0, Precision(16, 0, True, p.algorithm)))
        self.kld[n] = {q: k for _, k, q in [cur] + pts}
        if self.space.floor is None:
            return cur, pts
        # budget mode: an uncalibrated plan 0 (RTN) stays a choice only where no option stores the same
        # width rounded with the calibration data, which is at least as good on the data by construction
        # (imatrix's clipping grid starts at the unclipped range, RTN's; GPTQ corrects RTN's error). A
        # module's Fisher score could still rank RTN lower, and plans from a W3g64 RTN start kept 5-14
        # RTN modules (demo at 3.43 bits, this CPU)
        if has_calibrated_twin(p, (q for _, _, q in pts)):
            cur = None
        allowed = [pt for pt in ([cur] if cur else []) + pts
                   if pt[2].is_float or pt[0] >= self.space.floor * numel - 1e-6]
        start = min(allowed, key=lambda t: (t[0], t[1]))
        return start, [pt for pt in allowed if pt is not start]

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

    def _hull_steps(self, name: str, cur, pts) -> List[Step]:
        """From the current (bits, kld, precision): first the best option at the same cost if it
        removes KLD (a free algorithm swap), then the lower convex hull of the costlier options:
        upgrades with falling efficiency."""
        eps = 1e-6
        start, steps = cur, []
        same = [pt for pt in pts if abs(pt[0] - cur[0]) <= eps and pt[1] < cur[1]]
        if same:
            start = min(same, key=lambda t: t[1])
            steps.append(self._step(name, cur, start))
        hull = [start]
        for pt in sorted((pt for pt in pts if pt[0] > cur[0] + eps), key=lambda t: (t[0], t[1])):
            if pt[1] >= hull[-1][1]:
                continue  # costs more, removes nothing
            while len(hull) >= 2:
                (b1, k1, _), (b2, k2, _) = hull[-2], hull[-1]
                if (k1 - pt[1]) / (pt[0] - b1) >= (k1 - k2) / (b2 - b1):
                    hull.pop()
                else:
                    break
            hull.append(pt)
        return steps + [self._step(name, a, b) for a, b in zip(hull, hull[1:])]

    def _step(self, name: str, a, b) -> Step:
        (b1, k1, p1), (b2, k2, p2) = a, b
        reason = self.reasons.get(name, "sensitivity")
        if p2.bits == p1.bits and p2.group_size != p1.group_size:
            reason = "spread_evenly" if self.spread else "sensitivity (smaller group)"
        elif p2.bits == p1.bits and p2.algorithm != p1.algorithm and name not in self.reasons:
            reason = f"rounding ({p2.algorithm})"
        return Step(name, p2, k1 - k2, max(b2 - b1, 0.0), reason, f"{p1.label} -> {p2.label}")

    def plan_at(self, k: int) -> Plan:
        changes: Dict[str, Precision] = {n: q for n, q in self.base.items() if q != self.plan0.modules[n]}
        for st in self.steps[:k]:
            changes[st.module] = st.precision
        reasons: Dict[str, int] = {}
        for st in self.steps[:k]:
            reasons[st.reason] = reasons.get(st.reason, 0) + 1
        note = f"predictive: first {k} of {len(self.steps)} upgrades; drivers: " + \
               ", ".join(f"{r} x{c}" for r, c in sorted(reasons.items(), key=lambda t: -t[1]))
        if self.space.floor is not None:
            note += (f"; from the cheapest rung at or above {self.space.floor:.3g} bits per weight" if self.space.floor
                     else "; from each module's cheapest rung")
        return harmonize_experts(self.plan0.with_changes(changes, note=note))

    def bits_at(self, k: int) -> float:
        """Average bits per weight of plan_at(k)."""
        return (self.base_bits + sum(st.cost for st in self.steps[:k])) / self.plan0.n_params

    def raw_prediction(self, k: int) -> float:
        return max(self.base_kld - sum(st.gain for st in self.steps[:k]), 0.0)

    def raw_of(self, plan: Plan, weigh: Optional[Callable[[Precision], float]] = None) -> float:
        """The additive prediction of any plan whose precisions this planner scored (a module at
        one it did not score counts its starting point's), each precision's score times ``weigh``."""
        w = weigh or (lambda q: 1.0)
        return sum(w(p) * self.kld[n].get(p, self.kld[n].get(self.base[n], 0.0)) for n, p in plan.modules.items()
                   if n in self.kld)

    def predict(self, k: int) -> float:
        """The measured KLD expected for plan_at(k): scale * raw^power, refit on every trial."""
        raw = self.raw_prediction(k)
        return self.scale * raw ** self.power if raw > 0 else 0.0

    def calibrate(self, k: int, measured_kld: float) -> None:
        """Refit the map from the additive (raw) prediction to the measured KLD on every trial so
        far: through the one point with the prior power after one trial, a power law (log-log least
        squares, power in [0.5, 2]) once two trials differ. The raw estimates sum per-module
        contributions measured one at a time; the power absorbs how errors compound when many
        modules are quantized together."""
        raw = self.raw_prediction(k)
        if raw <= 1e-12 or measured_kld <= 0:
            return
        self.measured.append((raw, measured_kld))
        self.scale, self.power = fit_power(self.measured)

    def first_passing(self, target_kld: float, margin: float = 0.9, after: int = -1) -> Optional[int]:
        """The smallest prefix predicted to reach margin x target (and longer than ``after``)."""
        for k in range(max(0, after + 1), len(self.steps) + 1):
            if self.predict(k) <= margin * target_kld:
                return k
        return None

    def bracket_floor(self, lo: Tuple[int, float], hi: Tuple[int, float], target_kld: float,
                      margin: float = 1.0) -> Optional[int]:
        """The smallest step in (lo, hi] that the power law through two measured steps alone (``lo``:
        (step, KLD), failing; ``hi``: passing) predicts to reach margin x target: the planner's own
        map, fit on the bracket the next plans lie in instead of on every trial (plan 0's far point
        bends a global fit: on the demo it predicted 0.0587 for a plan that measured 0.0660). ``hi`` when
        no step in between is predicted to pass; None when the two points give no map (equal raw
        predictions, or the failing plan's KLD not above the passing one's and the target: it failed
        on something else)."""
        (k_lo, m_lo), (k_hi, m_hi) = lo, hi
        r_lo, r_hi = self.raw_prediction(k_lo), self.raw_prediction(k_hi)
        goal = margin * target_kld
        if not (r_lo > r_hi > 0 and m_lo > max(m_hi, goal) and m_hi > 0):
            return None
        power = math.log(m_lo / m_hi) / math.log(r_lo / r_hi)
        return next((k for k in range(k_lo + 1, k_hi)
                     if m_hi * (max(self.raw_prediction(k), 1e-12) / r_hi) ** power <= goal), k_hi)

    def largest_within(self, avg_bits: float) -> int:
        """The longest prefix whose plan stays within the average-bits budget (0 when even the
        starting point does not: see ``fits``)."""
        budget = avg_bits * self.plan0.n_params
        used = self.base_bits
        k = 0
        for st in self.steps:
            if used + st.cost > budget + 1e-6:
                break
            used += st.cost
            k += 1
        return k

    def fits(self, avg_bits: float) -> bool:
        """Whether the starting point itself stays within ``avg_bits``."""
        return self.base_bits <= avg_bits * self.plan0.n_params + 1e-6

    def pack_within(self, avg_bits: float) -> int:
        """The longest prefix within the budget (``largest_within``), then, in order, every later
        step that still fits (a module's steps stay in order: once one is left out, so are its
        later ones), moved up right after it; returns the new prefix length. A prefix stops at the
        first step that does not fit, and one large step (a tied embedding: a fifth of the demo's
        weights) can leave several % of the budget unused; packing fills it with smaller ones."""
        k = self.largest_within(avg_bits)
        left = avg_bits * self.plan0.n_params - sum(self.plan0.module_bits(n) for n in self.plan0.modules) \
            - sum(st.cost for st in self.steps[:k])
        chosen, blocked = [], set()
        for st in self.steps[k:]:
            if st.module in blocked:
                continue
            if st.cost <= left + 1e-6:
                chosen.append(st)
                left -= st.cost
            else:
                blocked.add(st.module)
        taken = {id(st) for st in chosen}
        self.steps = self.steps[:k] + chosen + [st for st in self.steps[k:] if id(st) not in taken]
        return k + len(chosen)

    def frontier(self, points: int = 40) -> List[Tuple[float, float]]:
        """Predicted (avg bits, KLD) along the upgrade sequence: the planner's Pareto curve."""
        out, used = [], self.base_bits
        stride = max(1, len(self.steps) // points)
        for k in range(len(self.steps) + 1):
            if k % stride == 0 or k == len(self.steps):
                out.append((used / self.plan0.n_params, self.predict(k)))
            if k < len(self.steps):
                used += self.steps[k].cost
        return out

    def actions(self, k: int) -> Dict[str, int]:
        """The changes of plan_at(k) by kind: algorithm swaps, more bits, smaller groups, float."""
        out: Dict[str, int] = {}
        final = {n: q for n, q in self.base.items() if q != self.plan0.modules[n]}
        final.update({st.module: st.precision for st in self.steps[:k]})
        for n, p in final.items():
            p0 = self.plan0.modules[n]
            if p.is_float:
                kind = "keep in FP16"
            elif p.bits != p0.bits:
                kind = f"{p0.bits} -> {p.bits} bits"
            elif p.group_size != p0.group_size:
                kind = f"group {p0.group_size or 'ch'} -> {p.group_size or 'ch'}"
            else:
                kind = "same width"
            if not p.is_float and p.algorithm != p0.algorithm:
                kind += f", {p0.algorithm} -> {p.algorithm}"
            out[kind] = out.get(kind, 0) + 1
        return dict(sorted(out.items(), key=lambda t: -t[1]))

    def drivers(self, k: int) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        for st in self.steps[:k]:
            out.setdefault(st.reason, []).append(f"{st.module} -> {st.precision.label}")
        return out
