"""Named Qwen architectures, and `resolve_architecture`: a model_path's QwenConfig without weights.

The released Qwen checkpoints' numbers are copied from their config.json on the Hugging Face hub
(rope_theta 1e6, rms_norm_eps 1e-6, bfloat16 weights). They let `flux-jax plan` size a run for
"Qwen/Qwen3-8B" without downloading anything, and "builtin:NAME" build a randomly initialised model
of that shape (the tiny demo model, benchmark shapes).
"""

from __future__ import annotations

import os

from flux_jax.models.qwen.config import QwenConfig

_QWEN3_SPECIAL = {"bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"}
_QWEN3_VOCAB = 151_936

PRESETS: dict[str, QwenConfig] = {
    # The released models.
    "qwen3-0.6b": QwenConfig(
        model_type="qwen3",
        vocab_size=_QWEN3_VOCAB,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        tie_word_embeddings=True,
        **_QWEN3_SPECIAL,
    ),
    "qwen3-1.7b": QwenConfig(
        model_type="qwen3",
        vocab_size=_QWEN3_VOCAB,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        tie_word_embeddings=True,
        **_QWEN3_SPECIAL,
    ),
    "qwen3-4b": QwenConfig(
        model_type="qwen3",
        vocab_size=_QWEN3_VOCAB,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        tie_word_embeddings=True,
        **_QWEN3_SPECIAL,
    ),
    "qwen3-8b": QwenConfig(
        model_type="qwen3",
        vocab_size=_QWEN3_VOCAB,
        hidden_size=4096,
        intermediate_size=12_288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        tie_word_embeddings=False,
        **_QWEN3_SPECIAL,
    ),
    "qwen2.5-7b": QwenConfig(
        model_type="qwen2",  # q/k/v biases, no q/k norm
        vocab_size=152_064,
        hidden_size=3584,
        intermediate_size=18_944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=32_768,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151643,
        torch_dtype="bfloat16",
    ),
    # Shapes of our own: random weights only.
    # The demo and test model: a few MB; vocab 512 matches flux_jax.tiny_tokenizer.
    "tiny-qwen3": QwenConfig(
        model_type="qwen3",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10_000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    # ~40M parameters: a CPU/single-chip benchmark with a realistic layer shape.
    "qwen3-40m": QwenConfig(
        model_type="qwen3",
        vocab_size=32_768,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    # Small layers, Qwen's full vocabulary: the LM head dominates, as it does for Qwen3-0.6B.
    "bigvocab": QwenConfig(
        model_type="qwen3",
        vocab_size=_QWEN3_VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}

# Hub ids (lower-cased) of the released models -> preset name. Instruct/base variants share shapes.
HUB_NAMES: dict[str, str] = {
    "qwen/qwen3-0.6b": "qwen3-0.6b",
    "qwen/qwen3-0.6b-base": "qwen3-0.6b",
    "qwen/qwen3-1.7b": "qwen3-1.7b",
    "qwen/qwen3-1.7b-base": "qwen3-1.7b",
    "qwen/qwen3-4b": "qwen3-4b",
    "qwen/qwen3-4b-base": "qwen3-4b",
    "qwen/qwen3-8b": "qwen3-8b",
    "qwen/qwen3-8b-base": "qwen3-8b",
    "qwen/qwen2.5-7b": "qwen2.5-7b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
}

BUILTIN_PREFIX = "builtin:"


def resolve_architecture(model_path: str) -> QwenConfig:
    """The architecture `model_path` names, without loading weights or touching the network.

    Accepts a local HF model directory (its config.json is read), "builtin:NAME" for a preset, a
    hub id of a released model ("Qwen/Qwen3-8B"), or a bare preset name ("qwen3-8b").
    """
    if os.path.isdir(model_path):
        return QwenConfig.from_pretrained_dir(model_path)
    name = model_path.removeprefix(BUILTIN_PREFIX)
    if name in PRESETS:
        return PRESETS[name]
    if name.lower() in HUB_NAMES:
        return PRESETS[HUB_NAMES[name.lower()]]
    raise ValueError(
        f"model_path {model_path!r}: not a local model directory, and no preset of that name. "
        f"Presets: {', '.join('builtin:' + n for n in PRESETS)}; hub ids planned without a "
        f"download: {', '.join(sorted(HUB_NAMES))}. For another model, download it and pass "
        "its directory."
    )
