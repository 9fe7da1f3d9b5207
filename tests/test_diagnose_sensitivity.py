"""Sensitivity (``quantfix.diagnose.sensitivity``): Fisher scores rank the planted layer first, and
scoring the options in chunks gives what one pass gives."""
import json

import pytest
import torch

from quantfix.diagnose.sensitivity import PassSettings, fisher
from quantfix.quantize import fake
from tests.conftest import LAYER, planted



def _planted_problem(windows: int, seq_len: int):
    """The planted model, its projections, their float and 4-bit RTN weights, eval windows and the float reference."""
    from quantfix import evaluate as ev

    model = planted()
    mods = dict(model.named_modules())
    names = [n for n in mods if n.endswith("proj")]
    fw = {n: mods[n].weight.detach().clone() for n in names}
    qw = {n: fake.rtn(fw[n], 4, 16, True) for n in names}
    ids = torch.randint(0, 384, (windows, seq_len), generator=torch.Generator().manual_seed(0))
    return model, mods, names, fw, qw, ids, ev.reference(model, ids, 2, 16, 64, progress=False)


def _set_weights(mods, weights) -> None:
    with torch.no_grad():
        for n, w in weights.items():
            mods[n].weight.copy_(w)

def test_fisher_ranks_the_planted_layer_first():
    model = planted()
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    qw = {n: fake.rtn(dict(model.named_modules())[n].weight.detach(), 4, 16, True) for n in names}
    s = fisher(model, torch.randint(0, 384, (4, 64), generator=torch.Generator().manual_seed(0)), qw,
               settings=PassSettings(batch_size=2, progress=False))
    assert s.ranked_layers()[0] == LAYER
    top_module = max(s.modules, key=s.modules.get)
    assert f"layers.{LAYER}.self_attn" in top_module


def test_fisher_in_chunks_scores_the_options_of_one_pass():
    from quantfix.diagnose.sensitivity import fisher_chunks

    model = planted()
    mods = dict(model.named_modules())
    names = [n for n in mods if n.endswith("proj")]
    qw = {n: fake.rtn(mods[n].weight.detach(), 4, 16, True) for n in names}
    opts = {n: {f"W{b}": fake.rtn(mods[n].weight.detach(), b, 16, True) for b in (5, 8)} for n in names}
    ids = torch.randint(0, 384, (4, 64), generator=torch.Generator().manual_seed(0))
    one = fisher(model, ids, qw, opts, PassSettings(batch_size=2, progress=False))
    split = fisher_chunks(model, ids, qw, [{n: opts[n]} for n in names], PassSettings(batch_size=2, progress=False))
    assert split.modules == one.modules
    assert set(split.options) == set(one.options)
    for n in names:
        for lab, v in one.options[n].items():
            assert split.options[n][lab] == pytest.approx(v, rel=1e-5)


def test_fisher_draws_its_labels_from_the_float_model_and_estimates_the_kld_of_a_small_change():
    """The labels are drawn from the float model's distribution (as often the top token as its mean
    probability; uniform labels would almost never be, the top token always), and half the mean squared
    label score of one module's change is its exact KL divergence to second order (a small change; 64
    labels per token). With uniform labels the estimate was 2.5x the exact KLD, here 0.98-1.02 (seeds 0-3)."""
    import torch.nn.functional as F
    from quantfix.diagnose.sensitivity import FisherScope
    from tests.conftest import tiny_llama

    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.lm_head.weight *= 6  # a peaked next-token distribution (mean top probability 0.46)
    mods = dict(model.named_modules())
    name = "model.layers.1.mlp.down_proj"
    W = mods[name].weight.detach().clone()
    dW = torch.randn(W.shape, generator=torch.Generator().manual_seed(1)) * 0.01
    ids = torch.randint(0, 384, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = F.log_softmax(model(ids).logits[:, :-1].float(), -1)
        mods[name].weight += dW
        q = F.log_softmax(model(ids).logits[:, :-1].float(), -1)
        mods[name].weight -= dW
    exact = float((p.exp() * (p - q)).sum(-1).mean())
    labels = {}
    s = fisher(model, ids, {name: W + dW}, settings=PassSettings(batch_size=8, label_samples=64, progress=False),
               scope=FisherScope(labels=labels))
    assert 0.85 * exact < s.modules[name] < 1.2 * exact
    assert len(labels) == 2 * 64
    top = p.argmax(-1).reshape(2, 8, 63, 1)
    hits = sum(float((labels[(b, k)] == top[b]).float().mean()) for b, k in labels) / len(labels)
    assert hits == pytest.approx(float(p.exp().amax(-1).mean()), abs=0.03)


def test_fast_takes_both_sides_input_absmax_in_its_own_forwards_over_their_shared_windows(tmp_path):
    """``fast`` records every quantized module's input absmax in Taylor's forwards (the quantized model)
    and in the first Fisher pass's (the float model), over the first windows both passes run in whole
    batches: the values ``activations.input_absmax`` measures on those windows, kept through the cache
    entry; none where the passes share no batch."""
    from quantfix.diagnose import activations
    from quantfix.diagnose.sensitivity import Sensitivity, fast

    model, mods, names, fw, qw, ids, ref = _planted_problem(6, 32)
    float_abs = activations.input_absmax(model, ids[:4], names, 2, progress=False)
    _set_weights(mods, qw)
    quant_abs = activations.input_absmax(model, ids[:4], names, 2, progress=False)
    opts = {n: {"W8": fake.rtn(fw[n], 8, 16, True)} for n in names}
    s = fast(model, ids, ref, fw, qw, PassSettings(batch_size=2, progress=False), fisher_windows=ids[:5],
             option_chunks=iter([opts]))
    assert s.absmax_windows == 4 and set(s.absmax) == {"float", "quantized"}
    for side, want in (("float", float_abs), ("quantized", quant_abs)):
        assert set(s.absmax[side]) == set(names)
        for n in names:
            assert torch.allclose(s.absmax[side][n], want[n], rtol=1e-5, atol=1e-6), (side, n)
    assert not torch.allclose(s.absmax["float"][names[-1]], s.absmax["quantized"][names[-1]])  # after quantized layers
    entry = s.cache_dict()
    assert len(entry["absmax"]["float"]["values"]) == 4 * len(model.model.layers)  # q/k/v and gate/up share one
    again = Sensitivity.from_dict(json.loads(json.dumps(entry)))
    assert all(torch.equal(again.absmax[side][n], s.absmax[side][n]) for side in s.absmax for n in names)
    assert "absmax" not in s.to_dict()
    _set_weights(mods, qw)
    none = fast(model, ids, ref, fw, qw, PassSettings(batch_size=2, progress=False), fisher_windows=ids[:1],
                option_chunks=iter([opts]))
    assert none.absmax == {} and none.absmax_windows == 0


def test_taylor_reports_no_absmax_for_a_module_that_saw_no_input():
    """The running maxima are allocated before the pass (zeros): a hooked module that never runs (an
    expert no token reached) is left out, not reported as all zeros."""
    from quantfix import evaluate as ev
    from quantfix.diagnose.sensitivity import taylor

    model = planted()
    model.unused = torch.nn.Linear(64, 64)  # hooked, never called in the forward pass
    mods = dict(model.named_modules())
    names = [n for n in mods if n.endswith("proj")] + ["unused"]
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = ev.reference(model, ids, 2, 16, 64, progress=False)
    fw = {n: mods[n].weight.detach().clone() for n in names}
    s = taylor(model, ids, ref, fw, None, PassSettings(batch_size=2, progress=False), absmax_windows=4)
    assert "unused" not in s.absmax["quantized"] and len(s.absmax["quantized"]) == len(names) - 1
    assert all(bool((t > 0).any()) for t in s.absmax["quantized"].values())


def test_pass_dtype_is_bfloat16_only_for_a_float32_model_on_a_device_with_native_bfloat16(monkeypatch):
    from quantfix import weights as sens  # the sensitivity passes' and the calibration's
    from tests.conftest import tiny_llama

    model = tiny_llama()
    monkeypatch.setattr(sens, "native_bf16", lambda device: True)
    assert sens.pass_dtype("auto", model) == torch.bfloat16
    assert sens.pass_dtype("model", model) is None
    monkeypatch.setattr(sens, "native_bf16", lambda device: False)
    assert sens.pass_dtype("auto", model) is None  # emulated bfloat16 products are slower than float32's
    assert sens.pass_dtype("bfloat16", model) == torch.bfloat16  # asked for: taken anyway
    model.to(torch.bfloat16)
    monkeypatch.setattr(sens, "native_bf16", lambda device: True)
    assert sens.pass_dtype("auto", model) is None and sens.pass_dtype("bfloat16", model) is None  # already bf16


def test_passes_in_bfloat16_run_the_model_in_bfloat16_and_rank_as_float32_does():
    """With ``PassSettings.dtype`` bfloat16 the forwards of Taylor and Fisher compute their products in
    bfloat16 (autocast: the layers' outputs are bfloat16), the weights are left as they were (float32,
    the same bits), and the scores rank the planted layer first with module scores close to float32's."""
    from scipy.stats import spearmanr
    from quantfix.diagnose.sensitivity import taylor

    model, mods, names, fw, qw, ids, ref = _planted_problem(4, 64)
    seen = []
    hook = mods[names[0]].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    scores = {}
    for dtype in (None, torch.bfloat16):
        seen.clear()
        settings = PassSettings(batch_size=2, label_samples=8, progress=False, dtype=dtype)  # 8: less label noise
        f = fisher(model, ids, qw, settings=settings)
        assert set(seen) == {dtype or torch.float32}
        _set_weights(mods, qw)
        scores[dtype] = f, taylor(model, ids, ref, fw, None, settings)
        _set_weights(mods, fw)
    hook.remove()
    assert all(torch.equal(mods[n].weight, fw[n]) and mods[n].weight.dtype == torch.float32 for n in names)
    for k in range(2):
        a, b = scores[None][k], scores[torch.bfloat16][k]
        assert b.ranked_layers()[0] == LAYER
        rho = spearmanr([a.modules[n] for n in names], [b.modules[n] for n in names]).statistic
        assert rho > 0.9, (k, rho)
        assert sum(b.modules.values()) == pytest.approx(sum(a.modules.values()), rel=0.2)


def test_the_sensitivity_cache_key_names_the_pass_dtype():
    from quantfix.config import SensitivityConfig
    from quantfix.diagnose import sensitivity_cache_key
    from quantfix.planner import initial_plan
    from quantfix.config import QuantConfig
    from tests.conftest import tiny_llama

    plan, _ = initial_plan(tiny_llama(), QuantConfig(bits=4, group_size=32), {})
    ids = torch.zeros(2, 8, dtype=torch.long)
    keys = {sensitivity_cache_key("fp", plan, ids, SensitivityConfig(), None, "w", d) for d in (None, torch.bfloat16)}
    assert len(keys) == 2

