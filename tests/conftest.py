"""Shared fixtures: a tiny random Llama (with a small BPE tokenizer) saved as an HF directory,
and Hydra's compose API over the project's conf/."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"


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
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_report(cfg, out_dir) -> dict:
    """A run (quantfix.recipe.run) and its report as report.json holds it."""
    from quantfix.recipe import run

    return run(cfg, out_dir).to_dict()
