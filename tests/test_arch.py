"""Any causal LM (issue 14): the model's own structure (``quantfix.arch``: decoder blocks, quantizable
modules, roles) for ten families, and the architecture matrix: each tiny random model runs the full
loop to a reloaded checkpoint with every weight present whose verified metrics match its trial, or
fails with one line naming why. (MoE experts as one precision group: test_planner.py, test_export.py.)"""
import json

import pytest
import torch

from quantfix import arch
from quantfix.errors import QuantfixError
from quantfix.plan import Plan
from tests.conftest import tiny_overrides
from tests.tiny_archs import ARCHS, save_tiny, tiny_model

# matmul modules per tiny model (2 layers) after linearization: attention + MLP (+ 4 experts x 3)
EXPECTED = {"llama": 14, "qwen2": 14, "qwen3_moe": 32, "mixtral": 32, "phi3": 8, "gpt2": 8, "gpt_neox": 8,
            "opt": 12, "falcon": 8, "gemma3": 14}
NOT_EXPORTABLE = {"gpt2": "Conv1D", "falcon": "cannot reload a compressed-tensors Falcon checkpoint"}


def _matmul_numel(model) -> int:
    """Every matmul weight of the decoder blocks as transformers built them (Linear, Conv1D, 3-D experts)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    total = 0
    for _, mod in model.named_modules():
        if mod is head:
            continue
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            total += mod.weight.numel()
        total += sum(p.numel() for p in mod.parameters(recurse=False) if p.ndim == 3)
    return total


@pytest.mark.parametrize("name", ARCHS)
def test_structure_is_found_from_the_model(name):
    model = tiny_model(name)
    numel = _matmul_numel(model)
    ids = torch.randint(2, 300, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    arch.linearize(model)
    with torch.no_grad():  # the rewrite (experts, Conv1D as nn.Linear) computes the same function
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
    assert len(arch.decoder_layers(model)) == 2
    mods = arch.quantizable(model)
    assert len(mods) == EXPECTED[name]
    # every matmul weight of the blocks is covered (routers are not matmul weights of experts)
    assert sum(m.weight.numel() for m in mods.values()) == numel
    roles = {n: arch.module_role(n) for n in mods}
    assert arch.OTHER not in roles.values(), roles
    assert {arch.ATTN_IN, arch.ATTN_OUT} <= set(roles.values())
    assert ({arch.EXPERT_IN, arch.EXPERT_OUT} if "moe" in name or name == "mixtral" else {arch.MLP_IN, arch.MLP_OUT}) \
        <= set(roles.values())
    assert {arch.layer_index(n) for n in mods} == {0, 1}


def test_routers_and_shared_expert_gate_are_not_quantized():
    model = tiny_model("qwen2_moe")
    arch.linearize(model)
    mods = arch.quantizable(model)
    assert not any(n.endswith("shared_expert_gate") for n in mods)
    assert any(".shared_expert." in n for n in mods) and any(arch.is_expert(n) for n in mods)
    assert arch.module_role("model.layers.0.mlp.shared_expert_gate") == arch.ROUTER


def test_roles_not_names():
    assert arch.module_role("transformer.h.3.attn.c_proj") == arch.ATTN_OUT
    assert arch.module_role("transformer.h.3.mlp.c_proj") == arch.MLP_OUT
    assert arch.module_role("model.decoder.layers.1.fc1") == arch.MLP_IN
    assert arch.module_role("gpt_neox.layers.0.attention.dense") == arch.ATTN_OUT
    assert arch.module_role("model.layers.0.mlp.experts.3.down_proj") == arch.EXPERT_OUT
    assert arch.module_type("model.layers.0.mlp.experts.3.down_proj") == "experts.down_proj"
    assert arch.layer_index("model.decoder.layers.7.self_attn.q_proj") == 7
    assert arch.layer_index("lm_head") is None


# ---- the matrix: the full loop per architecture ------------------------------------------------------

MATRIX = {"eval.n_windows": 2, "quant.group_size": 32, "loop.max_iters": 2, "loop.algorithms": "[rtn]",
          "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 0.004, "diagnose.domains": "{}",
          "diagnose.probes": "false", "offline": "true", "loop.ladder": "[4/32,8/0,16/0]", "eval.seq_len": 32,
          "data.seq_len": 32, "data.n_samples": 4, "diagnose.sensitivity.windows": 2,
          "diagnose.sensitivity.fisher_windows": 2, "threads": 1}


@pytest.fixture(autouse=True)
def _restore_threads():
    """threads=1 (the matrix): a 64-wide model gains nothing from a second thread, and on a busy
    2-core machine each tiny op would wait on the other one (MoE routing: 60 ms an index_add_)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("archs")
    return {a: save_tiny(a, tokenizer, root / a) for a in ARCHS}


@pytest.mark.parametrize("name", ARCHS)
def test_matrix_full_loop_reloads_every_weight(name, arch_dirs, compose, tmp_path):
    from tests.conftest import run_report as run

    cfg = compose(tiny_overrides(arch_dirs[name], tmp_path / "cache", **MATRIX))
    out = tmp_path / "run"
    if name in NOT_EXPORTABLE:
        with pytest.raises(QuantfixError, match=NOT_EXPORTABLE[name]) as e:
            run(cfg, out)
        assert "export.enabled=false" in str(e.value) and "\n" not in str(e.value)
        return
    report = run(cfg, out)
    its, fin = report["iterations"], report["final"]
    # every matmul weight of the blocks was planned and quantized
    plan = Plan.load(out / "plan.yaml")
    assert len(plan.modules) == EXPECTED[name] and plan.n_params == _matmul_numel(tiny_model(name))
    # the reload: no missing / unexpected / mismatched weights, and what was measured
    assert not [f for f in fin["verified_failed"] if f.startswith("checkpoint weights")], fin["verified_failed"]
    assert fin["export_gap_pct"] <= 2.0, fin
    sim = next(it for it in reversed(its) if it["plan_summary"] == plan.summary_str())["metrics"]
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(sim["kld_mean"], rel=0.02, abs=1e-5)
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out / "checkpoint", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    qc = json.loads((out / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"


def test_gpt2_diagnoses_and_runs_without_export(arch_dirs, compose, tmp_path):
    from tests.conftest import run_report as run

    cfg = compose(tiny_overrides(arch_dirs["gpt2"], tmp_path / "cache",
                                 **dict(MATRIX, **{"export.enabled": "false", "loop.max_iters": 1})))
    report = run(cfg, tmp_path / "run")
    assert report["iterations"][0]["plan_summary"] == "W4g32 x8"


def test_moe_diagnosis_reports_routing_changes_and_expert_sensitivity(arch_dirs, compose, tmp_path):
    from tests.conftest import run_report as run

    cfg = compose(tiny_overrides(arch_dirs["qwen3_moe"], tmp_path / "cache",
                                 **dict(MATRIX, mode="diagnose", **{"quant.bits": 2})))
    run(cfg, tmp_path / "run")
    diag = json.loads((tmp_path / "run" / "diagnosis.json").read_text())
    routing = diag["routing"]
    assert set(routing["layers"]) == {"0", "1"} and all(0 <= v <= 1 for v in routing["layers"].values())
    assert routing["mean"] > 0  # 2-bit weights move the routers' choices
    assert routing["experts"] and all(arch.is_expert(e["expert"] + ".x") for e in routing["experts"])
    assert "experts.down_proj" in diag["sensitivity"]["types"]
    if max(routing["layers"].values()) > 0.05:
        assert "routing_changes" in [f["kind"] for f in diag["findings"]]


def test_dense_model_has_no_routing_section(arch_dirs, compose, tmp_path):
    from tests.conftest import run_report as run

    run(compose(tiny_overrides(arch_dirs["opt"], tmp_path / "cache", **dict(MATRIX, mode="diagnose"))),
        tmp_path / "run")
    diag = json.loads((tmp_path / "run" / "diagnosis.json").read_text())
    assert diag["routing"] == {} and "routing_changes" not in [f["kind"] for f in diag["findings"]]
