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

    # GPTQ modules are rounded by the simulation; the engine packs them with the simulation's scales
    (g,) = llmcompressor_recipe(_plan("gptq"), QuantConfig())
    assert type(g) is QuantizationModifier and not isinstance(g, GPTQModifier)
    assert {grp.weights.observer for grp in g.config_groups.values()} == {"quantfix_static"}
    awq, quant = llmcompressor_recipe(_plan("awq"), QuantConfig())
    assert isinstance(awq, AWQModifier) and isinstance(quant, QuantizationModifier)


def test_all_float_plan_has_no_recipe():
    plan = _plan()
    plan = plan.with_changes({n: Precision(16) for n in plan.modules})
    assert llmcompressor_recipe(plan, QuantConfig()) == []


def test_mixed_plan_gives_each_module_its_observer():
    from llmcompressor.modifiers.quantization import QuantizationModifier

    plan = _plan("rtn")
    names = list(plan.modules)
    plan = plan.with_changes({names[0]: Precision(4, 64, True, "gptq_imatrix"), names[1]: Precision(4, 64, True, "mse"),
                              names[2]: Precision(8, 0, True, "imatrix")})
    (quant,) = llmcompressor_recipe(plan, QuantConfig())
    assert type(quant) is QuantizationModifier
    groups = {tuple(g.targets): (g.weights.observer, g.weights.num_bits) for g in quant.config_groups.values()}
    assert groups == {(names[0],): ("quantfix_static", 4), (names[1],): ("mse", 4),
                      (names[2],): ("quantfix_static", 8), (names[3],): ("memoryless_minmax", 4)}
    assert names[4] in quant.ignore


def test_whole_plan_algorithms_do_not_mix():
    from quantfix.errors import QuantfixError

    plan = _plan("rtn")
    with pytest.raises(QuantfixError, match="awq applies to the whole plan"):
        plan.with_changes({next(iter(plan.modules)): Precision(4, 64, True, "awq")})
