"""Sensitivity (``quantfix.diagnose.sensitivity``): Fisher scores rank the planted layer first, and
scoring the options in chunks gives what one pass gives."""
import pytest
import torch

from quantfix.diagnose.sensitivity import PassSettings, fisher
from quantfix.quantize import fake
from tests.conftest import LAYER, planted


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
