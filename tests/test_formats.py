"""Reading existing checkpoints (``quantfix.formats.read``) in every format, built for real from a tiny
model: the scheme read back is the one written and the dequantized weights the libraries' own; a
checkpoint of another model of the same shapes is refused, and every damaged file is one line naming
it and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantfix import formats
from quantfix.errors import QuantfixError
from tests.conftest import save_model_dir, tiny_llama, tiny_overrides
from tests.tiny_checkpoints import (GGUF_TYPES, autoround_checkpoint, gguf_permute, gptq_checkpoint, plan0,
                                     write_tiny_gguf)

Q_PROJ = "model.layers.0.self_attn.q_proj"


# --- every format reads back its scheme and the library's weights ---------------------------------

def _library_gptq(path, name, bits, group, in_f, out_f):
    """AutoRound's own GPTQ QuantLinear (the module its writer packs with) on the identity."""
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    from safetensors.torch import load_file

    sd = load_file(str(path / "model.safetensors"))
    ql = QuantLinear(bits, group, in_f, out_f, bias=False, g_idx=True)
    for k in ("qweight", "qzeros", "scales", "g_idx"):
        setattr(ql, k, sd[f"{name}.{k}"])
    return ql(torch.eye(in_f, dtype=torch.float16)).float().T


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_from_autoround_reads_back_scheme_and_weights(tmp_path, tokenizer, sym):
    path = autoround_checkpoint(tmp_path, tokenizer, "auto_gptq", sym)
    model = tiny_llama()
    ext = formats.read(str(path), plan0(model), model)
    assert ext.format == "gptq"
    assert {(p.bits, p.group_size, p.symmetric) for p in ext.plan.modules.values()} == {(4, 32, sym)}
    # the integers sit on a grid compressed-tensors stores bit for bit
    assert {p.algorithm for p in ext.plan.modules.values()} == {"ckpt"}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        out_f, in_f = ext.plan.shapes[name]
        ref = _library_gptq(path, name, 4, 32, in_f, out_f)
        assert torch.allclose(ext.weights[name], ref, atol=1e-3, rtol=1e-3)
        W = dict(model.named_modules())[name].weight
        # a 4-bit copy of the float weight (AutoRound's optimized RTN clips a few outliers)
        assert 0 < (ext.weights[name] - W).abs().mean() < 0.15 * W.abs().mean()


def test_awq_from_autoround_matches_its_dequantizer(tmp_path, tokenizer):
    from auto_round.export.export_to_awq.utils import dequantize_gemm
    from safetensors.torch import load_file

    path = autoround_checkpoint(tmp_path, tokenizer, "auto_awq", False)
    model = tiny_llama()
    ext = formats.read(str(path), plan0(model), model)
    assert ext.format == "awq"
    assert {(p.bits, p.group_size, p.symmetric, p.algorithm) for p in ext.plan.modules.values()} == \
        {(4, 32, False, "ckpt")}
    sd = load_file(str(path / "model.safetensors"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):
        ref = dequantize_gemm(sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"], 4, 32).float().T
        # the library multiplies in float16, quantfix in float32: equal once rounded to float16
        assert torch.equal(ext.weights[name].half().float(), ref)


def test_gguf_reads_types_layout_and_exact_grids(tmp_path):
    import gguf
    from gguf.quants import dequantize, quantize

    model = tiny_llama()
    path = write_tiny_gguf(model, tmp_path / "tiny.Q4_0.gguf", GGUF_TYPES)
    ext = formats.read(str(path), plan0(model), model)
    assert ext.format == "gguf"
    want = {"Q4_0": (4, 32, True, "ckpt"), "Q8_0": (8, 32, True, "ckpt"), "Q5_0": (5, 32, True, "ckpt"),
            "Q4_1": (4, 32, False, "ckpt_approx"), "Q5_1": (5, 32, False, "ckpt_approx")}
    for name, p in ext.plan.modules.items():
        t = GGUF_TYPES[name.rsplit(".", 1)[-1]]
        assert ext.source_types[name] == t
        if t == "F32":
            assert p.is_float
            continue
        assert (p.bits, p.group_size, p.symmetric, p.algorithm) == want[t], name
        W = dict(model.named_modules())[name].weight.detach().float().numpy()
        n_head = {"q_proj": 4, "k_proj": 2}.get(name.rsplit(".", 1)[-1])
        src = gguf_permute(W, n_head) if n_head else W
        ref = dequantize(quantize(src, gguf.GGMLQuantizationType[t]), gguf.GGMLQuantizationType[t])
        if n_head:  # back to the HF layout
            ref = ref.reshape(n_head, W.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(W.shape)
        assert np.array_equal(ext.weights[name].numpy(), ref), name
    assert ext.gguf_names["model.layers.1.self_attn.q_proj"] == "blk.1.attn_q.weight"


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_bitsandbytes_checkpoint_reads_back(tmp_path, tokenizer, tiny_dir, kind):
    """A bitsandbytes checkpoint written by transformers on the CPU: LLM.int8 reads as W8 per channel,
    NF4 as W4 in 64-value blocks, both re-rounded at export (ckpt~: not an integer grid in
    compressed-tensors' fp16 scales); the weights are what the loaded modules compute with."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else \
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    q = AutoModelForCausalLM.from_pretrained(str(tiny_dir), quantization_config=cfg, device_map="cpu")
    q.save_pretrained(tmp_path / kind)
    model = tiny_llama()
    ext = formats.read(str(tmp_path / kind), plan0(model), model)
    assert ext.format == "bitsandbytes"
    want = (8, 0) if kind == "int8" else (4, 64)
    assert {(p.bits, p.group_size, p.algorithm) for p in ext.plan.modules.values()} == {(*want, "ckpt_approx")}
    name = "model.layers.1.mlp.down_proj"
    mod = q.get_submodule(name)
    with torch.no_grad():
        y = mod(torch.eye(ext.plan.shapes[name][1], dtype=torch.float16)).float().T
    assert torch.allclose(ext.weights[name], y, atol=2e-3, rtol=1e-2)
    W = model.get_submodule(name).weight
    assert 0 < (ext.weights[name] - W).abs().mean() < (0.02 if kind == "int8" else 0.15) * W.abs().mean()


def test_wrong_parent_and_unknown_format_are_refused(tmp_path, tokenizer):
    model = tiny_llama()
    path = write_tiny_gguf(model, tmp_path / "tiny.gguf", GGUF_TYPES)
    other = tiny_llama(hidden=128, inter=256)
    with pytest.raises(QuantfixError, match="float parent"):
        formats.read(str(path), plan0(other), other)
    d = save_model_dir(model, tokenizer, tmp_path / "float")
    with pytest.raises(QuantfixError, match="not a format quantfix reads"):
        formats.read(str(d), plan0(model), model)
    with pytest.raises(QuantfixError, match="not found"):
        formats.read(str(tmp_path / "nope.gguf"), plan0(model), model)


# --- a checkpoint of another model of the same shapes is refused ----------------------------------

def _refused(path, model) -> str:
    with pytest.raises(QuantfixError) as info:
        formats.read(str(path), plan0(model), model)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_gptq_checkpoint_of_another_model_is_refused(tmp_path, tokenizer):
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)  # the same config, other weights
    msg = _refused(gptq_checkpoint(b, tokenizer, tmp_path / "b"), a)  # before: read, then PASSED at top-1 0.000
    assert msg.startswith(f"{tmp_path / 'b'} is not a quantization of the float model: {Q_PROJ} keeps")
    assert "14 of 14 modules below" in msg
    assert msg.endswith("model.name_or_path must be the float model this checkpoint was quantized from")
    ext = formats.read(str(gptq_checkpoint(a, tokenizer, tmp_path / "a")), plan0(a), a)
    assert ext.format == "gptq" and ext.parent_agreement == 1.0  # RTN with zero on the grid flips no sign


def test_gguf_of_another_model_is_refused(tmp_path):
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    types = dict(GGUF_TYPES, down_proj="Q4_1")  # Q4_1 / Q5_1: a float minimum, small weights may flip sign
    msg = _refused(write_tiny_gguf(b, tmp_path / "b.gguf", types), a)
    assert "is not a quantization of the float model" in msg and "model.name_or_path must be" in msg
    ext = formats.read(str(write_tiny_gguf(a, tmp_path / "a.gguf", types)), plan0(a), a)
    assert ext.parent_agreement > 0.99


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dir):
    """quantfix's own compressed-tensors export of the tiny model: GPTQ 2-bit per channel, the
    harshest width an honest checkpoint comes in (the weight check must still accept it)."""
    from tests.conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from quantfix.config import register
    from quantfix.recipe import run

    tmp = tmp_path_factory.mktemp("export")
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=tiny_overrides(tiny_dir, tmp / "cache", **{
            "quant": "gptq", "quant.bits": 2, "quant.group_size": 0, "loop.max_iters": 1,
            "thresholds.max_ppl_increase_pct": 1e9}))
    GlobalHydra.instance().clear()
    run(cfg, tmp / "run")
    return tmp / "run" / "checkpoint"


def test_exported_checkpoint_read_against_a_reinitialized_parent_is_refused(exported, tiny_dir):
    """The demo's case in miniature: a checkpoint quantfix exported from model A, given with a
    freshly initialized model of A's config as its parent."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tiny_dir)))
    msg = _refused(exported, fresh)
    assert "is not a quantization of the float model" in msg and "14 of 14 modules below" in msg
    a = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    ext = formats.read(str(exported), plan0(a), a)
    assert ext.format == "compressed-tensors" and ext.parent_agreement > 0.9  # 2-bit GPTQ: measured 0.988
    assert not ext.notes  # GPTQ folds nothing into the norms


def test_checkpoint_with_smoothing_folded_into_its_norms_is_noted(exported, tiny_dir, tmp_path):
    """AWQ / SmoothQuant divide a norm by the scales its linears were multiplied by: the weights
    still pass the check (same signs), and the read says its metrics pair them with the parent's norms."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "smoothed"
    shutil.copytree(exported, ckpt)
    f = next(ckpt.glob("*.safetensors"))
    t = load_file(str(f))
    t["model.layers.1.input_layernorm.weight"] = t["model.layers.1.input_layernorm.weight"] / 1.2
    save_file(t, str(f), metadata={"format": "pt"})
    a = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    ext = formats.read(str(ckpt), plan0(a), a)
    assert ext.notes and ext.notes[0].startswith("1 norm/bias tensors of the checkpoint differ from the float "
                                                 "parent's (e.g. model.layers.1.input_layernorm.weight)")


# --- every read of a checkpoint file is guarded ---------------------------------------------------

def _cut(f: Path, frac: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * frac)])


def test_gptq_safetensors_cut_in_half_is_one_line_naming_the_file(tmp_path, tokenizer):
    a = tiny_llama()
    path = gptq_checkpoint(a, tokenizer, tmp_path / "a")
    _cut(path / "model.safetensors")
    msg = _refused(path, a)  # before: SafetensorError from packed.py, rc 3 "internal error"
    assert msg.startswith(f"{path / 'model.safetensors'} is damaged or incomplete (SafetensorError")
    assert msg.endswith("re-download the checkpoint")


def test_sharded_checkpoint_missing_a_shard_is_refused(tmp_path, tokenizer):
    """A shard the index names but the folder lacks: before, its modules were silently read as float."""
    a = tiny_llama()
    path = gptq_checkpoint(a, tokenizer, tmp_path / "a", shards=2)
    assert len(formats.read(str(path), plan0(a), a).weights) == 14
    (path / "model-00002-of-00002.safetensors").unlink()
    msg = _refused(path, a)
    assert "model.safetensors.index.json names 1 shard(s) the folder lacks" in msg
    assert "model-00002-of-00002.safetensors" in msg and msg.endswith("re-download the checkpoint")


@pytest.mark.parametrize("damage", ["no-qzeros", "qzeros-rows", "g_idx-range"])
def test_gptq_tensors_missing_or_not_fitting_are_one_line(tmp_path, tokenizer, damage):
    """Valid files, wrong content: before, a KeyError or an IndexError deep in the unpacking (rc 3)."""
    from safetensors.torch import load_file, save_file

    a = tiny_llama()
    path = gptq_checkpoint(a, tokenizer, tmp_path / "a")
    t = load_file(str(path / "model.safetensors"))
    if damage == "no-qzeros":
        del t[f"{Q_PROJ}.qzeros"]
    elif damage == "qzeros-rows":
        t[f"{Q_PROJ}.qzeros"] = t[f"{Q_PROJ}.qzeros"][:1].contiguous()
    else:
        t[f"{Q_PROJ}.g_idx"] = t[f"{Q_PROJ}.g_idx"] + 5
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    msg = _refused(path, a)
    assert msg.startswith(f"{path}: ") and msg.endswith("re-download the checkpoint")
    assert (f"tensor {Q_PROJ}.qzeros is missing" in msg) if damage == "no-qzeros" else \
        (f"the packed tensors of {Q_PROJ} do not fit one 64x64 module" in msg)


@pytest.mark.parametrize("damage", ["cut", "header"])
def test_corrupt_gguf_is_one_line_naming_the_file_and_the_fix(tmp_path, damage):
    a = tiny_llama()
    path = write_tiny_gguf(a, tmp_path / "a.gguf", GGUF_TYPES)
    if damage == "cut":
        _cut(path)
    else:
        data = bytearray(path.read_bytes())
        data[4:64] = b"\xff" * 60  # version and counts
        path.write_bytes(bytes(data))
    msg = _refused(path, a)
    assert msg.startswith(f"{path} is not a readable GGUF file (damaged or incomplete) (ValueError")
    assert msg.endswith("re-download the checkpoint")


@pytest.mark.parametrize("file,content,says", [
    ("config.json", b"\xff\xfe garbage", "cannot be read (UnicodeDecodeError"),
    ("config.json", b"[1, 2]", "holds a JSON list, not an object"),
    ("config.json", b'{"quantization_config": "gptq"}', "quantization_config is a str, not an object"),
    ("quantize_config.json", b"{oops", "is not valid JSON"),
], ids=["binary", "list", "qc-string", "quantize_config"])
def test_broken_json_is_one_line_naming_the_file(tmp_path, tokenizer, file, content, says):
    a = tiny_llama()
    path = gptq_checkpoint(a, tokenizer, tmp_path / "a")
    if file == "quantize_config.json":  # older AutoGPTQ checkpoints: the scheme in its own file
        cfg = json.loads((path / "config.json").read_text())
        del cfg["quantization_config"]
        (path / "config.json").write_text(json.dumps(cfg))
    (path / file).write_bytes(content)
    msg = _refused(path, a)
    assert msg.startswith(f"{path / file}") and says in msg and msg.endswith("re-download the checkpoint")


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_compressed_tensors_with_a_lost_or_misshapen_tensor_is_one_line(exported, tiny_dir, tmp_path, damage):
    """Valid files, wrong content: a packed weight the file lacks (before: transformers initialized it
    at random, and the read went on) or a stored shape that does not fit (before: RuntimeError)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / damage
    shutil.copytree(exported, ckpt)
    f = next(ckpt.glob("*.safetensors"))
    t = load_file(str(f))
    if damage == "missing":
        del t[f"{Q_PROJ}.weight_packed"]
    else:
        t[f"{Q_PROJ}.weight_shape"] = torch.tensor([7, 9])
    save_file(t, str(f), metadata={"format": "pt"})
    a = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    msg = _refused(ckpt, a)
    assert msg.endswith("re-download the checkpoint")
    assert (f"{Q_PROJ}.weight_packed" in msg) if damage == "missing" else msg.startswith(
        f"the packed weights of {ckpt} do not decompress (RuntimeError")


def test_bitsandbytes_checkpoint_with_a_truncated_shard_names_the_shard(tmp_path, tiny_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = AutoModelForCausalLM.from_pretrained(str(tiny_dir), device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    q.save_pretrained(tmp_path / "nf4", max_shard_size="100KB")
    shards = sorted((tmp_path / "nf4").glob("*.safetensors"))
    assert len(shards) > 1
    _cut(shards[1], 0.6)
    a = tiny_llama()
    msg = _refused(tmp_path / "nf4", a)  # before: "could not load the quantized checkpoint <dir> (...)"
    assert msg.startswith(f"{shards[1]} is damaged or incomplete") and msg.endswith("re-download the checkpoint")
