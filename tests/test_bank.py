"""The weight bank (``quantfix.bank``): trial weights simulated per plan (GPTQ once per shared input,
lazily per module) against direct computation."""
import torch

from quantfix.calib import collect
from tests.conftest import tiny_llama


def test_weight_bank_gptq_groups_shared_inputs_like_separate_runs(monkeypatch):
    """q/k/v (and gate/up) read one input: the bank runs GPTQ once over their stacked rows, which
    must give each module the weights a separate GPTQ run on its own would."""
    from quantfix.plan import Plan, Precision
    from quantfix.quantize import fake
    from quantfix.bank import WeightBank

    model = tiny_llama(seed=4)
    x = torch.randint(0, 384, (4, 32))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    stats = collect(model, x, names, batch_size=2, progress=False)
    p = Precision(4, 32, True, "gptq")
    bank = WeightBank(model, names, stats)
    mods = dict(model.named_modules())
    calls = []

    from quantfix.quantize import gptq

    real = gptq.sweep
    monkeypatch.setattr(gptq, "sweep", lambda W, *a, **k: calls.append(W.shape) or real(W, *a, **k))
    got = bank.quantized_weights(Plan({n: p for n in names}, {n: tuple(mods[n].weight.shape) for n in names}))
    assert len(calls) == len(stats.inputs) == 8  # one sweep per distinct input, not one per module
    monkeypatch.undo()
    for n in names:
        alone = fake.gptq(mods[n].weight.detach().float(), stats.of(n).hessian, 4, 32, True)
        assert torch.allclose(got[n], alone, atol=1e-6), n
        assert not torch.equal(got[n], fake.rtn(mods[n].weight.detach(), 4, 32, True)), n


def test_plan_weights_are_computed_when_asked(monkeypatch):
    """``WeightBank.quantized_weights`` hands out a mapping that simulates each module when it is
    read (an 8B plan's weights would take 14 GB at once), with the values ``simulate`` gives."""
    from quantfix.plan import Plan, Precision
    from quantfix.bank import WeightBank

    model = tiny_llama(seed=4)
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    bank = WeightBank(model, names)
    mods = dict(model.named_modules())
    plan = Plan({n: Precision(4, 32, True, "rtn") for n in names}, {n: tuple(mods[n].weight.shape) for n in names})
    calls = []
    real = WeightBank.simulate
    monkeypatch.setattr(WeightBank, "simulate", lambda self, n, p: calls.append(n) or real(self, n, p))
    lazy = bank.quantized_weights(plan)
    assert calls == [] and len(lazy) == len(names) and set(lazy) == set(names)
    w = lazy[names[3]]
    assert calls == [names[3]] and w.dtype == bank.originals[names[3]].dtype
    assert torch.equal(w, real(bank, names[3], plan.modules[names[3]]).to(w.dtype))


def test_each_scale_search_runs_once_when_threads_simulate_options_together(monkeypatch):
    """A module's imatrix option and its GPTQ option (whose sweep starts from the same scales) are
    simulated by two CPU threads at once: the scale search runs once per module, width and method,
    and the options come out as a one-thread run computes them."""
    from quantfix.bank import WeightBank
    from quantfix.plan import Precision
    from quantfix.quantize import scales

    model = tiny_llama(seed=4)
    x = torch.randint(0, 384, (4, 32))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    stats = collect(model, x, names, batch_size=2, progress=False)
    rungs = [(4, 64), (4, 32), (5, 64), (6, 64), (8, 0)]
    options = {n: {f"{a}{b}/{g}": Precision(b, g, True, a) for b, g in rungs for a in ("imatrix", "gptq_imatrix")}
               for n in names}
    searches = []
    real = scales.search_qparams
    monkeypatch.setattr(scales, "search_qparams", lambda W, bits, g, sym, method, importance=None:
                        searches.append((tuple(W.shape), float(W.double().sum()), bits, g, sym, method))
                        or real(W, bits, g, sym, method, importance=importance))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = WeightBank(model, names, stats).simulate_options(options)
        torch.set_num_threads(1)
        alone = WeightBank(model, names, stats).simulate_options(options)
    finally:
        torch.set_num_threads(threads)
    per_run = len(names) * len(rungs)  # imatrix and GPTQ share each module's search at each width
    assert len(searches) == 2 * per_run and len(set(searches)) == per_run
    for n in names:
        for label in options[n]:
            assert torch.equal(together[n][label], alone[n][label]), (n, label)


def test_an_undone_recalibration_serves_the_old_simulations_again(monkeypatch):
    """New statistics drop every kept simulation; handing back what was dropped with the old
    statistics (the recalibration undone) serves it again, no sweep run, while a plan simulated
    with the new statistics differs."""
    from quantfix.plan import Plan, Precision
    from quantfix.bank import WeightBank
    from quantfix.quantize import gptq

    model = tiny_llama(seed=4)
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    old = collect(model, torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(1)), names,
                  batch_size=2, progress=False)
    new = collect(model, torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(2)), names,
                  batch_size=2, progress=False)
    mods = dict(model.named_modules())
    plan = Plan({n: Precision(3, 32, True, "gptq") for n in names}, {n: tuple(mods[n].weight.shape) for n in names})
    bank = WeightBank(model, names, old)
    before = {n: w.clone() for n, w in bank.quantized_weights(plan).items()}
    calls = []
    real = gptq.sweep
    monkeypatch.setattr(gptq, "sweep", lambda W, *a, **k: calls.append(W.shape) or real(W, *a, **k))
    aside = bank.use_stats(new)
    recalibrated = dict(bank.quantized_weights(plan).items())
    assert len(calls) == 8 and any(not torch.equal(recalibrated[n], before[n]) for n in names)
    bank.use_stats(old, aside)
    again = dict(bank.quantized_weights(plan).items())
    assert len(calls) == 8  # served, not simulated again
    assert all(torch.equal(again[n], before[n]) for n in names)
    bank.use_stats(new, aside)  # statistics it was not computed from: not served
    assert bank.quantized_weights(plan)[names[0]] is not None and len(calls) > 8


def test_weights_tuned_again_for_the_live_precision_are_applied():
    """Two tunings of plans that share a module's precision: the bank serves the one handed in last,
    and a module live with the other's weights is rewritten by the next apply (the kept tuning of
    several is measured for the report and exported with its own weights)."""
    from quantfix.plan import Plan, Precision
    from quantfix.bank import WeightBank

    model = tiny_llama(seed=4)
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    mods = dict(model.named_modules())
    plan = Plan({n: Precision(4, 32, True, "autoround") for n in names}, {n: tuple(mods[n].weight.shape) for n in names})
    bank = WeightBank(model, names)
    first = {n: bank.originals[n] * 0.5 for n in names}
    second = {n: bank.originals[n] * 0.25 for n in names}
    bank.use_tuned(plan, second)
    bank.apply(plan, progress=False)
    assert torch.equal(mods[names[0]].weight, second[names[0]].to(mods[names[0]].weight.dtype))
    bank.use_tuned(plan, first)  # the first tuning kept after all: served again
    assert bank.apply(plan, progress=False) == len(names)
    assert all(torch.equal(mods[n].weight, first[n].to(mods[n].weight.dtype)) for n in names)


def test_an_accelerator_searches_every_modules_scales_of_a_width_at_once(monkeypatch):
    """On an accelerator each scale search is a short sequence of tiny kernels (the demo's 2100 took 31
    of an H100's 54 s of option simulation): the bank searches all modules' imatrix scales of a width in
    one batched search before the jobs run, and the options (imatrix and GPTQ, which starts from the same
    scales) come out bit for bit as the CPU's search per module makes them."""
    from quantfix.bank import WeightBank
    from quantfix.plan import Precision
    from quantfix.quantize import scales

    model = tiny_llama(seed=4)
    x = torch.randint(0, 384, (4, 32))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    stats = collect(model, x, names, batch_size=2, progress=False)
    rungs = [(4, 64), (4, 32), (3, 64), (8, 0)]
    options = {n: {f"{a}{b}/{g}": Precision(b, g, b != 3, a) for b, g in rungs for a in ("imatrix", "gptq_imatrix")}
               for n in names}
    per_module = WeightBank(model, names, stats).simulate_options(options)
    single, many = [], []
    real_one, real_many = scales.search_qparams, scales.search_imatrix_many
    monkeypatch.setattr(scales, "search_qparams", lambda *a, **k: single.append(a[1:4]) or real_one(*a, **k))
    monkeypatch.setattr(scales, "search_imatrix_many", lambda *a, **k: many.append(a[1:4]) or real_many(*a, **k))
    monkeypatch.setattr(WeightBank, "_on_cpu", lambda self, jobs: False)
    batched = WeightBank(model, names, stats).simulate_options(options)
    assert sorted(many) == sorted((b, g, b != 3) for b, g in rungs) and single == []
    for n in names:
        for label in options[n]:
            assert torch.equal(batched[n][label], per_module[n][label]), (n, label)


def test_cuda_sweeps_the_gptq_stacks_of_one_shape_in_one_fixed_engine_call_per_precision(monkeypatch):
    """On CUDA each engine GPTQ call is a short kernel sequence (the demo has 120 stacks x 4 GPTQ options):
    the bank sweeps every stack of one shape in one batched ``quantize_weight`` call per precision (on the
    CPU that call's weights are bit for bit the sweep per stack's), and the batch is every stack of that
    shape whatever was asked for: CUDA's batched sweep rounds a few weights differently from its single
    sweep, so a module's weights must not depend on which others were simulated with it."""
    from llmcompressor.modifiers.gptq import gptq_quantize

    from quantfix import bank as bank_module
    from quantfix.bank import WeightBank
    from quantfix.plan import Precision

    model = tiny_llama(seed=4)
    x = torch.randint(0, 384, (4, 32))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    stats = collect(model, x, names, batch_size=2, progress=False)
    ps = [Precision(4, 32, True, "gptq_imatrix"), Precision(3, 64, False, "gptq_imatrix")]
    options = {n: {f"{p.bits}/{p.group_size}": p for p in ps} for n in names}
    per_stack = WeightBank(model, names, stats).simulate_options(options)
    batches = []
    real_engine = gptq_quantize.quantize_weight
    monkeypatch.setattr(gptq_quantize, "quantize_weight", lambda W, *a, **k: batches.append(W.shape[0]) or real_engine(W, *a, **k))
    monkeypatch.setattr(WeightBank, "_on_cpu", lambda self, jobs: False)
    monkeypatch.setattr(bank_module, "SWEEP_TOGETHER_ON", ("cpu",))  # CUDA's path, on this CPU
    batched = WeightBank(model, names, stats).simulate_options(options)
    layers = len(model.model.layers)
    # four input shapes per layer (q/k/v, o, gate/up, down), each one call per precision over every layer
    assert sorted(batches) == [layers] * (4 * len(ps)), batches
    for n in names:
        for label in options[n]:
            assert torch.equal(batched[n][label], per_stack[n][label]), (n, label)
    # one module's option alone: still swept with every stack of its shape, and the same weights
    batches.clear()
    bank = WeightBank(model, names, stats)
    one = bank.simulate_options({names[0]: {"4/32": ps[0]}})
    assert batches == [layers]
    assert torch.equal(one[names[0]]["4/32"], per_stack[names[0]]["4/32"])
    # the batch's other stacks were computed: kept for the trials that will ask for them, not swept again
    other = next(n for n in names if n.endswith("q_proj") and n != names[0])  # another layer's q_proj
    assert torch.equal(bank.simulate(other, ps[0]).to(per_stack[other]["4/32"].dtype), per_stack[other]["4/32"])
    assert batches == [layers]
    # handed back, not kept (a chunk of a large model's options): only what was asked for comes back
    fresh = WeightBank(model, names, stats)
    handed = fresh.simulate_options({names[0]: {"4/32": ps[0]}}, keep=False)
    assert torch.equal(handed[names[0]]["4/32"], per_stack[names[0]]["4/32"]) and not fresh._sim
    # stacks above SWEEP_TOGETHER_MAX: each its own job, as before (here the CPU's own sweep: no engine call)
    batches.clear()
    monkeypatch.setattr(bank_module, "SWEEP_TOGETHER_MAX", 0)
    alone = WeightBank(model, names, stats).simulate_options(options)
    assert batches == []
    assert all(torch.equal(alone[n][k], per_stack[n][k]) for n in names for k in options[n])
