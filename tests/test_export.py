"""The checkpoint writer (``quantfix.export``): the llm-compressor recipe of a plan (one config group
per precision, float modules ignored, the modifiers and observers of each algorithm, MoE experts),
the engines' checkpoints reloaded and measured against their simulation, float16 overflow, and the
write itself (complete or nothing: disk full, stale temp dirs, permissions)."""
from __future__ import annotations

import errno
import json
import math
import os

import pytest
import torch

from quantfix import export as exp
from quantfix.config import QuantConfig
from quantfix.errors import QuantfixError
from quantfix.export import llmcompressor_recipe
from quantfix.plan import Plan, Precision
from tests.conftest import run_report as run
from tests.conftest import custom_code_dir, load_model, model_dir, tiny_llama, tiny_overrides


# --- the llm-compressor recipe of a plan ----------------------------------------------------------

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


def _moe_plan(widths):
    names = [f"model.layers.0.mlp.experts.{i}.down_proj" for i in range(len(widths))] + ["model.layers.0.self_attn.q_proj"]
    mods = {n: p for n, p in zip(names, list(widths) + [Precision(4, 32)])}
    return Plan(mods, {n: (64, 64) for n in names})


def test_export_refuses_unequal_experts():
    from quantfix.export import check_experts_uniform, expert_leaf_renames

    with pytest.raises(QuantfixError, match="one scheme for all experts"):
        check_experts_uniform(_moe_plan([Precision(4, 32), Precision(8, 0)]))
    with pytest.raises(QuantfixError, match="float experts"):
        check_experts_uniform(_moe_plan([Precision(16), Precision(16)]))
    check_experts_uniform(_moe_plan([Precision(4, 32), Precision(4, 32, algorithm="gptq")]))
    # per-expert names as transformers' MoE loader of each model type reads them
    assert expert_leaf_renames("mixtral") == {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    assert expert_leaf_renames("qwen3_moe") == {}


def test_export_recipe_names_experts_with_re_targets():
    from types import SimpleNamespace

    from quantfix.export import llmcompressor_recipe

    plan = _moe_plan([Precision(4, 32), Precision(4, 32)])
    mod = llmcompressor_recipe(plan, SimpleNamespace())[-1]
    targets = [t for g in mod.config_groups.values() for t in g.targets]
    assert r"re:^model\.layers\.0\.mlp\.experts\.0\.down_proj$" in targets
    assert "model.layers.0.self_attn.q_proj" in targets


# --- each engine's checkpoint: reloaded, measured as simulated ------------------------------------

def test_gptq_plan_exports_through_llmcompressor(compose, tiny_dir, tmp_path):
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant": "gptq", "quant.group_size": 32, "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    assert report["final"]["passed"] and report["iterations"][0]["plan_summary"] == "W4g32-gptq x14"
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    # the engine packs the simulated GPTQ weights with their scales: the checkpoint is what was measured
    sim, real = report["iterations"][0]["metrics"], report["final"]["verified_metrics"]
    assert real["kld_mean"] == pytest.approx(sim["kld_mean"], rel=1e-5) and real["ppl"] == pytest.approx(sim["ppl"], rel=1e-6)
    assert qc["config_groups"]["group_0"]["weights"]["observer"] == "quantfix_static"


def test_mse_plan_exports_what_was_simulated(compose, tiny_dir, tmp_path):
    import json

    from tests.conftest import run_report as run
    from tests.conftest import tiny_overrides

    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant.algorithm": "mse", "quant.group_size": 32, "thresholds.max_ppl_increase_pct": 1000,
        "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    it, fin = report["iterations"][0], report["final"]
    assert it["plan_summary"] == "W4g32-mse x14" and fin["passed"]
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["observer"] for g in qc["config_groups"].values()} == {"mse"}
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(it["metrics"]["kld_mean"], rel=1e-5)


def test_awq_exports_on_cpu(compose, tiny_dir, tmp_path):
    """llm-compressor's AWQ pins host memory, which fails without an accelerator; the export skips
    the pinning there, so an AWQ plan exports and verifies on the CPU too."""
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant": "awq", "quant.group_size": 32, "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    assert report["final"]["passed"] and report["iterations"][0]["plan_summary"] == "W4g32-awq x14"
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    sim, real = report["iterations"][0]["metrics"], report["final"]["verified_metrics"]
    assert real["kld_mean"] < 2 * sim["kld_mean"] + 0.01


def test_mixed_algorithm_plan_exports_in_one_checkpoint(compose, tiny_dir, tmp_path):
    """The default options let each module move to imatrix or gptq_imatrix rounding at each rung:
    the chosen plan mixes algorithms and widths, and one compressed-tensors checkpoint holds them
    all (QuantizationModifier and GPTQModifier groups), reloaded and verified near the simulation."""
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 0.01, "loop.max_iters": 4}))
    report = run(cfg, tmp_path / "run")
    fin = report["final"]
    plan = Plan.load(tmp_path / "run" / "plan.yaml")
    algs = {p.algorithm for p in plan.modules.values() if not p.is_float}
    assert algs <= {"rtn", "imatrix", "gptq_imatrix"} and algs & {"imatrix", "gptq_imatrix"}
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    observers = {g["weights"]["observer"] for g in qc["config_groups"].values()}
    assert "quantfix_static" in observers
    sim = next(it for it in report["iterations"] if it["avg_bits"] == fin["avg_bits"])["metrics"]
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(sim["kld_mean"], rel=1e-5)  # exactly what was measured
    its = report["iterations"]
    # every search trial carries its prediction (a recalibration's check trials, if any, are not predictions)
    assert all("prediction_error_pct" in it for it in its[1:] if not it.get("action", "").startswith("recalibration check"))
    assert any(it.get("actions") for it in its[1:])


@pytest.mark.parametrize("quant,label", [("llm_int8", "LLM.int8 x14"), ("nf4", "NF4g64 x14")])
def test_bitsandbytes_plans_export_and_match_the_simulation(compose, tiny_dir, tmp_path, quant, label):
    pytest.importorskip("bitsandbytes")
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quant": quant, "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    it = report["iterations"][0]
    assert it["plan_summary"] == label and report["final"]["passed"]
    qc = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    sim, real = it["metrics"], report["final"]["verified_metrics"]
    assert real["kld_mean"] == pytest.approx(sim["kld_mean"], rel=0.25, abs=2e-4)


def test_custom_code_model_exports_and_reloads(compose, tmp_path, tokenizer):
    from tests.conftest import run_report as run

    d = custom_code_dir(tmp_path / "custom", tokenizer)
    cfg = compose(tiny_overrides(d, tmp_path / "cache", **{
        "model.trust_remote_code": "true", "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    fin = report["final"]
    assert fin["passed"] and fin["verified_metrics"]["ppl"] > 0
    assert (tmp_path / "run" / "checkpoint" / "modeling_tiny.py").exists()


# --- the float16 export never overflows silently --------------------------------------------------

def _big_embedding(m):
    m.model.embed_tokens.weight[:, 0] = 1e5  # beyond float16's 65504, harmless in float32


def test_safe_export_dtype_switches_to_bfloat16_only_on_overflow():
    model = tiny_llama()
    assert exp.safe_export_dtype(model, torch.float16) == (torch.float16, None)
    w = model.model.layers[0].mlp.up_proj.weight
    big = {"model.layers.0.mlp.up_proj": (w * 0 + 7e4, torch.ones(1), torch.zeros(1))}  # a simulated weight
    dtype, warning = exp.safe_export_dtype(model, torch.float16, big)
    assert dtype == torch.bfloat16 and "model.layers.0.mlp.up_proj.weight (max |x| 7e+04 > 65504)" in warning
    with torch.no_grad():
        _big_embedding(model)
    dtype, warning = exp.safe_export_dtype(model, torch.float16)
    assert dtype == torch.bfloat16 and "model.embed_tokens.weight" in warning and "bfloat16 instead" in warning
    assert exp.safe_export_dtype(model, torch.bfloat16) == (torch.bfloat16, None)
    assert exp.safe_export_dtype(model, None) == (None, None)


@pytest.mark.parametrize("guard", [True, False], ids=["bf16-fallback", "overflow-is-caught-at-verify"])
def test_float16_export_of_a_large_weight(compose, tokenizer, tmp_path, monkeypatch, guard):
    d = model_dir(tmp_path / "big", tokenizer, edit=_big_embedding)
    if not guard:  # without the range check the cast writes inf: the verification must name it
        monkeypatch.setattr(exp, "safe_export_dtype", lambda model, dtype, static=None: (dtype, None))
    cfg = compose(tiny_overrides(d, tmp_path / "cache", **{
        "export.dtype": "float16", "thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1}))
    report = run(cfg, tmp_path / "run")
    fin = report["final"]
    cfg_json = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    if guard:
        assert fin["passed"] and math.isfinite(fin["verified_metrics"]["ppl"]), fin
        assert cfg_json.get("dtype", cfg_json.get("torch_dtype")) == "bfloat16"
        assert any("export.dtype=float16 would turn model.embed_tokens.weight" in w and "bfloat16 instead" in w
                   for w in report["warnings"]), report["warnings"]
    else:
        # the trials round the weights as the export will (float16): they see the overflow first
        assert not fin["passed"] and not fin["search_passed"], fin
        assert any("non-finite" in f and "model.embed_tokens" in f for f in report["iterations"][0]["failed"])
        assert "PPL is nan (non-finite)" in fin["verified_failed"]
        assert any(f.startswith("checkpoint non-finite at model.embed_tokens.weight") for f in fin["verified_failed"])
        assert any("reloaded checkpoint gives non-finite values" in w for w in report["warnings"])


# --- complete or nothing: disk full, stale temp dirs, permissions ---------------------------------

def test_no_partial_checkpoint_on_failure(compose, tiny_dir, tmp_path, monkeypatch):
    from quantfix import export as exp

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(exp, "_export_llmcompressor", boom)
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{"thresholds.max_ppl_increase_pct": 1000,
                                                                   "loop.max_iters": 1}))
    with pytest.raises(RuntimeError, match="disk full"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert not list((tmp_path / "run").glob(".checkpoint-*"))


def _export_setup(compose, tiny_dir, tmp_path):
    from quantfix.planner import initial_plan

    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache"))
    model, tok = load_model(tiny_dir)
    plan, _ = initial_plan(model, cfg.quant, {})
    out = tmp_path / "run"
    out.mkdir()
    return model, tok, plan, out, cfg


def _partial_then(error):
    def fake_export(model, tokenizer, plan, samples, tmp, q, trust_remote_code=False):
        (tmp / "model.safetensors").write_bytes(b"\0" * 4096)  # a partial shard
        raise error
    return fake_export


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on "
                 "device\" })"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2432 vs 2304"),
], ids=["enospc", "safetensors", "torch-zip"])
def test_disk_full_during_export_is_one_line_and_leaves_nothing(compose, tiny_dir, tmp_path, monkeypatch, error):
    model, tok, plan, out, cfg = _export_setup(compose, tiny_dir, tmp_path)
    monkeypatch.setattr(exp, "_export_llmcompressor", _partial_then(error))
    with pytest.raises(QuantfixError, match=rf"no space left on device while writing the checkpoint to {out}: "
                                            "free space or pick another hydra.run.dir"):
        exp.export(model, tok, exp.ExportSpec(plan, str(tiny_dir), cfg.quant, samples=torch.zeros(1, 8, dtype=torch.long)), out)
    assert not (out / "checkpoint").exists() and not list(out.glob(".checkpoint-*"))


def test_other_export_errors_are_not_called_disk_full(compose, tiny_dir, tmp_path, monkeypatch):
    model, tok, plan, out, cfg = _export_setup(compose, tiny_dir, tmp_path)
    monkeypatch.setattr(exp, "_export_llmcompressor", _partial_then(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        exp.export(model, tok, exp.ExportSpec(plan, str(tiny_dir), cfg.quant, samples=torch.zeros(1, 8, dtype=torch.long)), out)
    assert not list(out.glob(".checkpoint-*"))


def test_checkpoint_dir_is_world_readable(compose, tiny_dir, tmp_path, monkeypatch):
    model, tok, plan, out, cfg = _export_setup(compose, tiny_dir, tmp_path)

    def fake_export(model, tokenizer, plan, samples, tmp, q, trust_remote_code=False):
        model.save_pretrained(tmp)

    monkeypatch.setattr(exp, "_export_llmcompressor", fake_export)
    old = os.umask(0o022)
    try:
        ckpt, _ = exp.export(model, tok, exp.ExportSpec(plan, str(tiny_dir), cfg.quant, samples=torch.zeros(1, 8, dtype=torch.long)), out)
    finally:
        os.umask(old)
    assert ckpt.stat().st_mode & 0o777 == 0o755


def test_stale_checkpoint_temp_dirs_are_removed_at_start(compose, tiny_dir, tmp_path):
    from tests.conftest import run_report as run

    out = tmp_path / "run"
    stale = out / ".checkpoint-k1ll3d"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    keep = out / "checkpoint-notes"  # not a temp dir
    keep.mkdir()
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", mode="baseline"))
    run(cfg, out)
    assert not stale.exists() and keep.exists()
