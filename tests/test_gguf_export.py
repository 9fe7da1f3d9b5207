"""GGUF mode: llama.cpp's types in the registry (ggml's bytes, activation rounding), plans in those
types and their tensor-type entries, the verdict gate on llama-perplexity's numbers, and the demo
repaired into a GGUF that llama-perplexity verifies (slow: the tools are built once per CI run)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantfix import gguf_plan, verify
from quantfix.config import ThresholdsConfig
from quantfix.errors import QuantfixError
from quantfix.evaluate import Evaluator, Metrics, Reference, baseline_metrics
from quantfix.plan import Plan, Precision
from quantfix.quantize import algorithms, gguf
from quantfix.quantize.stats import InputStats
from quantfix.runreport import TrialRecord
from tests.test_llamacpp import llama_tools  # noqa: F401 - the session fixture that builds the tools

ROOT = Path(__file__).resolve().parents[1]


def _stats(cols: int, seed: int = 0) -> InputStats:
    g = torch.Generator().manual_seed(seed)
    diag = torch.rand(cols, generator=g) * 50 + 0.1
    return InputStats(diag * 7, diag.sqrt(), diag.sqrt(), 7)


# --- without the tools --------------------------------------------------------------------------

def test_plan_maps_to_llama_cpp_types_with_fallbacks():
    """Plan 0 from quant (W4 -> Q4_K) as llama-quantize writes it per row length: 576 -> Q5_0,
    1536 -> Q4_K, 304 -> F16; sizes as stored; the ladder per module, fallbacks merged."""
    shapes = {"a": (64, 576), "b": (64, 1536), "c": (64, 304)}
    plan = Plan({n: Precision(4, 64, True, "rtn") for n in shapes}, shapes)
    g = gguf_plan.to_gguf(plan)
    assert {n: p.label for n, p in g.modules.items()} == {"a": "Q5_0", "b": "Q4_K", "c": "FP16"}
    assert g.modules["a"].bits_per_weight(576) == 5.5 and g.modules["b"].bits_per_weight(1536) == 4.5
    assert g.avg_bits == pytest.approx((5.5 * 576 + 4.5 * 1536 + 16 * 304) / (576 + 1536 + 304))
    opts = gguf_plan.ladder_options(g, ["Q2_K", "Q3_K", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"])
    assert sorted(opts["a"]) == ["Q5_1", "Q8_0"]  # Q2_K/Q3_K -> Q4_0 and IQ4_NL cost less than Q5_0
    assert sorted(opts["b"]) == ["IQ4_NL", "Q5_K", "Q6_K", "Q8_0"]  # IQ4_NL: the same 4.5 bits, a free swap
    assert "c" not in opts  # no quantized type fits rows of 304
    names = {"a": "blk.0.attn_q.weight", "b": "blk.0.ffn_down.weight", "c": "blk.0.ffn_up.weight"}
    assert gguf_plan.tensor_types(g, names) == {"blk.0.attn_q.weight": "Q5_0", "blk.0.ffn_down.weight": "Q4_K",
                                                "blk.0.ffn_up.weight": "F16"}
    with pytest.raises(QuantfixError, match="not a llama.cpp type"):
        gguf_plan.tensor_types(plan, names)
    asked = gguf_plan.to_gguf(Plan({"a": Precision(3, 0, True, "gguf_iq4_nl")}, {"a": (8, 576)}))
    assert asked.modules["a"].label == "IQ4_NL"


def test_tied_output_is_planned_and_counted():
    """A tied output matrix is GGUF's one token_embd: planned like any module, counted once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb
    n = "model.layers.0.mlp.down_proj"
    shapes = {n: (64, 128)}
    total = sum(p.numel() for p in model.parameters())
    plan = Plan({n: Precision(8, 32, True, "gguf_q8_0")}, shapes, other_params=total - 64 * 128)
    tied = gguf_plan.with_tied_output(plan, model, "Q6_K")
    assert tied.shapes["lm_head"] == (96, 64) and tied.modules["lm_head"].label == "Q8_0"  # Q6_K on rows of 64
    assert tied.n_params + tied.other_params == total
    assert gguf_plan.with_tied_output(tied, model, "Q6_K") is tied


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
    ref = Reference(-logp.gather(1, windows[:, 1:].reshape(-1, 1))[:, 0], torch.zeros(14, 0, dtype=torch.long),
                    torch.zeros(14, 0), logp)
    full, half = Evaluator(ref)(M(), windows, 2, False), Evaluator(ref, skip=4)(M(), windows, 2, False)
    assert full.n_tokens == 14 and half.n_tokens == 2 * (8 - 1 - 4)  # llama-perplexity: n_ctx - 1 - n_ctx/2
    nll = ref.nll.reshape(2, 7)[:, 4:]
    assert half.nll == pytest.approx(float(nll.mean()), rel=1e-6) and half.kld_mean == pytest.approx(0, abs=1e-6)
    assert baseline_metrics(ref, 7, 4).nll == pytest.approx(half.nll, rel=1e-6)


def _trial(kld: float) -> TrialRecord:
    m = Metrics(10.5, 2.35, kld, kld * 4, kld * 10, 0.9, 100)
    return TrialRecord(0, "", "", "", "", 5.0, 5.0, 0, m, [], 1.0)


def _llama(kld: float, ppl: float = 10.5, top: float = 0.9) -> dict:
    return {"ppl": ppl, "ppl_base": 10.0, "kld_mean": kld, "kld_p99": kld * 4, "kld_max": kld * 9,
            "same_top_p": top, "n_tokens": 1530, "ln_ppl_ratio": 0.05}


def test_verdict_gate_on_llama_perplexity(tmp_path):
    """The GGUF's verdict is llama-perplexity's: thresholds on its PPL increase (against the F16's
    own PPL), KLD and same-top share; and a KLD far from the trial's prediction fails too."""
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    t = ThresholdsConfig(max_ppl_increase_pct=6, max_kld_mean=0.05, min_top1=0.8)
    ok, _ = verify.verify_gguf(f, lambda: _llama(0.031), _trial(0.030), t)
    assert ok.failed == [] and ok.format == "gguf" and ok.export_gap_pct == pytest.approx(3.33, abs=0.01)
    assert ok.metrics.ppl == 10.5 and ok.llama_perplexity["ppl_increase_pct"] == pytest.approx(5.0)
    bad, _ = verify.verify_gguf(f, lambda: _llama(3.2, ppl=900.0, top=0.05), _trial(0.030), t)
    assert any("PPL" in x for x in bad.failed) and any("KLD 3.2" in x for x in bad.failed)
    assert any("top-1" in x for x in bad.failed) and any("not what was measured" in x for x in bad.failed)
    loose = ThresholdsConfig(max_ppl_increase_pct=10000)
    far, _ = verify.verify_gguf(f, lambda: _llama(0.09), _trial(0.030), loose)
    assert far.failed and "differs from the trial's prediction" in far.failed[0]
    nan, _ = verify.verify_gguf(f, lambda: _llama(float("nan"), ppl=float("nan")), _trial(0.030), loose)
    assert nan.failed


def test_bad_gguf_settings_are_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "quantfix", f"hydra.run.dir={tmp_path}/r", "export.format=gguf",
                        "loop.gguf_ladder=[Q4_K,Q9_K]"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "loop.gguf_ladder entries ['Q9_K']" in p.stderr
    assert [ln for ln in p.stderr.splitlines() if "Q9_K" in ln][0].startswith("quantfix: error:")
    p = subprocess.run([sys.executable, "-m", "quantfix", f"hydra.run.dir={tmp_path}/s", "quant.algorithm=gguf_q4_k"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "is a llama.cpp type: add export.format=gguf" in p.stderr


# --- with the built tools ----------------------------------------------------------------------

@pytest.mark.parametrize("type_name", list(gguf.TYPES))
def test_registry_entry_is_ggml_bytes(llama_tools, type_name):  # noqa: F811
    """A gguf entry's simulation is ggml's quantize -> dequantize of the fp16-stored weight with the
    module's E[x^2] as the imatrix, on the type that fits the rows; sizes as stored."""
    from quantfix.llamacpp import ggml

    W = torch.randn(8, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    alg = algorithms.for_ggml_type(type_name)
    t = gguf.TYPES[type_name]
    p = Precision(t.bits, t.block, t.symmetric, alg.name)
    st = _stats(512)
    got = alg.simulate(W, p, algorithms.SimInputs(stats=st, dtype=torch.float16))
    imp = (st.hessian / st.n_tokens).numpy().astype(np.float32)
    want = ggml.dequantize(type_name, ggml.quantize(type_name, W.half().float().numpy(), imp), (8, 512))
    assert torch.equal(got, torch.from_numpy(want)), type_name
    assert p.label == type_name and p.bits_per_weight(512) == ggml.bits_per_weight(type_name)
    assert p.bits_per_weight(576) == ggml.bits_per_weight(ggml.effective_type(type_name, 576))
    assert alg.option_problem() and not alg.exports_exactly and alg.llama_cpp


def test_activation_rounding_is_ggml_q8(llama_tools):  # noqa: F811
    """The trials' input rounding is ggml's Q8_0 (fp16 scale per 32) and Q8_K (float scale per 256)."""
    import ctypes

    from quantfix.llamacpp import ggml

    x = (torch.randn(4, 512, generator=torch.Generator().manual_seed(2)) * torch.logspace(-2, 2, 512)).float()
    q80 = ggml.dequantize("Q8_0", ggml.quantize("Q8_0", x.numpy()), (4, 512))
    assert torch.equal(gguf.act_q8_0(x), torch.from_numpy(q80))
    fn = ggml.library().quantize_row_q8_K_ref  # ggml-quants.h, exported by libggml-base
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    buf = ctypes.create_string_buffer(4 * 2 * 292)
    xs = np.ascontiguousarray(x.numpy())
    fn(xs.ctypes.data, ctypes.addressof(buf), xs.size)
    blocks = np.frombuffer(buf.raw, dtype=np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)]))
    q8k = (blocks["d"][:, None] * blocks["qs"].astype(np.float32)).reshape(4, 512)  # block_q8_K: float d, int8 qs
    d = (gguf.act_q8_k(x) - torch.from_numpy(q8k)).abs()
    assert torch.equal(gguf.act_q8_k(x), torch.from_numpy(q8k)), (float(d.max()), int((d > 0).sum()))
    y = torch.randn(3, 576, requires_grad=True)
    out = gguf.activation("Q4_K")(y)  # rows of 576 never meet a Q8_K matmul: unchanged
    assert torch.equal(out, y)
    z = gguf.activation("Q5_0")(y)
    z.sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))  # straight through: the diagnosis backpropagates


@pytest.mark.slow
def test_demo_gguf_export_is_verified_by_llama_perplexity(llama_tools, tmp_path):  # noqa: F811
    """python -m quantfix model.name_or_path=<the demo's GGUF file> export.format=gguf writes a GGUF
    that llama-perplexity verifies on the CPU: its KLD against the F16 parent within 10% of the
    trial's prediction (the same tokens), the verdict taken from llama-perplexity's numbers."""
    from quantfix import cache, source

    demo = source.fetch_demo_gguf(cache.cache_dir())
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "quantfix", f"model.name_or_path={demo}", "export.format=gguf",
           f"hydra.run.dir={out}", "eval.n_windows=2", "eval.seq_len=256", "eval.batch_size=2", "data.n_samples=8",
           "data.seq_len=256", "loop.max_iters=2", "thresholds.max_ppl_increase_pct=20", "probes.max_new_tokens=8",
           "diagnose.domain_windows=1", "diagnose.domain_seq_len=128"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    fin = json.loads((out / "report.json").read_text())["final"]
    assert fin["passed"] and fin["checkpoint_format"] == "gguf" and fin["verified_failed"] == []
    gguf_file = Path(fin["checkpoint"])
    assert gguf_file == out / "gguf" / "model.gguf" and gguf_file.stat().st_size == fin["checkpoint_bytes"]
    llama = fin["llama_perplexity"]
    assert llama["n_tokens"] == 2 * (256 - 1 - 128) and llama["kld_mean"] > 0
    assert abs(fin["predicted_kld"] / llama["kld_mean"] - 1) < 0.10, (fin["predicted_kld"], llama["kld_mean"])
    assert fin["verified_metrics"]["kld_mean"] == llama["kld_mean"]
    assert (out / "gguf" / "imatrix.gguf").is_file()
