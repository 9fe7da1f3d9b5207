"""AutoRound (``quantfix.tune``) as the loop's last step (loop.tune=autoround): the tuned weights sit on the grid the
checkpoint stores, float modules stay untouched, and the export reloads to exactly the trial."""
import dataclasses

import pytest
import torch

from tests.conftest import run_report as run
from quantfix.plan import Plan, Precision
from quantfix.quantize import scales
from quantfix import tune as autoround
from tests.conftest import tiny_llama, tiny_overrides

pytest.importorskip("auto_round")


def _plan(model):
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    shapes = {n: tuple(dict(model.named_modules())[n].weight.shape) for n in names}
    mods = {n: Precision(4, 32, True, "imatrix") for n in names}
    mods[names[0]] = Precision(16)
    mods[names[-1]] = Precision(8, 0, True, "gptq_imatrix")
    return Plan(modules=mods, shapes=shapes)


@pytest.mark.parametrize("alg_ext", [False, True])
def test_tuned_weights_are_on_the_checkpoint_grid(tokenizer, alg_ext):
    model = tiny_llama()
    plan = _plan(model)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    samples = torch.randint(2, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    out = autoround.tune(model, tokenizer, plan, samples, torch.float16, autoround.TuneSettings(iters=2, batch_size=2,
                                                                                                  alg_ext=alg_ext))
    # the live model is not touched; the float module is not tuned
    assert all(torch.equal(m.weight, before[n]) for n, m in model.named_modules() if n in before)
    quantized = [n for n, p in plan.modules.items() if not p.is_float]
    assert sorted(out) == sorted(quantized)
    for n in quantized:
        p = plan.modules[n]
        w, scale, zero = out[n]
        assert w.shape == before[n].shape and w.dtype == before[n].dtype
        assert scale.dtype == torch.float16 and scale.shape == (w.shape[0], w.shape[1] // (p.group_size or w.shape[1]))
        # what the engine packs (round(w / scale) + zero, in the checkpoint dtype) gives w back exactly
        again = scales.quantize_with(w.to(torch.float16), scale, zero, p.bits, p.group_size, out_dtype=w.dtype)
        assert torch.equal(again, w)
        assert (w - before[n]).abs().max() > 0  # it is quantized
        if p.symmetric:
            assert torch.all(zero == 0)
    tuned = autoround.tuned_plan(plan)
    assert tuned.modules[quantized[0]].algorithm == "autoround" and tuned.modules[quantized[0]].label.endswith("-ar")
    assert tuned.modules[next(iter(plan.modules))].is_float
    assert tuned.avg_bits == pytest.approx(plan.avg_bits)


@pytest.mark.parametrize("symmetric", [True, False])
def test_algorithm_extension_only_for_symmetric_plans(monkeypatch, tokenizer, caplog, symmetric):
    """AutoRound's extension tunes every module symmetrically (measured: an asymmetric module beside a symmetric
    first one came back with one zero point and signed scales), so a plan with an asymmetric module tunes without it."""
    import auto_round
    from quantfix.errors import QuantfixError
    asked = {}

    def fake(*args, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop here")
    monkeypatch.setattr(auto_round, "AutoRound", fake)
    model = tiny_llama()
    plan = _plan(model)
    last = next(reversed(plan.modules))
    plan = dataclasses.replace(plan, modules={**plan.modules, last: Precision(4, 32, symmetric, "imatrix")})
    samples = torch.randint(2, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(QuantfixError, match="stop here"):
        autoround.tune(model, tokenizer, plan, samples, torch.float16, autoround.TuneSettings(iters=2, alg_ext=True))
    assert asked.get("enable_alg_ext", False) is symmetric
    assert autoround.uses_alg_ext(plan, autoround.TuneSettings(alg_ext=True)) is symmetric  # what the trial's action says
    assert ("symmetric widths only" in caplog.text) is not symmetric
    asked.clear()
    with pytest.raises(QuantfixError):
        autoround.tune(model, tokenizer, plan, samples, torch.float16, autoround.TuneSettings(iters=2))
    assert "enable_alg_ext" not in asked


def test_loop_tunes_the_chosen_plan_and_ships_it_verified(compose, tiny_dir, tmp_path):
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
        "thresholds.max_kld_mean": 1e-6, "loop.ladder": "[3/0,4/0,5/0,6/0,8/0,16/0]", "plan.budget.avg_bits": 4.5,
        "loop.max_iters": 4, "loop.tune": "autoround", "loop.tune_iters": 4, "loop.tune_batch_size": 4}))
    report = run(cfg, tmp_path / "run")
    its = report["iterations"]
    tuned = [it for it in its if it.get("tuned_from") is not None]
    assert len(tuned) == 1
    src = its[tuned[0]["tuned_from"]]
    assert tuned[0]["avg_bits"] == src["avg_bits"] and "-ar" in tuned[0]["plan_summary"]
    assert "algorithm extension" in tuned[0]["action"]  # on by default, and the plan is symmetric
    fin = report["final"]
    kept = tuned[0]["metrics"]["kld_mean"] < src["metrics"]["kld_mean"]
    shipped = tuned[0] if kept else src
    assert fin["plan_summary"] == shipped["plan_summary"]
    # exported statically: the reloaded checkpoint measures what the trial did
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(shipped["metrics"]["kld_mean"], rel=1e-4)
    assert fin["export_gap_pct"] < 0.1


def test_torch_compile_only_for_plans_whose_blocks_share_a_layout(monkeypatch):
    """AutoRound's compiled block forward is specialised to one block layout: a plan whose blocks
    differ would recompile at every block, so the tuning runs eagerly unless told otherwise."""
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    shapes = {n: tuple(dict(model.named_modules())[n].weight.shape) for n in names}
    uniform = Plan(modules={n: Precision(4, 32, True, "imatrix") for n in names}, shapes=shapes)
    one = autoround.block_layouts(uniform)
    assert one == 1 and autoround.use_compile(one, None)
    blocks = sorted({n.split(".layers.")[1].split(".")[0] for n in names})
    assert len(blocks) >= 2
    # one module of each block at its own width: as many layouts as blocks
    mixed = {n: Precision(4, 32, True, "imatrix") for n in names}
    for i, b in enumerate(blocks):
        first = next(n for n in names if f".layers.{b}." in n)
        mixed[first] = Precision(4 + i + 1, 32, True, "imatrix")
    mixed_plan = Plan(modules=mixed, shapes=shapes)
    many = autoround.block_layouts(mixed_plan)
    assert many == len(blocks)
    assert autoround.use_compile(many, None) == (len(blocks) <= autoround.MAX_COMPILED_LAYOUTS)
    monkeypatch.setattr(autoround, "MAX_COMPILED_LAYOUTS", len(blocks) - 1)  # this model has few blocks
    assert not autoround.use_compile(many, None) and autoround.use_compile(one, None)
    assert autoround.use_compile(many, True) and not autoround.use_compile(one, False)
    # float modules are not tuned and do not make a layout
    floated = dict(uniform.modules)
    floated[names[0]] = Precision(16)
    assert autoround.block_layouts(Plan(modules=floated, shapes=shapes)) == 2


def test_budget_mode_tunes_the_best_candidates_and_ships_the_lowest(compose, tiny_dir, tmp_path, monkeypatch):
    """loop.tune_candidates=3: the three measured plans within the budget with the lowest KLD are
    each tuned; the lowest KLD measured ships, exported with its own tuned weights: here the first
    tuning is kept and the later ones (made worse: every code one step up, still on the grid) share
    modules at one precision with it in the bank. The search rounds with imatrix alone: with GPTQ too its
    best plan measured within 0.4% of the first tuning on this model (0.004725 vs 0.004705), a margin the
    suite's thread count could flip; imatrix alone, 0.0078 vs 0.0056."""
    real, calls = autoround.tune, []

    def tune(model, tokenizer, plan, samples, dtype, settings):
        calls.append(plan)  # the first tuning long enough to beat the search's rounding on this model
        out = real(model, tokenizer, plan, samples, dtype, settings if len(calls) > 1 else
                   dataclasses.replace(settings, iters=100))
        if len(calls) == 1:
            return out
        worse = {}
        for n, (w, scale, zero) in out.items():
            p = plan.modules[n]
            step = scale.to(w.dtype).repeat_interleave(p.group_size or w.shape[1], dim=1)
            worse[n] = (scales.quantize_with((w + step).to(dtype), scale, zero, p.bits, p.group_size, out_dtype=w.dtype),
                        scale, zero)
        return worse

    monkeypatch.setattr(autoround, "tune", tune)
    budget = 4.5
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
        "thresholds.max_kld_mean": 1e-6, "loop.ladder": "[3/0,4/0,5/0,6/0,8/0,16/0]", "plan.budget.avg_bits": budget,
        "loop.max_iters": 5, "loop.tune": "autoround", "loop.tune_iters": 4, "loop.tune_batch_size": 4,
        "loop.tune_candidates": 3, "loop.algorithms": "[imatrix]"}))
    report = run(cfg, tmp_path / "run")
    its = report["iterations"]
    tuned = [it for it in its if it.get("tuned_from") is not None]
    untuned = [it for it in its if it.get("tuned_from") is None and it["avg_bits"] <= budget + 1e-6]
    distinct = {it["plan_summary"] for it in untuned}
    assert len(tuned) == min(3, len(distinct)) >= 2
    sources = [its[t["tuned_from"]] for t in tuned]
    assert len({s["plan_summary"] for s in sources}) == len(sources)  # one tuning per plan
    # the sources are the lowest-KLD plans within the budget
    worst_source = max(s["metrics"]["kld_mean"] for s in sources)
    others = [it for it in untuned if it["plan_summary"] not in {s["plan_summary"] for s in sources}]
    assert all(it["metrics"]["kld_mean"] >= worst_source for it in others)
    fin = report["final"]
    lowest = min(tuned + untuned, key=lambda it: it["metrics"]["kld_mean"])
    assert lowest is tuned[0]  # the first tuning kept (the later ones are worse by construction)
    assert fin["plan_summary"] == lowest["plan_summary"]
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(lowest["metrics"]["kld_mean"], rel=1e-4)
    assert fin["export_gap_pct"] < 0.1


def test_the_log_says_what_is_compiled_with_the_algorithm_extension():
    """With AutoRound's algorithm extension the block forward is never compiled (its quantizer says so),
    only the weight quantization function: the tuning's log line says that, not a plain "on"."""
    from auto_round.algorithms.quantization.sign_roundv2.quantizer import SignRoundV2Quantizer

    assert SignRoundV2Quantizer.can_compile_block_forward(None) is False
    assert autoround.compile_words(True, False) == "on" and autoround.compile_words(False, True) == "off"
    assert "quantization function only" in autoround.compile_words(True, True)


def test_autoround_collects_only_what_the_tuning_made(tokenizer, monkeypatch):
    """AutoRound calls gc.collect() about four times per block; the tuning runs with the objects alive before it
    frozen (each of its collections then walks only what the tuning made: 13.4 -> 0.55 s of collections over six
    demo blocks on a 2-core CPU), unfrozen after, and the tuned weights are the ones an unfrozen heap gives."""
    import contextlib
    import gc
    seen, real = [], gc.collect

    def spy(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return real(*args, **kwargs)
    model = tiny_llama()
    plan = _plan(model)
    samples = torch.randint(2, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    settings = autoround.TuneSettings(iters=2, batch_size=2)
    monkeypatch.setattr(gc, "collect", spy)
    frozen = autoround.tune(model, tokenizer, plan, samples, torch.float16, settings)
    assert gc.get_freeze_count() == 0  # unfrozen after
    # ours before the freeze and after it, AutoRound's own between them all frozen
    assert seen[0] == 0 and seen[-1] == 0 and len(seen) >= 4 and all(c > 0 for c in seen[1:-1])
    seen.clear()
    monkeypatch.setattr(autoround, "frozen_heap", contextlib.nullcontext)
    plain = autoround.tune(model, tokenizer, plan, samples, torch.float16, settings)
    assert seen and all(c == 0 for c in seen)
    assert sorted(frozen) == sorted(plain)
    assert all(torch.equal(a, b) for n in frozen for a, b in zip(frozen[n], plain[n]))


def test_the_heap_is_unfrozen_when_the_tuning_fails():
    import gc
    with pytest.raises(RuntimeError, match="boom"):
        with autoround.frozen_heap():
            assert gc.get_freeze_count() > 0
            raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0


def test_a_heap_frozen_before_is_frozen_whole_during_and_frozen_after():
    """A caller's freeze (the H100 machine's Python had one: the objects made after it were still walked by every
    collection) does not stop the tuning's: what was made since is frozen too, and the heap is frozen after."""
    import gc
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        made_since = [[i] for i in range(1000)]  # tracked containers made after the caller's freeze
        with autoround.frozen_heap():
            assert gc.get_freeze_count() >= before + len(made_since)
        assert gc.get_freeze_count() > 0  # frozen again after
        del made_since
    finally:
        gc.unfreeze()


def test_what_dies_frozen_is_freed_after():
    """Garbage among the frozen objects (alive at the freeze, dropped during the tuning) is out of reach of the
    collections inside, and freed by the one after unfreezing, as an unfrozen run's last collection frees it."""
    import gc
    import weakref

    class Node:
        pass
    a = Node()
    a.self = a  # a reference cycle: only a collection frees it
    alive = weakref.ref(a)
    with autoround.frozen_heap():
        del a
        gc.collect()
        assert alive() is not None
    assert alive() is None


def test_torch_is_left_as_autoround_found_it(tokenizer, monkeypatch):
    """AutoRound's construction turns torch's deterministic algorithms on (warn-only) and sets CUBLAS_WORKSPACE_CONFIG
    for the whole process (left on, every torch.empty after it is filled and ops without a deterministic kernel warn).
    After the tuning they are as before, also when the tuning fails."""
    import os
    import auto_round
    during, real = [], auto_round.AutoRound

    def spy(*args, **kwargs):  # AutoRound is a factory: the settings as its construction leaves them
        engine = real(*args, **kwargs)
        during.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return engine
    monkeypatch.setattr(auto_round, "AutoRound", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    model = tiny_llama()
    samples = torch.randint(2, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(False)
        autoround.tune(model, tokenizer, _plan(model), samples, torch.float16, autoround.TuneSettings(iters=1, batch_size=2))
        assert during and during[0][0] and during[0][1]  # AutoRound changed both: the checks below can fail
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        # a caller's own setting (strict, with its own workspace) comes back as it was, also after a failure
        torch.use_deterministic_algorithms(True, warn_only=False)
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        with pytest.raises(RuntimeError, match="boom"):
            with autoround.torch_globals_kept():
                torch.use_deterministic_algorithms(True, warn_only=True)
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
                torch.utils.deterministic.fill_uninitialized_memory = not fill
                raise RuntimeError("boom")
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        assert torch.utils.deterministic.fill_uninitialized_memory == fill
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def test_stable_topk_breaks_ties_by_index():
    """The values of torch.topk; of the elements tied at the k-th value, the lowest indices; sorted by value, equal
    values in index order."""
    x = torch.tensor([0.5, 2.0, 1.0, 1.0, 3.0, 1.0, 2.0, 1.0])
    top = autoround.stable_topk(x, 5)
    assert torch.equal(top.values, torch.topk(x, 5).values)
    assert top.indices.tolist() == [4, 1, 6, 2, 3]  # 3.0, the two 2.0s, then the first two of four tied 1.0s
    assert torch.equal(x[top.indices], top.values)
    unsorted = autoround.stable_topk(x, 5, sorted=False)
    assert sorted(unsorted.indices.tolist()) == [1, 2, 3, 4, 6]
    # bfloat16 errors as AutoRound's loss sees them: hundreds tie at the k-th value
    g = torch.Generator().manual_seed(0)
    d = (torch.randn(200_000, generator=g) * 0.05).abs().bfloat16()
    k = d.numel() // 1000
    kth = torch.topk(d, k).values.min()
    assert int((d == kth).sum()) > int(k - (d > kth).sum()) > 0  # ties cut: the choice among them matters
    a = autoround.stable_topk(d, k).indices
    assert torch.equal(d[a], torch.topk(d, k).values)
    tied = torch.nonzero(d == kth).view(-1)
    chosen = torch.isin(tied, a)
    assert chosen.any() and not chosen.all() and tied[chosen].max() < tied[~chosen].min()  # the first of the tied
    # inputs it does not handle go to torch.topk unchanged
    m = torch.randn(3, 7, generator=g)
    assert torch.equal(autoround.stable_topk(m, 2).indices, torch.topk(m, 2).indices)


@pytest.mark.parametrize("first_bits", [3, 4])
def test_the_outlier_loss_picks_its_outliers_with_stable_topk(tokenizer, monkeypatch, first_bits):
    """With the algorithm extension and a first tuned width below 4 bits, AutoRound leaves the largest output errors
    out of the loss through torch.topk: during quantfix's tuning that call is stable_topk; after it, torch's again.
    ``outlier_loss`` (what the trial's action and the log say) agrees with what AutoRound did."""
    from auto_round.algorithms.quantization.sign_roundv2 import quantizer as v2
    calls = []
    real = autoround.stable_topk

    def spy(x, k, *args, **kwargs):
        calls.append(k)
        return real(x, k, *args, **kwargs)
    monkeypatch.setattr(autoround, "stable_topk", spy)
    model = tiny_llama()
    plan = _plan(model)
    plan = plan.with_changes({n: Precision(3, 32, True, "imatrix") for n, p in plan.modules.items() if p.bits == 4})
    first = next(n for n, p in plan.modules.items() if autoround.tunable(p))
    plan = plan.with_changes({first: Precision(first_bits, 32, True, "imatrix")})
    settings = autoround.TuneSettings(iters=2, batch_size=2, alg_ext=True)
    samples = torch.randint(2, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    autoround.tune(model, tokenizer, plan, samples, torch.float16, settings)
    assert bool(calls) is (first_bits < 4) is autoround.outlier_loss(plan, settings)
    assert all(k >= 1 for k in calls)
    assert v2.torch is torch
    assert not autoround.outlier_loss(plan, dataclasses.replace(settings, alg_ext=False))
    assert autoround.extension_words(plan, settings) == ", algorithm extension" + \
        (" with its outlier loss" if first_bits < 4 else "")
    assert autoround.extension_words(plan, dataclasses.replace(settings, alg_ext=False)) == ""
