"""Metrics against direct computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from quantfix import evaluate as ev
from quantfix.quantize import fake
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 384, (4, 32), generator=g)
    return model, windows


def _quantized_copy(model, bits=3):
    q = tiny_llama(seed=1)
    with torch.no_grad():
        for n, m in q.named_modules():
            if isinstance(m, torch.nn.Linear) and "layers" in n:
                m.weight.copy_(fake.rtn(m.weight, bits, 0, True))
    return q


def test_float_model_against_itself(setup):
    model, windows = setup
    ref = ev.reference(model, windows, 2, topk=16, full_max_mb=64, progress=False)
    m = ev.evaluate(model, windows, ref, 2, progress=False)
    assert m.kld_mean == pytest.approx(0, abs=1e-6) and m.top1 == 1.0
    # PPL equals exp of the model's own mean cross-entropy
    with torch.no_grad():
        loss = model(windows, labels=windows).loss
    assert m.ppl == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert ev.baseline_metrics(ref).ppl == pytest.approx(m.ppl, rel=1e-5)


def test_kld_and_top1_against_direct_computation(setup):
    model, windows = setup
    q = _quantized_copy(model)
    ref = ev.reference(model, windows, 2, topk=16, full_max_mb=64, progress=False)
    assert ref.full_logp is not None
    m = ev.evaluate(q, windows, ref, 2, progress=False)
    with torch.no_grad():
        p = F.log_softmax(model(windows).logits[:, :-1].float(), -1).reshape(-1, 384)
        lq = F.log_softmax(q(windows).logits[:, :-1].float(), -1).reshape(-1, 384)
    kl = (p.exp() * (p - lq)).sum(-1)
    assert m.kld_mean == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-5)
    assert m.kld_max == pytest.approx(float(kl.max()), rel=1e-3)
    assert m.top1 == pytest.approx(float((p.argmax(-1) == lq.argmax(-1)).float().mean()))
    assert m.kld_mean > 0.001


def test_topk_kld_is_a_tight_lower_bound(setup):
    model, windows = setup
    q = _quantized_copy(model)
    full = ev.evaluate(q, windows, ev.reference(model, windows, 2, 16, 64, progress=False), 2, progress=False)
    small = ev.evaluate(q, windows, ev.reference(model, windows, 2, 8, 0, progress=False), 2, progress=False)
    big = ev.evaluate(q, windows, ev.reference(model, windows, 2, 256, 0, progress=False), 2, progress=False)
    # coarsening the distribution can only lose divergence; more tokens lose less
    assert small.kld_mean <= big.kld_mean + 1e-6 <= full.kld_mean + 1e-6
    assert full.kld_mean - big.kld_mean < full.kld_mean - small.kld_mean
    assert small.ppl == pytest.approx(full.ppl, rel=1e-5) and small.top1 == full.top1


def test_reference_cache_round_trip(setup, tmp_path):
    model, windows = setup
    path = tmp_path / "ref.pt"
    a = ev.reference(model, windows, 2, 8, 0, cache_path=path, progress=False)
    assert path.exists()
    b = ev.reference(None, windows, 2, 8, 0, cache_path=path, progress=False)  # no model needed when cached
    assert torch.equal(a.top_idx, b.top_idx) and torch.equal(a.nll, b.nll)


def test_topk_kld_is_tight_when_topk_holds_the_mass():
    model, q = tiny_llama(seed=1), None
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # peaked next-token distributions, as in trained LMs
    q = _quantized_copy(model, bits=4)
    with torch.no_grad():
        q.lm_head.weight.copy_(model.lm_head.weight)
    windows = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    full = ev.evaluate(q, windows, ev.reference(model, windows, 2, 16, 64, progress=False), 2, progress=False)
    top = ev.evaluate(q, windows, ev.reference(model, windows, 2, 64, 0, progress=False), 2, progress=False)
    assert top.kld_mean == pytest.approx(full.kld_mean, rel=0.05)


@pytest.mark.parametrize("full_max_mb", [256, 0], ids=["full", "topk"])
def test_nan_model_has_top1_zero_not_one(tokenizer, full_max_mb):
    # the case: NaN logits on both sides agreed everywhere (argmax of a NaN row), top-1 1.0
    model = tiny_llama()
    windows = torch.randint(2, 384, (2, 16))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")  # every logit row becomes NaN
    ref = ev.reference(model, windows, 2, 8, full_max_mb, progress=False)
    m = ev.evaluate(model, windows, ref, 2, progress=False)
    assert math.isnan(m.ppl) and m.top1 == 0.0
    assert ev.baseline_metrics(ref).top1 == 0.0
    assert ev.locate_nonfinite(model, windows[:1]).startswith("model.layers.0.mlp.down_proj.weight (1 nan values")


def test_locate_nonfinite_finds_the_first_module_with_a_nonfinite_output():
    model = tiny_llama()
    windows = torch.randint(2, 384, (1, 8))
    assert ev.locate_nonfinite(model, windows) is None
    mlp = model.model.layers[1].mlp
    mlp.register_forward_hook(lambda m, a, out: out * float("inf"))  # finite weights, inf activations
    assert ev.locate_nonfinite(model, windows) == "model.layers.1.mlp (non-finite output)"


def test_evaluator_scores_the_second_half_like_llama_perplexity():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 11)

    class M(torch.nn.Module):
        def get_input_embeddings(self):
            return torch.nn.Embedding(11, 2)

        def forward(self, input_ids, use_cache=False):
            return type("O", (), {"logits": logits[: input_ids.shape[0]]})()

    windows = torch.randint(0, 11, (2, 8))
    logp = torch.log_softmax(logits[:, :-1], -1).reshape(-1, 11)
    ref = ev.Reference(-logp.gather(1, windows[:, 1:].reshape(-1, 1))[:, 0], torch.zeros(14, 0, dtype=torch.long),
                    torch.zeros(14, 0), logp)
    full, half = ev.Evaluator(ref)(M(), windows, 2, False), ev.Evaluator(ref, skip=4)(M(), windows, 2, False)
    assert full.n_tokens == 14 and half.n_tokens == 2 * (8 - 1 - 4)  # llama-perplexity: n_ctx - 1 - n_ctx/2
    nll = ref.nll.reshape(2, 7)[:, 4:]
    assert half.nll == pytest.approx(float(nll.mean()), rel=1e-6) and half.kld_mean == pytest.approx(0, abs=1e-6)
    assert ev.baseline_metrics(ref, 7, 4).nll == pytest.approx(half.nll, rel=1e-6)



def test_full_reference_is_fp16_and_exact_in_chunks(setup, monkeypatch):
    # the full reference is stored in fp16 (half the memory of float32) and scored a few rows at a
    # time; the KL still equals the float32 computation, and the float model scores 0 against it
    model, windows = setup
    q = _quantized_copy(model)
    ref = ev.reference(model, windows, 2, topk=16, full_max_mb=64, progress=False)
    assert ref.full_logp.dtype == torch.float16 and ref.neg_entropy.shape == ref.nll.shape
    whole = ev.evaluate(q, windows, ref, 2, progress=False)
    monkeypatch.setattr(ev, "_FULL_ROWS", 3)
    chunked = ev.evaluate(q, windows, ref, 2, progress=False)
    assert chunked.kld_mean == pytest.approx(whole.kld_mean, rel=1e-5)
    assert ev.evaluate(model, windows, ref, 2, progress=False).kld_mean == pytest.approx(0, abs=1e-6)


class _Counting(torch.nn.Module):
    """Wraps a causal LM, counting forward passes; ``stuck``: its logits always favour that token."""

    def __init__(self, model, stuck=None):
        super().__init__()
        self.model, self.stuck, self.calls = model, stuck, 0

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, **kw):
        self.calls += 1
        out = self.model(input_ids=input_ids, **kw)
        if self.stuck is not None:
            out.logits[..., self.stuck] += 1e4
        return out


def test_greedy_repeats_names_a_stuck_model_and_stops_a_healthy_one_at_its_second_token(setup):
    from tests.conftest import tiny_tokenizer

    model, windows = setup
    window = torch.randint(0, 384, (ev.GREEDY_PROMPT + 8,), generator=torch.Generator().manual_seed(3))
    stuck = _Counting(model, stuck=17)
    token, text = ev.greedy_repeats(stuck, tiny_tokenizer(), window)
    assert token == 17 and stuck.calls == ev.GREEDY_NEW and isinstance(text, str)
    healthy = _Counting(model)
    full = []
    ids = window[:ev.GREEDY_PROMPT].unsqueeze(0)
    with torch.no_grad():
        for _ in range(ev.GREEDY_NEW):
            full.append(int(model(input_ids=ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[full[-1]]])], 1)
    assert len(set(full)) > 1  # the tiny model's own continuation varies
    first_change = next(i for i, t in enumerate(full) if t != full[0])
    assert ev.greedy_repeats(healthy, tiny_tokenizer(), window) is None
    assert healthy.calls == first_change + 1 < ev.GREEDY_NEW
