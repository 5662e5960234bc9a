"""Tiny random Hugging Face Qwen models, built with transformers on CPU torch: the reference.

Every parameter (norm weights and biases included) is randomised, so a wrongly mapped or
transposed tensor changes the logits and the comparison fails.
"""

from __future__ import annotations

import os

import numpy as np

VARIANTS = {
    # name: (model_type, tied, heads, kv_heads, hidden, head_dim)
    "qwen3_gqa_untied": ("qwen3", False, 4, 2, 48, 16),  # head_dim != hidden / heads
    "qwen3_mqa_tied": ("qwen3", True, 4, 1, 64, 16),
    "qwen2_gqa_untied": ("qwen2", False, 6, 2, 48, 8),
    "qwen2_mqa_tied": ("qwen2", True, 4, 1, 32, 12),
}


def make_hf_model(variant: str, *, vocab_size: int = 97, layers: int = 3, seed: int = 0):
    """A random transformers Qwen2/Qwen3 causal LM in fp32 eval mode."""
    import torch
    import transformers

    model_type, tied, heads, kv_heads, hidden, head_dim = VARIANTS[variant]
    config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return randomise_weights(model).eval()


def randomise_weights(model):
    """Weights far enough from HF's init that a wrong norm, router or projection shows: norms
    1 + 0.2 N(0, 1), a MoE router (`mlp.gate`) N(0, 1) so tokens spread over experts, the rest
    0.1 N(0, 1). Draws from torch's global generator, in parameter order."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, out_dir: str | os.PathLike, **kwargs) -> str:
    model.save_pretrained(out_dir, **kwargs)
    return os.fspath(out_dir)


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.asarray(input_ids, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(attention_mask, np.int64)),
        )
    return out.logits.float().numpy()


def right_padded_batch(vocab_size: int, lengths: list[int], seed: int = 0):
    """Random token ids, right-padded with id 0, and the matching attention mask."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, vocab_size, n)
        mask[row, :n] = 1
    return ids, mask
