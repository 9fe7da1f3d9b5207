"""Experiment: re-linearize the planner at each plan. Start from a uniform RTN plan; each round,
score every ladder rung of every module (up and down) in the current plan's context, pick the
plan within the budget by a Lagrangian multiple-choice knapsack, apply it, measure it, repeat.

    python scripts/bench_relinearize.py 3 64 4.5 [self|first]

- first: the signed first-order Taylor change only;
- self (default): that plus each module's own second-order term, 1/2 d^T F d for
  d = W_option - W_current (a Fisher pass at float).

Results: benchmarks/README.md. Not used by the loop.
"""
import sys, time, json
import torch
torch.set_num_threads(2); torch.manual_seed(0)
from quantfix import cache as cache_mod, data as D, evaluate as ev, loading as loading_mod, source as source_mod
from quantfix.config import QuantConfig
from quantfix.planner import initial_plan
from quantfix.plan import Plan, Precision
from quantfix.bank import WeightBank
from quantfix.diagnose.sensitivity import PassSettings, taylor, fisher
r = source_mod.resolve("demo", cache_mod.cache_dir()); model, tok = loading_mod.load(r, torch.float32, torch.device("cpu"))
dd = str(D.default_data_dir())
windows = D.eval_windows("wikitext2", dd, tok, 16, 512)
samples = D.calibration_samples(["c4"], dd, tok, 32, 512, 0)
ref = ev.reference(model, windows, 4, 256, 0, progress=False)
start_bits, start_g = int(sys.argv[1]), int(sys.argv[2])
budget = float(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "self"
plan0, _ = initial_plan(model, QuantConfig(algorithm="rtn", bits=start_bits, group_size=start_g), {})
names = list(plan0.modules)
bank = WeightBank(model, names, None)
rungs = [Precision(b, g, True, "rtn") for b, g in [(3, 64), (4, 64), (4, 32), (8, 0)]]
fw = {n: bank.originals[n].clone() for n in names}
sim = {(n, p): bank.simulate(n, p).cpu() for n in names for p in rungs}

def lagrange(cur, est, budget):
    """per module choose option minimizing est + lam*bits; binary search lam for avg bits <= budget"""
    def pick(lam):
        choice, tot = {}, 0.0
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

def sim_cur(n, p):
    return fw[n] if p.is_float else sim[(n, p)]

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
    T = taylor(model, windows[:8], ref, fw, opts, PassSettings(batch_size=4, progress=False))
    est = {}
    if mode == "first":  # signed first order only: the remaining contribution at each rung
        for n in names:
            e = {cur[n]: max(T.modules[n], 0.0), Precision(16, 0, True, "rtn"): 0.0}
            for p in rungs:
                if p != cur[n]:
                    e[p] = max(T.options[n][p.label], 0.0)
            est[n] = e
    else:  # first order (current context) + self term 1/2 d^T F d, d = W_o - W_cur (Fisher at float)
        bank.restore()
        fake = {n: {p.label: fw[n] - (sim_cur(n, p) - sim_cur(n, cur[n]))
                    for p in rungs + [Precision(16, 0, True, "rtn")] if p != cur[n]} for n in names}
        Fs = fisher(model, windows[:4], {n: sim_cur(n, cur[n]) for n in names}, fake, PassSettings(batch_size=2, progress=False))
        for n in names:
            e = {cur[n]: 0.0}
            for p in rungs + [Precision(16, 0, True, "rtn")]:
                if p == cur[n]:
                    continue
                gain = T.modules[n] if p.is_float or T.options[n].get(p.label, 0) <= 0 else \
                    T.modules[n] - T.options[n][p.label]
                e[p] = -gain + Fs.options[n][p.label]
            est[n] = e
    plan, tot = lagrange(cur, est, budget)
    print(f"  taylor {time.perf_counter()-t:.1f}s predicted {tot:.4f}", flush=True)
print(json.dumps(hist))
