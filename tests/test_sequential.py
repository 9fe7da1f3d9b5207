"""Sequential GPTQ (quantize/sequential.py): a plan's GPTQ modules rounded again layer by layer on the
plan's own quantized inputs, and the loop's step that measures it (loop.sequential_gptq)."""
import pytest
import torch

from quantfix import calib
from quantfix.bank import WeightBank
from quantfix.plan import Plan, Precision
from quantfix import sequential
from quantfix.quantize import algorithms
from tests.conftest import run_report, tiny_llama, tiny_overrides


def _bank_and_plan(p: Precision, samples):
    model = tiny_llama(layers=3).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    stats = calib.collect(model, samples, names, 4, progress=False)
    shapes = {n: tuple(dict(model.named_modules())[n].weight.shape) for n in names}
    return model, WeightBank(model, names, stats), Plan(modules={n: p for n in names}, shapes=shapes)


def test_each_layer_is_rounded_on_the_inputs_of_the_quantized_layers_before_it():
    torch.manual_seed(0)
    samples = torch.randint(0, 384, (8, 32))
    p = Precision(3, 32, True, "gptq_imatrix")
    model, bank, plan = _bank_and_plan(p, samples)
    floats = {n: m.weight.detach().clone() for n, m in bank.modules.items()}
    out = sequential.requantize(bank, plan, samples, 4, progress=False)
    assert set(out) == set(plan.modules)
    # the live model holds its float weights again
    assert all(torch.equal(m.weight, floats[n]) for n, m in bank.modules.items())
    # layer 0 reads what the float model gives it: the search's own simulation
    first = [n for n in out if ".layers.0." in n]
    assert first and all(torch.equal(out[n][0], bank.simulate(n, p).to(out[n][0].dtype)) for n in first)
    # later layers are rounded on other Hessians: their weights differ
    later = [n for n in out if ".layers.0." not in n]
    assert any(not torch.equal(out[n][0], bank.simulate(n, p).to(out[n][0].dtype)) for n in later)
    # by definition: with layers 0 and 1 holding their sequential weights, layer 2's float-side
    # statistics are the Hessians its GPTQ sweep used (with the search's scales)
    for n, m in bank.modules.items():
        m.weight.data = (out[n][0] if ".layers.2." not in n else floats[n]).to(m.weight.dtype)
    last = [n for n in out if ".layers.2." in n]
    stats = calib.collect(model, samples, last, 4, progress=False)
    for group in stats.groups().values():
        again = algorithms.get(p.algorithm).simulate_many([floats[n].float() for n in group], p,
                                                          [bank.inputs_with(n, p, stats.of(n)) for n in group])
        # (the engine's own per-column sweep; the CPU's batched one agrees bit for bit)
        assert all(torch.equal(q.to(out[n][0].dtype), out[n][0]) for q, n in zip(again, group))
    # scales: the search's (from the float statistics), which a static export packs
    for n in out:
        s, z = bank.qparams(n, p)
        assert torch.equal(out[n][1], s.cpu()) and torch.equal(out[n][2], z.cpu())


def test_only_gptq_modules_are_rounded_again():
    plan = Plan(modules={"a": Precision(4, 32, True, "imatrix"), "b": Precision(4, 32, True, "gptq"),
                         "c": Precision(16)}, shapes={"a": (8, 64), "b": (8, 64), "c": (8, 64)})
    seq = sequential.sequential_plan(plan)
    assert seq.modules["a"] == plan.modules["a"] and seq.modules["c"] == plan.modules["c"]
    assert seq.modules["b"] == Precision(4, 32, True, sequential.NAME)
    assert seq.avg_bits == plan.avg_bits
    with pytest.raises(RuntimeError, match="sequential GPTQ"):
        seq.modules["b"].alg.simulate(torch.zeros(8, 64), seq.modules["b"], None)


def _sequential_trials(report):
    return [it for it in report["iterations"] if "sequential GPTQ" in (it.get("action") or "")]


@pytest.mark.parametrize("group", [32, 0])
def test_budget_mode_measures_the_chosen_plan_rounded_sequentially_and_ships_the_lower(compose, tiny_dir, tmp_path,
                                                                                       group):
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.bits": 3, "quant.group_size": group, "quant.algorithm": "gptq_imatrix",
        "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 1e-6,
        "loop.ladder": f"[3/{group},4/{group},5/{group},6/{group},8/0,16/0]", "plan.budget.avg_bits": 4.5,
        "loop.max_iters": 4, "loop.algorithms": "[gptq_imatrix]", "loop.sequential_gptq": "true"}))
    report = run_report(cfg, tmp_path / "run")
    seq = _sequential_trials(report)
    assert len(seq) == 1
    its = report["iterations"]
    src = its[seq[0]["tuned_from"]]
    assert seq[0]["avg_bits"] == src["avg_bits"] and "gptq-seq" in seq[0]["plan_summary"]
    best_other = min(it["metrics"]["kld_mean"] for it in its if it is not seq[0] and it["avg_bits"] <= 4.5 + 1e-6)
    assert src["metrics"]["kld_mean"] == best_other  # the search's chosen plan
    kept = seq[0]["metrics"]["kld_mean"] < src["metrics"]["kld_mean"]
    fin = report["final"]
    assert fin["plan_summary"] == (seq[0] if kept else src)["plan_summary"]
    # exported statically: the reloaded checkpoint measures what the shipped trial did
    shipped = seq[0] if kept else src
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(shipped["metrics"]["kld_mean"], rel=1e-4)


def test_off_by_default_in_budget_mode_too(compose, tiny_dir, tmp_path):
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.bits": 3, "quant.group_size": 32, "quant.algorithm": "gptq_imatrix",
        "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 1e-6,
        "loop.ladder": "[3/32,4/32,5/32,8/0,16/0]", "plan.budget.avg_bits": 4.5, "loop.max_iters": 3,
        "loop.algorithms": "[gptq_imatrix]"}))
    assert not _sequential_trials(run_report(cfg, tmp_path / "run"))


@pytest.mark.parametrize("setting", ["true", "false"])
def test_threshold_mode_rounds_the_largest_failing_plan_below_the_passing_one_again(compose, tiny_dir, tmp_path,
                                                                                   setting):
    """On request (off by default) the plan just below the passing one, which ships if it passes now."""
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.bits": 3, "quant.group_size": 32, "quant.algorithm": "gptq_imatrix",
        "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 0.01,
        "loop.ladder": "[3/32,4/32,5/32,6/32,8/0,16/0]", "loop.max_iters": 6, "loop.algorithms": "[gptq_imatrix]",
        "loop.sequential_gptq": setting}))
    report = run_report(cfg, tmp_path / "run")
    seq, its = _sequential_trials(report), report["iterations"]
    if setting == "false":
        assert not seq
        return
    assert len(seq) == 1
    others = [it for it in its if it is not seq[0]]
    passing = [it for it in others if not it["failed"]]
    assert passing, "the thresholds are for a run that passes"
    best = min(passing, key=lambda it: it["avg_bits"])
    below = max((it for it in others if it["failed"] and it["avg_bits"] < best["avg_bits"]), key=lambda it: it["avg_bits"])
    assert its[seq[0]["tuned_from"]] is below or its[seq[0]["tuned_from"]] == below
    assert seq[0]["avg_bits"] == below["avg_bits"]
    shipped = seq[0] if not seq[0]["failed"] else best
    assert report["final"]["plan_summary"] == shipped["plan_summary"]
