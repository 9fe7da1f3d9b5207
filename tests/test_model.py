"""Model resolution: every bad input gives one clear QuantfixError naming the fix."""
import json

import pytest
import torch

from quantfix import loading as loading_mod, source as source_mod
from quantfix.config import ModelConfig
from quantfix.errors import QuantfixError


def test_local_dir_loads(tiny_dir, tmp_path):
    r = source_mod.resolve(str(tiny_dir), tmp_path)
    m, tok = loading_mod.load(r, torch.float32, torch.device("cpu"))
    assert m.config.num_hidden_layers == 2 and not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("path,msg", [
    ("/no/such/model", "model path not found: /no/such/model"),
    ("./missing.gguf", "GGUF file not found"),
    ("", "model.name_or_path is empty"),
])
def test_missing_paths(tmp_path, path, msg):
    with pytest.raises(QuantfixError, match=msg):
        source_mod.resolve(path, tmp_path)


def test_dir_without_config(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(QuantfixError, match="not a Hugging Face model directory"):
        source_mod.resolve(str(d), tmp_path)


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    d = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(d)
    with pytest.raises(QuantfixError, match="is not a causal language model"):
        loading_mod.load(source_mod.resolve(str(d), tmp_path), torch.float32, torch.device("cpu"))


def test_already_quantized_model_is_not_a_float_model(tiny_dir, tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantfixError, match="already quantized"):
        loading_mod.load(source_mod.resolve(str(d), tmp_path), torch.float32, torch.device("cpu"))


def test_hub_id_unreachable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = source_mod.resolve("someorg/some-model", tmp_path)
    assert r.path == "someorg/some-model"  # a hub id is passed through to transformers
    with pytest.raises(QuantfixError, match="model 'someorg/some-model' not found"):
        loading_mod.load(r, torch.float32, torch.device("cpu"))


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(QuantfixError, match="CUDA is not available"):
        loading_mod.resolve_device("cuda")
    assert loading_mod.resolve_device("auto").type == "cpu"


def test_device_map_load_places_layers_with_accelerate(tiny_dir, tmp_path):
    r = source_mod.resolve(str(tiny_dir), tmp_path)
    m, _ = loading_mod.load(r, torch.float32, torch.device("cpu"), ModelConfig(device_map="auto", max_memory={"cpu": "2GiB"}))
    assert all(p.device.type == "cpu" for p in m.parameters())
    x = torch.randint(0, 384, (1, 8))
    ref, _ = loading_mod.load(r, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(m(x).logits, ref(x).logits)
