"""Shared fixtures and builders: a tiny random Llama (with a small BPE tokenizer) saved as an HF
directory, variants of it (a BERT, custom code, a planted fault), and Hydra's compose API over conf/."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"


def load_script(name: str):
    """A module of ``scripts/`` (not a package), loaded from its file for its tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_tokenizer():
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:60], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 384):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so the model is not near-uniform
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


def save_model_dir(model, tokenizer, path: Path) -> Path:
    """Save a model and tokenizer as an HF directory that quantfix can load by path."""
    model.config._name_or_path = str(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    return save_model_dir(tiny_llama(), tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def compose():
    """compose(overrides) -> DictConfig over conf/, with the schema registered."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from quantfix.config import register

    register()

    def _compose(overrides=()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hcompose(config_name="config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


def tiny_overrides(tiny_dir: Path, cache: Path, **extra) -> list:
    base = {
        "model.name_or_path": str(tiny_dir), "eval.source": "pydoc", "eval.n_windows": 4, "eval.seq_len": 64,
        "eval.batch_size": 2, "data.domains": "[pydoc]", "data.n_samples": 8, "data.seq_len": 64,
        "cache_dir": str(cache), "device": "cpu", "export.dtype": "auto",
        # the calibration forward in float32 on any CPU (auto takes bfloat16 where the CPU has native bf16
        # products, so the runs' paths would differ by machine); its bfloat16 path: tests/test_calib.py
        "data.dtype": "model",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_report(cfg, out_dir) -> dict:
    """A run (quantfix.recipe.run) and its report as report.json holds it."""
    from quantfix.recipe import run

    return run(cfg, out_dir).to_dict()


def model_dir(path: Path, tokenizer, seed: int = 0, edit=None) -> Path:
    """A tiny Llama (``edit(model)`` applied to it under no_grad) saved as an HF directory."""
    model = tiny_llama(seed=seed)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    return save_model_dir(model, tokenizer, path)


def load_model(path: Path, offline: bool = False, **kw):
    """The model at ``path`` loaded as a run does (``kw``: model.* settings)."""
    from quantfix import loading, source
    from quantfix.config import ModelConfig

    return loading.load(source.resolve(str(path), path.parent / "cache"), torch.float32, torch.device("cpu"),
                        ModelConfig(**kw), offline=offline)


def tiny_bert(path: Path, tokenizer, cls_name="BertForMaskedLM", **cfg_kw) -> Path:
    """A tiny BERT (an encoder: what quantfix refuses) saved as an HF directory."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, **cfg_kw)
    torch.manual_seed(0)
    return save_model_dir(getattr(transformers, cls_name)(cfg), tokenizer, path)


def custom_code_dir(path: Path, tokenizer, with_code: bool = True) -> Path:
    """The tiny Llama as a model with custom code (``auto_map``; the code files only ``with_code``)."""
    import json

    save_model_dir(tiny_llama(), tokenizer, path)
    if with_code:
        (path / "configuration_tiny.py").write_text(
            "from transformers import LlamaConfig\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n")
        (path / "modeling_tiny.py").write_text(
            "from transformers import LlamaForCausalLM\nfrom .configuration_tiny import TinyConfig\n\n"
            "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "tiny_custom"
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                       "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


# a planted fault (the diagnosis tests): layer LAYER's hidden channel CHANNEL rescaled by ALPHA
LAYER, CHANNEL, ALPHA, FEATURE = 2, 7, 100.0, 8.0


def base_model(seed=0):
    """A tiny random Llama in which hidden channel CHANNEL matters to layer LAYER's attention
    (its q/k/v input columns are FEATURE x larger), as real features do."""
    model = tiny_llama(seed=seed, layers=4)
    layer = model.model.layers[LAYER]
    with torch.no_grad():
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight[:, CHANNEL] *= FEATURE
    return model


def planted(seed=0):
    """Scale input_layernorm channel CHANNEL of layer LAYER by ALPHA and divide the matching input
    column of q/k/v by ALPHA: the float function is unchanged, but that channel becomes a massive
    activation and its weights shrink below the group's rounding step."""
    model = base_model(seed)
    layer = model.model.layers[LAYER]
    with torch.no_grad():
        layer.input_layernorm.weight[CHANNEL] *= ALPHA
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight[:, CHANNEL] /= ALPHA
    return model
