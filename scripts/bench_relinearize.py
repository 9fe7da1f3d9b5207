"""Experiment: re-linearize the planner at each plan. Start from a uniform RTN plan, score every
ladder rung of every module (up and down) with the first-order Taylor pass in the current plan's
context, pick the plan within the budget by a Lagrangian multiple-choice knapsack, apply, repeat.

    python scripts/bench_relinearize.py 3 64 4.5      # start W3g64, budget 4.5 bits

Measured (benchmarks/README.md): it oscillates, because first-order gains miss each module's own
second-order term; not used by the loop.
"""
import sys, time, json
import torch
torch.set_num_threads(2); torch.manual_seed(0)
from quantfix import model as M, data as D, evaluate as ev
from quantfix.config import QuantConfig
from quantfix.planner import initial_plan, parse_rung
from quantfix.plan import Plan, Precision
from quantfix.quantize import WeightBank
from quantfix.quantize.calib import collect
from quantfix.diagnose.sensitivity import taylor
r = M.resolve("demo", M.cache_dir()); model, tok = M.load(r, torch.float32, torch.device("cpu"))
dd = str(D.default_data_dir())
windows = D.eval_windows("wikitext2", dd, tok, 16, 512)
samples = D.calibration_samples(["c4"], dd, tok, 32, 512, 0)
ref = ev.reference(model, windows, 4, 256, 0, progress=False)
start_bits, start_g = int(sys.argv[1]), int(sys.argv[2])
budget = float(sys.argv[3])
plan0, _ = initial_plan(model, QuantConfig(algorithm="rtn", bits=start_bits, group_size=start_g), {})
names = list(plan0.modules)
bank = WeightBank(model, names, None)
rungs = [Precision(b, g, True, "rtn") for b, g in [(3, 64), (4, 64), (4, 32), (8, 0)]]
fw = {n: bank.originals[n].clone() for n in names}
sim = {(n, p): bank.simulate(n, p).cpu() for n in names for p in rungs}

def lagrange(cur, est, budget):
    """per module choose option minimizing est + lam*bits; binary search lam for avg bits <= budget"""
    def pick(lam):
        choice, bits, tot = {}, 0.0, 0.0
        for n in names:
            out_f, in_f = plan0.shapes[n]
            best = None
            for p, e in est[n].items():
                c = e + lam * p.bits_per_weight(in_f) * out_f * in_f
                if best is None or c < best[0]:
                    best = (c, p, e)
            choice[n] = best[1]; tot += best[2]
        pl = Plan(choice, plan0.shapes, plan0.other_params)
        return pl, tot
    lo, hi = 0.0, 1e-3
    while pick(hi)[0].avg_bits > budget: hi *= 4
    for _ in range(50):
        mid = (lo + hi) / 2
        if pick(mid)[0].avg_bits > budget: lo = mid
        else: hi = mid
    return pick(hi)

plan = plan0
hist = []
for rnd in range(4):
    bank.apply(plan, progress=False)
    m = ev.evaluate(model, windows, ref, 4, progress=False)
    hist.append({"round": rnd, "bits": round(plan.avg_bits, 3), "kld": round(m.kld_mean, 4), "plan": plan.summary_str()})
    print(hist[-1], flush=True)
    if rnd == 3: break
    cur = {n: plan.modules[n] for n in names}
    opts = {n: {p.label: sim[(n, p)] for p in rungs if p != cur[n]} for n in names}
    t = time.perf_counter()
    T = taylor(model, windows[:8], ref, fw, opts, batch_size=4, progress=False)
    est = {}
    for n in names:
        base = T.modules[n]   # signed first-order contribution at current
        e = {cur[n]: max(base, 0.0), Precision(16, 0, True, "rtn"): 0.0}
        for p in rungs:
            if p != cur[n]:
                e[p] = max(T.options[n][p.label], 0.0)
        est[n] = e
    plan, tot = lagrange(cur, est, budget)
    print(f"  taylor {time.perf_counter()-t:.1f}s predicted {tot:.4f}", flush=True)
print(json.dumps(hist))
