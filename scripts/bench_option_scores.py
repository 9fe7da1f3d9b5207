"""Which per-module option estimates plan best? On the demo model (CPU, fp32, RTN: the simulation
equals the exported checkpoint bit for bit), start from W3g64 everywhere, score the ladder
options (W4g64, W4g32, W8) three ways, plan at each budget with the same knapsack, and measure
the real KLD of each plan on WikiText-2 16x512:

- fisher: one Fisher pass in the float context (the default),
- taylor: the first-order Taylor pass in the quantized (plan 0) context,
- hybrid: Taylor's per-module magnitude times Fisher's ratio between options.

    python scripts/bench_option_scores.py [rtn] [--out benchmarks/option_scores_cpu.json]
"""
import sys, time, json
import torch
torch.set_num_threads(2)
torch.manual_seed(0)
from quantfix import cache as cache_mod, data as D, evaluate as ev, loading as loading_mod, source as source_mod
from quantfix.config import QuantConfig
from quantfix.planner import initial_plan
from quantfix.planner import Ladder, ladder_options, PredictivePlanner
from quantfix.bank import WeightBank
from quantfix.calib import collect
from quantfix.diagnose.sensitivity import PassSettings, fisher, taylor
r = source_mod.resolve("demo", cache_mod.cache_dir()); model, tok = loading_mod.load(r, torch.float32, torch.device("cpu"))
dd = str(D.default_data_dir())
windows = D.eval_windows("wikitext2", dd, tok, 16, 512)
samples = D.calibration_samples(["c4"], dd, tok, 32, 512, 0)
ref = ev.reference(model, windows, 4, 256, 0, progress=False)
alg = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "rtn"
out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "benchmarks/option_scores_cpu.json"
plan3, _ = initial_plan(model, QuantConfig(algorithm=alg, bits=3, group_size=64), {"domains": ["c4"]})
names = list(plan3.modules)
stats = collect(model, samples, names, 4, progress=False)
bank = WeightBank(model, names, stats)
options = ladder_options(plan3, Ladder.parse(["3/64", "4/64", "4/32", "8/0", "16/0"]))
opt_w = {n: {lab: bank.simulate(n, p).cpu() for lab, p in o.items()} for n, o in options.items()}
qw = bank.quantized_weights(plan3)
fw = {n: bank.originals[n].clone() for n in names}
t = time.perf_counter(); F_ = fisher(model, windows[:2], qw, opt_w, PassSettings(batch_size=2, progress=False)); tf = time.perf_counter() - t
bank.apply(plan3, progress=False)
m3 = ev.evaluate(model, windows, ref, 4, progress=False)
t = time.perf_counter(); T = taylor(model, windows[:8], ref, fw, opt_w, PassSettings(batch_size=4, progress=False)); tt = time.perf_counter() - t
bank.restore()
print(f"plan0 KLD {m3.kld_mean:.4f}; fisher {tf:.1f}s taylor {tt:.1f}s", flush=True)
variants = {
    "fisher": (F_.modules, F_.options),
    "taylor": ({n: max(v, 0) for n, v in T.modules.items()}, T.options),
    "hybrid": ({n: max(T.modules[n], 0) for n in names},
               {n: {k: max(T.modules[n], 0) * v / max(F_.modules[n], 1e-20) for k, v in o.items()} for n, o in F_.options.items()}),
}
res = {}
for name, (base, opts) in variants.items():
    pl = PredictivePlanner(plan3, base, opts, options, [])
    pl.calibrate(0, m3.kld_mean)
    for b in (4.25, 4.5, 5.0):
        k = pl.largest_within(b); plan = pl.plan_at(k)
        bank.apply(plan, progress=False)
        m = ev.evaluate(model, windows, ref, 4, progress=False)
        res[f"{name}@{b}"] = {"bits": round(plan.avg_bits, 3), "kld": round(m.kld_mean, 4), "pred": round(pl.predict(k), 4), "ppl": round(m.ppl, 3), "plan": plan.summary_str()}
        print(name, b, res[f"{name}@{b}"], flush=True)
    bank.restore()
res["plan0_kld"] = round(m3.kld_mean, 4)
res["seconds"] = {"fisher": round(tf, 1), "taylor": round(tt, 1)}
json.dump(res, open(out, "w"), indent=1)
