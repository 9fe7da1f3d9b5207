"""Tiny random-weight causal LMs of several architectures (hidden 64, 2 layers, the tests' 384-token
vocabulary), built from configs with no hub access: the architecture matrix of issue 14."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB, HIDDEN, INTER, LAYERS = 384, 64, 128, 2


def _common(**extra):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                max_position_embeddings=512, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, **extra)


def _config(arch: str):
    import transformers as t

    if arch == "llama":
        return t.LlamaConfig(**_common(intermediate_size=INTER, num_key_value_heads=2))
    if arch == "qwen2":
        return t.Qwen2Config(**_common(intermediate_size=INTER, num_key_value_heads=2))
    if arch == "qwen3_moe":
        return t.Qwen3MoeConfig(**_common(intermediate_size=INTER, num_key_value_heads=2, moe_intermediate_size=64,
                                          num_experts=4, num_experts_per_tok=2, head_dim=16))
    if arch == "qwen2_moe":
        return t.Qwen2MoeConfig(**_common(intermediate_size=INTER, num_key_value_heads=2, moe_intermediate_size=64,
                                          shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2))
    if arch == "mixtral":
        return t.MixtralConfig(**_common(intermediate_size=INTER, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2))
    if arch == "phi3":
        return t.Phi3Config(**_common(intermediate_size=INTER, num_key_value_heads=2, pad_token_id=1))
    if arch == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=512,
                            bos_token_id=0, eos_token_id=1)
    if arch == "gpt_neox":
        return t.GPTNeoXConfig(**_common(intermediate_size=INTER))
    if arch == "opt":
        return t.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=INTER,
                           num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=HIDDEN,
                           bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if arch == "falcon":
        return t.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                              new_decoder_architecture=False, multi_query=True, bos_token_id=0, eos_token_id=1)
    if arch == "gemma3":
        return t.Gemma3TextConfig(**_common(intermediate_size=INTER, num_key_value_heads=2, head_dim=16,
                                            sliding_window=64))
    raise KeyError(arch)


ARCHS = ("llama", "qwen2", "qwen3_moe", "mixtral", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "gemma3")


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch)).eval()
    with torch.no_grad():  # larger-than-init weights so the model is not near-uniform
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
    return model


def save_tiny(arch: str, tokenizer, path: Path) -> Path:
    model = tiny_model(arch)
    model.config._name_or_path = str(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
