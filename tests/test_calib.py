"""Calibration statistics (``quantfix.calib``) against direct computation."""
import pytest
import torch

from quantfix.calib import CalibStats, cache_key, collect
from quantfix.weights import autocast
from tests.conftest import tiny_llama


def test_hessians_and_channel_stats(tmp_path):
    model = tiny_llama(seed=3)
    x = torch.randint(0, 384, (4, 16))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    captured = {}

    def hook(name):
        def h(_m, args):
            captured.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
        return h

    handles = [dict(model.named_modules())[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    path = tmp_path / "stats.pt"
    stats = collect(model, x, names, batch_size=2, cache_path=path, progress=False)
    # q, k, v read one input; gate, up read one input: 4 distinct inputs per layer
    assert len(stats.inputs) == 8 and len(stats.module_input) == 14
    assert stats.module_input["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    for n in names:
        X = torch.cat(captured[n])
        st = stats.of(n)
        assert torch.allclose(st.hessian, X.T @ X, rtol=1e-4, atol=1e-4)
        assert torch.allclose(st.absmax, X.abs().amax(0)) and st.n_tokens == X.shape[0]
        assert torch.allclose(st.absmean, X.abs().mean(0), atol=1e-6)
    again = CalibStats.load(path)
    assert torch.equal(again.of(names[0]).hessian, stats.of(names[0]).hessian)


def test_collect_runs_each_layer_once_per_batch():
    """The hooked pass's outputs feed the next layer: no second forward of the same layer, and the
    statistics equal those of a model whose layers are run again (the outputs are the same)."""
    from quantfix.arch import decoder_layers

    model = tiny_llama(seed=3, layers=3)
    samples = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(1))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in decoder_layers(model)]
    stats = collect(model, samples, names, batch_size=2, progress=False)
    for h in hooks:
        h.remove()
    assert len(calls) == 3 * 2  # 3 layers x 2 batches
    # the last layer's statistics come from inputs computed once: equal to a plain full forward's
    x = {}
    hook = dict(model.named_modules())[names[-1]].register_forward_pre_hook(lambda m, a: x.setdefault("in", []).append(a[0]))
    with torch.no_grad():
        for b in samples.split(2):
            model(input_ids=b, use_cache=False)
    hook.remove()
    xs = torch.cat([t.reshape(-1, t.shape[-1]) for t in x["in"]])
    owner = stats.module_input[names[-1]]
    assert torch.allclose(stats.inputs[owner].hessian, xs.T @ xs, rtol=1e-4, atol=1e-4)


def test_statistics_above_the_cache_limit_are_not_written(tmp_path, monkeypatch):
    """An 8B model's Hessians take 33 GB: writing and re-reading them costs more than computing them,
    so statistics above calib.CACHE_MAX_BYTES are computed and returned but not cached."""
    from quantfix import calib

    model = tiny_llama(seed=3)
    x = torch.randint(0, 384, (2, 16))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    small = collect(model, x, names, batch_size=2, cache_path=tmp_path / "a.pt", progress=False)
    assert (tmp_path / "a.pt").exists() and small.nbytes() > 0
    monkeypatch.setattr(calib, "CACHE_MAX_BYTES", small.nbytes() - 1)
    big = collect(model, x, names, batch_size=2, cache_path=tmp_path / "b.pt", progress=False)
    assert not (tmp_path / "b.pt").exists()
    for k, st in big.inputs.items():
        assert torch.equal(st.hessian, small.inputs[k].hessian)


def test_only_the_diagonal_is_collected_when_no_algorithm_needs_the_hessian(compose, tiny_dir, tmp_path, monkeypatch):
    """quant=rtn with loop.algorithms=[imatrix]: nothing in the run needs a full [in, in] Hessian
    (the imatrix reads E[x^2], its diagonal), so only the diagonal is collected (at 8B: a few MB
    instead of 33 GB); the run measures what it measures with the full Hessians."""
    from tests.conftest import run_report as run
    from quantfix import calib
    from quantfix.recipe import Recipe
    from tests.conftest import tiny_overrides

    seen = []
    real = calib.collect
    monkeypatch.setattr(calib, "collect", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    over = {"loop.algorithms": "[imatrix]", "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 1e-6,
            "plan.budget.avg_bits": 4.5, "quant.bits": 3, "loop.max_iters": 3}
    diag = run(compose(tiny_overrides(tiny_dir, tmp_path / "c1", **over)), tmp_path / "diag")
    monkeypatch.setattr(Recipe, "needs_full_hessian", lambda self: True)
    full = run(compose(tiny_overrides(tiny_dir, tmp_path / "c2", **over)), tmp_path / "full")
    assert [st.hessian.dim() for st in seen[0].inputs.values()] == [1] * len(seen[0].inputs)
    assert {st.hessian.dim() for st in seen[1].inputs.values()} == {2}
    for k, st in seen[0].inputs.items():
        assert torch.allclose(st.diagonal(), seen[1].inputs[k].diagonal(), rtol=1e-4)
    assert [it["plan_summary"] for it in diag["iterations"]] == [it["plan_summary"] for it in full["iterations"]]
    for a, b in zip(diag["iterations"], full["iterations"]):
        assert a["metrics"]["kld_mean"] == pytest.approx(b["metrics"]["kld_mean"], rel=1e-3)
    with pytest.raises(RuntimeError, match="diagonal"):
        next(iter(seen[0].inputs.values())).full()


def test_head_absmax_is_the_diagnosis_float_side_absmax(tmp_path):
    """The calibration pass also keeps each input's absmax over the first samples: equal to what the
    diagnosis measures with the float model on those samples (activations.input_absmax), served
    back only for exactly those token ids (and after a reload from the cache)."""
    from quantfix.diagnose.activations import input_absmax

    model = tiny_llama(seed=3)
    x = torch.randint(0, 384, (6, 16), generator=torch.Generator().manual_seed(4))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    path = tmp_path / "stats.pt"
    stats = collect(model, x, names, batch_size=4, cache_path=path, progress=False, head_samples=3)  # mid-batch
    direct = input_absmax(model, x[:3], names, batch_size=2, progress=False)
    for loaded in (stats, CalibStats.load(path)):
        got = loaded.head_absmax(names, x[:3])
        assert set(got) == set(names)
        for n in names:
            assert torch.allclose(got[n], direct[n], rtol=1e-6, atol=1e-7)
            assert not torch.equal(got[n], loaded.of(n).absmax)  # the head, not all six samples
        assert loaded.head_absmax(names, x[:2]) == {}  # other samples: not served
        assert loaded.head_absmax(names, x[1:4]) == {}
    assert collect(model, x, names, batch_size=4, progress=False).head_absmax(names, x[:3]) == {}  # not asked for


def test_input_absmax_stops_before_the_head_unless_it_reads_it():
    """``input_absmax`` needs no logits: it stops after the last decoder block (the vocabulary-wide head
    never runs) with the same absmax a full forward pass gives; asked for the head's own input it runs it."""
    from quantfix.diagnose.activations import input_absmax

    model = tiny_llama(seed=3)
    x = torch.randint(0, 384, (5, 16), generator=torch.Generator().manual_seed(4))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    head_calls, full = [], {}
    hooks = [model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))]
    hooks += [dict(model.named_modules())[n].register_forward_pre_hook(
        lambda _m, a, n=n: full.__setitem__(n, torch.maximum(full[n], a[0].abs().amax((0, 1))) if n in full
                                            else a[0].abs().amax((0, 1)))) for n in names]
    with torch.no_grad():
        for ids in x.split(2):
            model(input_ids=ids, use_cache=False)
    assert len(head_calls) == 3
    got = input_absmax(model, x, names, batch_size=2, progress=False)
    assert len(head_calls) == 3  # stopped after the last block: the head did not run
    for n in names:
        assert torch.equal(got[n], full[n].float())
    with_head = input_absmax(model, x, names + ["lm_head"], batch_size=2, progress=False)
    assert len(head_calls) == 6 and with_head["lm_head"].shape == (model.config.hidden_size,)
    for h in hooks:
        h.remove()


def test_cpu_hessians_accumulate_the_lower_triangle_and_mirror_it_to_the_full_product():
    """``add_gram`` computes only the blocks on and below the diagonal on the CPU; ``symmetric`` mirrors
    them: the full product's values over several batches (the same bits on this BLAS), exactly
    symmetric, for widths that the blocks divide and that they do not; a width below two per block is one
    full product, as before."""
    from quantfix.calib import add_gram, symmetric

    torch.manual_seed(0)
    for d in (576, 100, 7):
        scale = torch.rand(d) * 3
        full, blocked = torch.zeros(d, d), torch.zeros(d, d)
        for _ in range(3):
            x = torch.randn(300, d) * scale
            full.addmm_(x.T, x)
            add_gram(blocked, x)
        left_out = torch.count_nonzero(torch.triu(blocked, 1 + -(-d // 4)))  # above the diagonal blocks
        h = symmetric(blocked)
        assert h is blocked  # mirrored in place
        assert torch.allclose(h, full, rtol=1e-5, atol=1e-4)
        if d < 8:
            assert torch.equal(h, full)
            continue
        assert left_out == 0 and torch.count_nonzero(torch.triu(h, 1 + -(-d // 4))) > 0
        assert torch.equal(h, h.T) and torch.equal(torch.tril(h), torch.tril(full)), d


def test_a_bfloat16_forward_keeps_float32_statistics_near_the_float32_passes():
    """Under autocast the layers compute in bfloat16 (their products, as a bfloat16 model's on a GPU), the
    statistics still accumulate in float32, near the float32 pass's; the weights stay float32."""
    model = tiny_llama(seed=3)
    x = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(1))
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    dtypes = []
    hook = dict(model.named_modules())[names[0]].register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    a = collect(model, x, names, batch_size=2, progress=False)
    seen_fp32, dtypes[:] = set(dtypes), []
    with autocast(model, torch.bfloat16):
        b = collect(model, x, names, batch_size=2, progress=False)
    hook.remove()
    assert seen_fp32 == {torch.float32} and set(dtypes) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    rel = {}
    for k, st in a.inputs.items():
        hb = b.inputs[k].hessian
        assert hb.dtype == torch.float32 and b.inputs[k].absmax.dtype == torch.float32
        rel[k] = float((hb - st.hessian).norm() / st.hessian.norm())
    assert max(rel.values()) < 0.02, rel  # to bfloat16's precision
    # the first layer's attention input is the embedding's, normed in float32: the same; every input
    # after a product computed in bfloat16 differs
    assert rel["model.layers.0.self_attn.q_proj"] == 0
    assert all(v > 0 for k, v in rel.items() if k != "model.layers.0.self_attn.q_proj"), rel
    ids = torch.zeros(2, 8, dtype=torch.long)
    keys = {cache_key("fp", ids, names, True, 0, d) for d in (None, torch.bfloat16)}
    assert len(keys) == 2 and cache_key("fp", ids, names) in keys  # the key of a model-dtype pass as before


def test_data_dtype_reaches_the_calibration_pass_and_its_cache_key(compose, tiny_dir, tmp_path, monkeypatch):
    """``data.dtype=bfloat16``: the run's calibration pass computes in bfloat16 and caches under its own
    key; ``model`` (the tests' default) in the model's float32."""
    from quantfix import calib
    from tests.conftest import run_report as run
    from tests.conftest import tiny_overrides

    seen = []
    real = calib.collect

    def record(*a, **k):
        on = torch.is_autocast_enabled("cpu")
        seen.append((torch.get_autocast_dtype("cpu") if on else None, k["cache_path"].name))
        return real(*a, **k)

    monkeypatch.setattr(calib, "collect", record)
    for dtype in ("bfloat16", "model"):
        run(compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{"mode": "diagnose", "data.dtype": dtype,
                                                                     "diagnose.probes": "false"})), tmp_path / dtype)
    assert [d for d, _ in seen] == [torch.bfloat16, None] and seen[0][1] != seen[1][1]
    assert len(list((tmp_path / "cache" / "calib").iterdir())) == 2
