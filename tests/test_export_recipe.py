"""The export recipe: one llm-compressor config group per distinct precision, float modules and
lm_head ignored, the modifiers of the plan's algorithm (its registry entry)."""
import pytest

from quantfix.config import QuantConfig
from quantfix.export import llmcompressor_recipe
from quantfix.plan import Plan, Precision


def _plan(alg="rtn"):
    mods = {
        "model.layers.0.self_attn.q_proj": Precision(4, 64, True, alg),
        "model.layers.0.self_attn.k_proj": Precision(4, 64, True, alg),
        "model.layers.0.mlp.down_proj": Precision(8, 0, True, alg),
        "model.layers.1.mlp.up_proj": Precision(4, 32, False, alg),
        "model.layers.1.mlp.down_proj": Precision(16, 0, True, alg),
    }
    return Plan(mods, {n: (64, 128) for n in mods})


def test_rtn_recipe_groups_precisions_and_ignores_float():
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    (mod,) = llmcompressor_recipe(_plan("rtn"), QuantConfig())
    assert isinstance(mod, QuantizationModifier) and not isinstance(mod, GPTQModifier)
    groups = {tuple(g.targets): g.weights.model_dump(exclude_none=True, include={
        "num_bits", "type", "symmetric", "strategy", "group_size", "observer"}) for g in mod.config_groups.values()}
    assert groups[("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj")] == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64,
        "observer": "memoryless_minmax"}
    assert groups[("model.layers.0.mlp.down_proj",)]["strategy"] == "channel"
    assert "group_size" not in groups[("model.layers.0.mlp.down_proj",)]
    assert groups[("model.layers.1.mlp.up_proj",)]["symmetric"] is False
    assert len(groups) == 3
    assert set(mod.ignore) == {"lm_head", "model.layers.1.mlp.down_proj"}


def test_gptq_and_awq_recipes_use_their_modifiers():
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    (g,) = llmcompressor_recipe(_plan("gptq"), QuantConfig(gptq_dampening=0.05, gptq_block_size=64))
    assert isinstance(g, GPTQModifier) and g.dampening_frac == pytest.approx(0.05) and g.block_size == 64
    awq, quant = llmcompressor_recipe(_plan("awq"), QuantConfig())
    assert isinstance(awq, AWQModifier) and isinstance(quant, QuantizationModifier)


def test_all_float_plan_has_no_recipe():
    plan = _plan()
    plan = plan.with_changes({n: Precision(16) for n in plan.modules})
    assert llmcompressor_recipe(plan, QuantConfig()) == []
