"""Plans in llama.cpp's types (``quantfix.gguf_plan``): plan 0 mapped onto the type llama-quantize
writes on each module's rows, the ladder per module, a tied output matrix planned as token_embd,
and the plan as ``--tensor-type`` entries."""
from __future__ import annotations

import pytest

from quantfix import gguf_plan
from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision


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


def test_a_budget_below_plan_0_is_refused_in_gguf_mode():
    """GGUF mode climbs from plan 0 only: a budget below plan 0 as llama.cpp writes it has no plan. The line names
    plan 0's cost and the budget that would do (rounded up, so that it fits); a budget at or above it passes."""
    shapes = {"a": (64, 576), "b": (64, 1536)}
    g = gguf_plan.to_gguf(Plan({n: Precision(4, 64, True, "rtn") for n in shapes}, shapes))  # Q5_0 on 576, Q4_K
    assert g.avg_bits == pytest.approx((5.5 * 576 + 4.5 * 1536) / 2112)  # 4.773
    problem = gguf_plan.budget_problem(g, 4.6)
    assert problem.startswith("plan.budget.avg_bits=4.6 is below plan 0 in llama.cpp's types (")
    assert "4.773 bits per weight" in problem and "raise the budget to at least 4.78" in problem
    assert gguf_plan.budget_problem(g, 4.78) is None and gguf_plan.budget_problem(g, None) is None
