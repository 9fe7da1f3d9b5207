"""An existing quantized checkpoint as plan 0 (``quantfix.existing``, ``quantized.name_or_path``): read
once against its float parent, its scheme is plan 0 and its provenance plan 0's calibration; a repair
keeps its weights where it does not change them, re-rounds approximate grids as the export writes
them, writes llama.cpp overrides for a GGUF, and never passes a checkpoint that behaves like another
model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantfix import formats
from quantfix.bank import WeightBank
from quantfix.existing import ExistingCheckpoint
from quantfix.plan import Precision
from tests.conftest import run_report as run
from tests.conftest import tiny_llama, tiny_overrides
from tests.tiny_checkpoints import GGUF_TYPES, autoround_checkpoint, gptq_checkpoint, plan0, write_tiny_gguf


# --- ExistingCheckpoint.read and what it hands on, without a run -----------------------------------

def test_a_gptq_checkpoint_is_plan_0_and_its_provenance_the_calibration(tmp_path, tokenizer):
    model = tiny_llama()
    path = gptq_checkpoint(model, tokenizer, tmp_path / "gptq")
    ec = ExistingCheckpoint.read(str(path), plan0(model), model)
    assert ec.plan0.calibration == {"checkpoint": str(path), "format": "gptq"}
    assert {p.label for p in ec.plan0.modules.values()} == {"W4g32-ckpt"} and len(ec.plan0.modules) == 14
    info = ec.info
    assert (info.path, info.format, info.modules_exact_grid, info.modules_approx_grid) == (str(path), "gptq", 14, 0)
    assert info.summary == ec.ext.summary() and not ec.warnings
    assert ec.write_overrides(ec.plan0, tmp_path, str(tmp_path / "parent")) is None  # llama.cpp overrides: GGUF only
    bank = WeightBank(model, list(ec.plan0.modules))
    ec.serve(bank)
    assert set(bank.external) == set(ec.plan0.modules)
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(bank.external[name][0], ec.ext.weights[name])
    assert ec.reround_for_trials(bank, ec.plan0) == 0 and info.modules_rerounded_for_trials == 0  # an exact grid


def test_a_gguf_with_approximate_grids_is_warned_about_and_rerounded_once(tmp_path):
    model = tiny_llama()
    path = write_tiny_gguf(model, tmp_path / "tiny.gguf", GGUF_TYPES)  # o_proj Q4_1, up_proj Q5_1: a float minimum
    ec = ExistingCheckpoint.read(str(path), plan0(model), model)
    info = ec.info
    assert info.format == "gguf" and (info.modules_exact_grid, info.modules_approx_grid) == (8, 4)  # down_proj: F32
    assert ec.warnings and ec.warnings[0].startswith(f"4 modules of {path} use a grid compressed-tensors cannot store")
    bank = WeightBank(model, list(ec.plan0.modules))
    ec.serve(bank)
    assert ec.reround_for_trials(bank, ec.plan0) == 4 and info.modules_rerounded_for_trials == 4
    assert ec.reround_for_trials(bank, ec.plan0) == 0 and info.modules_rerounded_for_trials == 4  # once
    repaired = ec.plan0.with_changes({"model.layers.0.mlp.gate_proj": Precision(8, 0, True, "rtn")})
    f = ec.write_overrides(repaired, tmp_path, "parent.gguf")
    assert f.name == "llama_quantize_overrides.txt" and "blk.0.ffn_gate.weight=" in f.read_text()


# --- a repair from an existing checkpoint, end to end ---------------------------------------------

def test_repair_starts_from_a_gptq_checkpoint_and_keeps_its_weights(compose, tiny_dir, tokenizer, tmp_path):
    """Without mode=diagnose the loop starts from the checkpoint: plan 0 is its scheme with its own
    weights, the repair requantizes some modules from the float parent, and the modules it leaves
    alone reach the exported compressed-tensors checkpoint bit for bit."""
    from tests.conftest import run_report as run
    from quantfix.plan import Plan
    from tests.conftest import tiny_overrides

    ckpt = autoround_checkpoint(tmp_path, tokenizer, "auto_gptq", True, bits=4, group=32)
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quantized.name_or_path": str(ckpt), "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 0.008,
        "loop.max_iters": 3,
        "diagnose.domain_seq_len": 64, "probes.max_new_tokens": 4}))
    report = run(cfg, tmp_path / "run")
    first = report["iterations"][0]
    assert first["plan_summary"] == "W4g32-ckpt x14"
    assert report["quantized"]["format"] == "gptq"
    plan = Plan.load(tmp_path / "run" / "plan.yaml")
    kept = [n for n, p in plan.modules.items() if p.algorithm == "ckpt"]
    changed = [n for n, p in plan.modules.items() if p.algorithm != "ckpt"]
    assert changed and kept, (changed, kept)
    fin = report["final"]
    assert fin["verified_metrics"]["kld_mean"] < first["metrics"]["kld_mean"]
    assert fin.get("export_gap_pct", 0) < 2
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    ext = formats.read(str(ckpt), plan0(model), model)
    q = AutoModelForCausalLM.from_pretrained(fin["checkpoint"], dtype=torch.float32)
    with torch.no_grad():
        q(input_ids=torch.zeros(1, 1, dtype=torch.long))
    qmods = dict(q.named_modules())
    for n in kept:
        assert torch.equal(qmods[n].weight.float(), ext.weights[n]), n
    for n in changed:
        assert not torch.equal(qmods[n].weight.float(), ext.weights[n]), n


def test_diagnose_and_repair_a_gguf_against_its_float_parent(compose, tiny_dir, tmp_path):
    """A Q4_0 GGUF of the tiny model: diagnosed against the float parent (its calibration set
    unknown), repaired, exported and verified; the llama.cpp overrides name the changed tensors
    and the command that applies them."""
    from tests.conftest import run_report as run
    from quantfix.plan import Plan
    from tests.conftest import tiny_overrides

    model = tiny_llama()
    path = write_tiny_gguf(model, tmp_path / "tiny.Q4_0.gguf", {k: "Q4_0" for k in GGUF_TYPES})
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quantized.name_or_path": str(path), "export.format": "checkpoint", "thresholds.max_ppl_increase_pct": "null",
        "thresholds.max_kld_mean": 0.008, "loop.max_iters": 3, "diagnose.domain_seq_len": 64,
        "probes.max_new_tokens": 4}))
    report = run(cfg, tmp_path / "run")
    assert report["iterations"][0]["plan_summary"] == "W4g32-ckpt x14"
    assert report["quantized"]["format"] == "gguf" and report["quantized"]["modules_exact_grid"] == 14
    fin = report["final"]
    assert fin["verified_metrics"]["kld_mean"] <= 0.008 and fin["passed"]
    plan = Plan.load(tmp_path / "run" / "plan.yaml")
    changed = {n for n, p in plan.modules.items() if p.algorithm != "ckpt"}
    text = (tmp_path / "run" / "llama_quantize_overrides.txt").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert changed and len(lines) == len(changed)  # a 4-bit swap too: q4_k rounds better than q4_0 at its size
    assert "llama-quantize" in text and text.count("--tensor-type") == len(lines)
    for ln in lines:
        name, t = ln.split("=")
        assert name.startswith("blk.") and name.endswith(".weight") and t in ("q4_k", "q5_k", "q6_k", "q8_0", "f16")


def test_repair_of_nf4_measures_kept_modules_as_exported(compose, tiny_dir, tmp_path):
    """NF4 is not an integer grid: a module the repair keeps is re-rounded to its fitted int4 grid
    at export. The diagnosis measures the download as it is; from the search on, the trials
    measure the re-rounded weights, so the verified checkpoint is the last passing trial (before:
    a kept-NF4 plan passed in simulation and failed at verify with a 17% gap on the demo) and the
    kept modules reach the checkpoint exactly as trialled."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from tests.conftest import run_report as run
    from quantfix.plan import Plan
    from quantfix.quantize import scales
    from tests.conftest import tiny_overrides

    q = AutoModelForCausalLM.from_pretrained(str(tiny_dir), device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    q.save_pretrained(tmp_path / "nf4")
    cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{
        "quantized.name_or_path": str(tmp_path / "nf4"), "thresholds.max_ppl_increase_pct": "null",
        "thresholds.max_kld_mean": 0.02, "loop.max_iters": 4, "diagnose.domain_seq_len": 64,
        "probes.max_new_tokens": 4}))
    report = run(cfg, tmp_path / "run")
    assert report["iterations"][0]["plan_summary"].startswith("W4g64-ckpt~")
    assert report["quantized"]["modules_rerounded_for_trials"] == 14
    fin = report["final"]
    plan = Plan.load(tmp_path / "run" / "plan.yaml")
    kept = [n for n, p in plan.modules.items() if p.algorithm == "ckpt_approx"]
    assert kept and fin["search_passed"]
    last_pass = [it for it in report["iterations"] if not it["failed"]][-1]
    assert last_pass["plan_summary"] == fin["plan_summary"]
    assert fin["verified_metrics"]["kld_mean"] == pytest.approx(last_pass["metrics"]["kld_mean"], rel=1e-4)
    model = tiny_llama()
    ext = formats.read(str(tmp_path / "nf4"), plan0(model), model)
    out = AutoModelForCausalLM.from_pretrained(fin["checkpoint"], dtype=torch.float32)
    with torch.no_grad():
        out(input_ids=torch.zeros(1, 1, dtype=torch.long))
    mods = dict(out.named_modules())
    for n in kept:
        p = plan.modules[n]
        s, z = ext.qparams[n]
        want = scales.quantize_with(ext.weights[n].half(), s.half(), z.half(), p.bits, p.group_size, torch.float32)
        assert torch.equal(mods[n].weight.float(), want.float()), n
        assert not torch.equal(want, ext.weights[n].float())  # re-rounding changes NF4 weights: the test can fail


def test_a_checkpoint_that_behaves_like_another_model_never_passes(compose, tiny_dir, tmp_path):
    """Its weights keep the float parent's signs (formats.read accepts them) but every scale is
    shrunk 20x: a quantization that destroys the model. Thresholds that only look at PPL would let
    it pass (they are set loose here); the floor against plain RTN at its widths fails it."""
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    run(compose(tiny_overrides(tiny_dir, cache, **{"quant.group_size": 32, "loop.max_iters": 1,
                                                   "thresholds.max_ppl_increase_pct": 1e6})), tmp_path / "export")
    ckpt = tmp_path / "export" / "checkpoint"
    import shutil

    shutil.copytree(ckpt, _honest_copy(tmp_path))
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    for k in [k for k in tensors if k.endswith("weight_scale")]:
        tensors[k] = tensors[k] * 0.05
    save_file(tensors, f, metadata={"format": "pt"})
    over = {"quantized.name_or_path": str(ckpt), "thresholds.max_ppl_increase_pct": 1e6, "loop.max_iters": 1,
            "export.enabled": "false"}
    report = run(compose(tiny_overrides(tiny_dir, cache, **over)), tmp_path / "repair")
    first = report["iterations"][0]
    assert not first["passed"] and any("behaves like another model" in f for f in first["failed"]), first["failed"]
    assert report["final"]["passed"] is False
    assert any("behaves like another model" in w for w in report["warnings"])
    honest = run(compose(tiny_overrides(tiny_dir, cache, **{**over, "quantized.name_or_path": str(
        _honest_copy(tmp_path))})), tmp_path / "honest")
    assert honest["final"]["passed"] is True  # the same checkpoint, untampered, passes


def _honest_copy(tmp_path: Path) -> Path:
    """The untampered export (re-exported: the first one was edited in place)."""
    return tmp_path / "export2" / "checkpoint"
