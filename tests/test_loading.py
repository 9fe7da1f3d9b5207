"""Loading and checking the model (``quantfix.loading``): a causal LM with its trained head and causal
attention, safetensors preferred and pickles opt-in, every damaged file or bad setting one line
naming the fix; devices and accelerate placement."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from quantfix import loading as loading_mod, source as source_mod
from quantfix.config import ModelConfig
from quantfix.errors import QuantfixError
from tests.conftest import custom_code_dir, load_model, save_model_dir, tiny_bert, tiny_llama


def test_local_dir_loads(tiny_dir, tmp_path):
    r = source_mod.resolve(str(tiny_dir), tmp_path)
    m, tok = loading_mod.load(r, torch.float32, torch.device("cpu"))
    assert m.config.num_hidden_layers == 2 and not any(p.requires_grad for p in m.parameters())


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


# --- a causal LM with its trained head, checked up front ------------------------------------------

def _one_line_error(path, match, **kw) -> str:
    with pytest.raises(QuantfixError, match=match) as info:
        load_model(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


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


def test_bidirectional_attention_is_refused_without_the_family_list(tmp_path, tokenizer, monkeypatch):
    # the attention modules' own is_causal flags catch encoders the list does not name
    monkeypatch.setattr(loading_mod, "ENCODER_TYPES", frozenset())
    bert = tiny_bert(tmp_path / "bert", tokenizer)
    _one_line_error(bert, "has bidirectional attention")


def test_random_lm_head_is_refused(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    d = save_model_dir(tiny_llama(), tokenizer, tmp_path / "nohead")  # untied embeddings
    weights = load_file(d / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(d, r"its LM head \(lm_head.weight\) is not in the checkpoint")


def test_decoder_bert_without_its_head_is_refused(tmp_path, tokenizer):
    # is_decoder=True makes BERT causal; a backbone-only save still has no trained head
    bert = tiny_bert(tmp_path / "bert", tokenizer, cls_name="BertModel", is_decoder=True)
    _one_line_error(bert, "no weights for cls.predictions")


def test_check_positions_names_the_key_and_the_fix():
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(QuantfixError, match=r"eval.seq_len=128 is longer than the model's 64 positions "
                                            r"\(config.json n_positions\): set eval.seq_len=64 or less"):
        loading_mod.check_positions(GPT2Config(n_positions=64), {"eval.seq_len": 128, "data.seq_len": 64})
    loading_mod.check_positions(GPT2Config(n_positions=64), {"eval.seq_len": 64, "data.seq_len": None})
    with pytest.raises(QuantfixError, match="data.seq_len=600.*max_position_embeddings"):
        loading_mod.check_positions(LlamaConfig(max_position_embeddings=512), {"data.seq_len": 600})


# --- load errors: one line each, safetensors preferred, pickles opt-in ----------------------------

def test_pickle_only_weights_need_allow_pickle(tmp_path, tokenizer):
    model = tiny_llama()
    d = save_model_dir(model, tokenizer, tmp_path / "bin")
    os.remove(d / "model.safetensors")
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    _one_line_error(d, r"only pickle weights \(pytorch_model.bin\).*model.allow_pickle=true")
    loaded, _ = load_model(d, allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_safetensors_preferred_over_a_pickle_beside_them(tmp_path, tokenizer, tiny_dir):
    d = tmp_path / "both"
    shutil.copytree(tiny_dir, d)
    (d / "pytorch_model.bin").write_bytes(b"not a pickle at all")  # never read
    loaded, _ = load_model(d)
    assert loaded.config.num_hidden_layers == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_one_line(tmp_path, tiny_dir, damage):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if damage == "truncate" else b"\x00" * 64)
    _one_line_error(d, r"the weights file is corrupt or truncated \(SafetensorError")


def test_corrupt_pickle_is_one_line_when_allowed(tmp_path, tiny_dir):
    import pickle

    d = tmp_path / "badpickle"
    shutil.copytree(tiny_dir, d)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))
    _one_line_error(d, r"the weights file is corrupt or truncated \(UnpicklingError", allow_pickle=True)


def test_corrupt_config_json_is_one_line(tmp_path, tiny_dir):
    d = tmp_path / "badjson"
    shutil.copytree(tiny_dir, d)
    (d / "config.json").write_text('{"model_type": "llama", ')
    _one_line_error(d, "a JSON file of the model is corrupt")


def test_custom_code_needs_trust_remote_code(tmp_path, tokenizer):
    d = custom_code_dir(tmp_path / "custom", tokenizer, with_code=False)
    _one_line_error(d, r"needs the custom code .*set model.trust_remote_code=true")
    # trusted, but the module it names is not there: still one line
    _one_line_error(d, r"could not read the config .*configuration_tiny.py", trust_remote_code=True)
