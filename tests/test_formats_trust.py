"""Trust, round 2: an existing checkpoint must be a quantization of its float parent (a checkpoint
of another model of the same shapes is refused in one line), every read of a checkpoint file is
guarded (a damaged file is one line naming it and the fix), and a run's metrics can say when a
checkpoint is not a quantization of the model (``verdict.different_model``). Tiny models only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantfix import formats, verdict
from quantfix.config import QuantConfig
from quantfix.errors import QuantfixError
from quantfix.planner import initial_plan
from quantfix.quantize import fake, scales
from tests.conftest import ROOT, save_model_dir, tiny_llama, tiny_overrides
from tests.test_formats import GGUF_TYPES, write_tiny_gguf

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _plan0(model):
    plan, _ = initial_plan(model, QuantConfig(group_size=32), {})
    return plan


def _gptq_checkpoint(model, tokenizer, path: Path, bits: int = 4, group: int = 32, shards: int = 1) -> Path:
    """A GPTQ-format checkpoint of ``model`` (round-to-nearest on the GPTQ grid), packed by AutoRound's
    own QuantLinear (v1 zero points, as AutoGPTQ writes them); ``shards`` > 1 splits the tensors
    over that many files with an index, as the hub stores large models."""
    qlin = pytest.importorskip("auto_round_extension.torch.qlinear_torch_zp")
    from safetensors.torch import save_file

    save_model_dir(model, tokenizer, path)
    (path / "model.safetensors").unlink()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in _plan0(model).modules:
        W = sd.pop(f"{name}.weight").float()
        out_f, in_f = W.shape
        s, z = fake.qparams(W, bits, group, True)
        s = s.half().float()
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = scales.quantize_with(W, s, z, bits, group)
        ql = qlin.QuantLinear(bits, group, in_f, out_f, bias=False, g_idx=True)
        ql.pack(lin, s, (z + 2 ** (bits - 1)).round().to(torch.int32))
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            sd[f"{name}.{k}"] = getattr(ql, k).contiguous()
    keys = sorted(sd)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else \
        ["model.safetensors"]
    weight_map = {k: files[i * shards // len(keys)] for i, k in enumerate(keys)}
    for f in files:
        save_file({k: sd[k] for k in keys if weight_map[k] == f}, str(path / f), metadata={"format": "pt"})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": True,
                                  "desc_act": False, "checkpoint_format": "gptq"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _refused(path, model) -> str:
    with pytest.raises(QuantfixError) as info:
        formats.read(str(path), _plan0(model), model)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- 1. a checkpoint of another model of the same shapes is refused ---------------------------------

def test_gptq_checkpoint_of_another_model_is_refused(tmp_path, tokenizer):
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)  # the same config, other weights
    msg = _refused(_gptq_checkpoint(b, tokenizer, tmp_path / "b"), a)  # before: read, then PASSED at top-1 0.000
    assert msg.startswith(f"{tmp_path / 'b'} is not a quantization of the float model: {Q_PROJ} keeps")
    assert "14 of 14 modules below" in msg
    assert msg.endswith("model.name_or_path must be the float model this checkpoint was quantized from")
    ext = formats.read(str(_gptq_checkpoint(a, tokenizer, tmp_path / "a")), _plan0(a), a)
    assert ext.format == "gptq" and ext.parent_agreement == 1.0  # RTN with zero on the grid flips no sign


def test_gguf_of_another_model_is_refused(tmp_path):
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    types = dict(GGUF_TYPES, down_proj="Q4_1")  # Q4_1 / Q5_1: a float minimum, small weights may flip sign
    msg = _refused(write_tiny_gguf(b, tmp_path / "b.gguf", types), a)
    assert "is not a quantization of the float model" in msg and "model.name_or_path must be" in msg
    ext = formats.read(str(write_tiny_gguf(a, tmp_path / "a.gguf", types)), _plan0(a), a)
    assert ext.parent_agreement > 0.99


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dir):
    """quantfix's own compressed-tensors export of the tiny model: GPTQ 2-bit per channel, the
    harshest width an honest checkpoint comes in (the weight check must still accept it)."""
    from tests.conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from quantfix.config import register
    from quantfix.loop import run

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
    ext = formats.read(str(exported), _plan0(a), a)
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
    ext = formats.read(str(ckpt), _plan0(a), a)
    assert ext.notes and ext.notes[0].startswith("1 norm/bias tensors of the checkpoint differ from the float "
                                                 "parent's (e.g. model.layers.1.input_layernorm.weight)")


def test_agreement_is_blind_to_awq_smoothing_and_separates_another_weight():
    """AWQ checkpoints store Q(W diag(s)): far from W by relative error, yet every kept sign is W's."""
    from quantfix.formats import parent

    g = torch.Generator().manual_seed(0)
    W = torch.distributions.StudentT(3.0).sample((256, 512)) * 0.02  # heavy-tailed like trained weights
    s = torch.exp(1.5 * torch.randn(512, generator=g))  # activation-derived scales spanning ~100x
    stored = fake.rtn(W * s, 4, 32, False)
    assert (stored - W).norm() / W.norm() > 1  # relative error cannot tell this from another model
    assert parent.agreement(stored, W) == 1.0
    x = torch.randn(2048, 512, generator=g)
    H = x.T @ x
    assert parent.agreement(fake.gptq(W, H, 2, 0, True), W) > 0.85  # GPTQ's feedback flips small weights only
    other = fake.rtn(torch.distributions.StudentT(3.0).sample((256, 512)) * 0.02, 4, 32, False)
    assert abs(parent.agreement(other, W)) < 0.05
    assert parent.agreement(torch.zeros_like(W), W) == 0.0  # a weight zeroed whole is no quantization of W
    assert parent.agreement(W, torch.zeros_like(W)) is None  # a zero float weight: no evidence either way


# --- 2. every read of a checkpoint file is guarded --------------------------------------------------

def _cut(f: Path, frac: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * frac)])


def test_gptq_safetensors_cut_in_half_is_one_line_naming_the_file(tmp_path, tokenizer):
    a = tiny_llama()
    path = _gptq_checkpoint(a, tokenizer, tmp_path / "a")
    _cut(path / "model.safetensors")
    msg = _refused(path, a)  # before: SafetensorError from packed.py, rc 3 "internal error"
    assert msg.startswith(f"{path / 'model.safetensors'} is damaged or incomplete (SafetensorError")
    assert msg.endswith("re-download the checkpoint")


def test_sharded_checkpoint_missing_a_shard_is_refused(tmp_path, tokenizer):
    """A shard the index names but the folder lacks: before, its modules were silently read as float."""
    a = tiny_llama()
    path = _gptq_checkpoint(a, tokenizer, tmp_path / "a", shards=2)
    assert len(formats.read(str(path), _plan0(a), a).weights) == 14
    (path / "model-00002-of-00002.safetensors").unlink()
    msg = _refused(path, a)
    assert "model.safetensors.index.json names 1 shard(s) the folder lacks" in msg
    assert "model-00002-of-00002.safetensors" in msg and msg.endswith("re-download the checkpoint")


@pytest.mark.parametrize("damage", ["no-qzeros", "qzeros-rows", "g_idx-range"])
def test_gptq_tensors_missing_or_not_fitting_are_one_line(tmp_path, tokenizer, damage):
    """Valid files, wrong content: before, a KeyError or an IndexError deep in the unpacking (rc 3)."""
    from safetensors.torch import load_file, save_file

    a = tiny_llama()
    path = _gptq_checkpoint(a, tokenizer, tmp_path / "a")
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
    path = _gptq_checkpoint(a, tokenizer, tmp_path / "a")
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


# --- 3. the metrics of a checkpoint of another model ------------------------------------------------

def _metrics(model, windows, ref, weights):
    from quantfix import evaluate as ev

    mods = dict(model.named_modules())
    saved = {n: mods[n].weight.detach().clone() for n in weights}
    with torch.no_grad():
        for n, w in weights.items():
            mods[n].weight.copy_(w)
        m = ev.evaluate(model, windows, ref, 4, progress=False)
        for n, w in saved.items():
            mods[n].weight.copy_(w)
    return m


def test_different_model_on_measured_metrics(tokenizer):
    """Measured here on the tiny models: plain RTN of A, A's GPTQ (its own calibration and random
    tokens) and B's RTN, every one at the same widths and on the same windows."""
    from quantfix import data as data_mod
    from quantfix import evaluate as ev
    from quantfix.quantize import calib
    from tests.conftest import SHARED_DATA

    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    windows = data_mod.eval_windows("pydoc", str(SHARED_DATA), tokenizer, 8, 64)
    ref = ev.reference(a, windows, 4, 8, 256, progress=False)
    names = list(_plan0(a).modules)
    wa = {n: a.get_submodule(n).weight.detach() for n in names}
    wb = {n: b.get_submodule(n).weight.detach() for n in names}
    x = torch.randint(2, 384, (8, 64), generator=torch.Generator().manual_seed(1))  # random-token calibration
    stats = calib.collect(a, x, names, 4, progress=False)
    for bits in (2, 3, 4):
        rtn = _metrics(a, windows, ref, {n: fake.rtn(w, bits, 32, True) for n, w in wa.items()})
        gptq = _metrics(a, windows, ref, {n: fake.gptq(w, stats.of(n).full(), bits, 32, True) for n, w in wa.items()})
        other = _metrics(a, windows, ref, {n: fake.rtn(w, bits, 32, True) for n, w in wb.items()})
        assert verdict.different_model(rtn, rtn) is None
        assert verdict.different_model(gptq, rtn) is None, (bits, gptq, rtn)
        why = verdict.different_model(other, rtn)
        if bits == 2:  # RTN itself is halfway to another model (KLD 0.22 vs 0.38): the metrics cannot tell
            assert other.kld_mean < verdict.OTHER_MODEL_KLD_X * rtn.kld_mean
            continue
        assert why is not None and why.startswith("behaves like another model, not a quantization of this one: "
                                                  "KLD"), (bits, other, rtn)
        assert "\n" not in why and "model.name_or_path must be the float model" in why


# SmolLM2-135M (the demo's float parent) on 8 x 256 pydoc tokens, every linear of the blocks replaced:
# (KLD, top-1) of the checkpoint and of plain RTN at the same widths, as measured on 2026-12-04
SMOLLM2 = {
    "W2g32 GPTQ random-token calibration": ((12.0177, 0.002), (9.1356, 0.009), False),
    "W2g32 another layer's weights": ((8.9484, 0.013), (9.1356, 0.009), False),  # 2 bits: cannot tell
    "W2g32 re-initialized": ((24.6568, 0.011), (9.1356, 0.009), False),
    "W3g32 AWQ alpha=1": ((2.0086, 0.272), (1.2035, 0.388), False),
    "W3g32 another layer's weights": ((11.3785, 0.013), (1.2035, 0.388), True),
    "W3g32 re-initialized": ((26.6526, 0.012), (1.2035, 0.388), True),
    "W4g32 GPTQ random-token calibration": ((0.3741, 0.646), (0.2389, 0.674), False),
    "W4g32 AWQ alpha=1": ((0.3521, 0.651), (0.2389, 0.674), False),
    "W4g32 NF4": ((0.1713, 0.738), (0.2389, 0.674), False),
    "W4g32 another layer's weights": ((8.9443, 0.010), (0.2389, 0.674), True),
    "W4g32 re-initialized": ((28.6793, 0.012), (0.2389, 0.674), True),
    "W4 per channel AWQ alpha=1 (destroyed)": ((9.7817, 0.000), (0.5591, 0.589), True),
    "W4 per channel another layer's weights": ((10.9625, 0.017), (0.5591, 0.589), True),
    "W8 AWQ alpha=1": ((0.0290, 0.894), (0.0020, 0.960), False),
    "W8 another layer's weights": ((9.2102, 0.014), (0.0020, 0.960), True),
}


@pytest.mark.parametrize("case", list(SMOLLM2))
def test_different_model_on_smollm2_numbers(case):
    from quantfix.evaluate import Metrics

    def m(kld, top1):
        return Metrics(ppl=20.0, nll=3.0, kld_mean=kld, kld_p99=kld, kld_max=kld, top1=top1, n_tokens=2048)

    ckpt, rtn, flagged = SMOLLM2[case]
    assert (verdict.different_model(m(*ckpt), m(*rtn)) is not None) == flagged


# --- 4. the CLI: one line, exit code 2 ---------------------------------------------------------------

def test_cli_refuses_a_checkpoint_of_another_model(tmp_path, tiny_dir, tokenizer):
    ckpt = _gptq_checkpoint(tiny_llama(seed=1), tokenizer, tmp_path / "b")
    args = tiny_overrides(tiny_dir, tmp_path / "cache", **{"quantized.name_or_path": str(ckpt),
                                                           "hydra.run.dir": str(tmp_path / "run")})
    r = subprocess.run([sys.executable, "-m", "quantfix", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2, r.stderr[-2000:]
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("quantfix: error:")]
    assert len(errs) == 1 and f"{ckpt} is not a quantization of the float model" in errs[0], r.stderr[-2000:]
