"""Named Qwen architectures, and `resolve_architecture`: a model_path's QwenConfig without weights.

The released Qwen checkpoints' numbers are copied from their config.json on the Hugging Face hub
(rope_theta 1e6, rms_norm_eps 1e-6, bfloat16 weights). They let `flux-jax plan` size a run for
"Qwen/Qwen3-8B" without downloading anything, and "builtin:NAME" build a randomly initialised model
of that shape (the tiny demo model, benchmark shapes).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flux_jax.models.qwen.config import QwenConfig


def config_of_shape(
    vocab: int,
    hidden: int,
    mlp: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    tied: bool,
    model_type: str = "qwen3",
    **fields: Any,
) -> QwenConfig:
    """The QwenConfig of a shape: vocabulary, hidden size, MLP width, layers, query heads, KV
    heads, head_dim, tied embeddings; `fields` sets its other fields. "qwen3" (q/k RMSNorm, no
    biases) unless `model_type` says otherwise."""
    return QwenConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tied,
        **fields,
    )


def _qwen3_moe(*columns: int, tied: bool, **fields: Any) -> QwenConfig:
    """A Qwen3-MoE shape: `config_of_shape`'s seven columns, then the number of experts, how many
    are routed per token and an expert's MLP width. Every layer is sparse and the top-k routing
    weights are renormalised (norm_topk_prob), as in every released Qwen3-MoE."""
    *shape, experts, top_k, expert_mlp = columns
    return dataclasses.replace(
        config_of_shape(*shape, tied=tied, **fields),
        model_type="qwen3_moe",
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=expert_mlp,
        norm_topk_prob=True,
    )


_QWEN3_VOCAB = 151_936
# What every released Qwen3 (and Qwen3-MoE) model's config.json also says.
_RELEASED_QWEN3 = dict(
    max_position_embeddings=40_960, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16"
)
_RELEASED_QWEN2_5 = dict(
    max_position_embeddings=32_768, bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16"
)
# Our own small shapes: RoPE and context of the tiny demo models.
_TINY = dict(rope_theta=10_000.0, max_position_embeddings=2048)

PRESETS: dict[str, QwenConfig] = {
    # The released models. Columns: vocab, hidden, MLP width, layers, heads, KV heads, head_dim.
    "qwen3-0.6b": config_of_shape(
        _QWEN3_VOCAB, 1024, 3072, 28, 16, 8, 128, tied=True, **_RELEASED_QWEN3
    ),
    "qwen3-1.7b": config_of_shape(
        _QWEN3_VOCAB, 2048, 6144, 28, 16, 8, 128, tied=True, **_RELEASED_QWEN3
    ),
    "qwen3-4b": config_of_shape(
        _QWEN3_VOCAB, 2560, 9728, 36, 32, 8, 128, tied=True, **_RELEASED_QWEN3
    ),
    "qwen3-8b": config_of_shape(
        _QWEN3_VOCAB, 4096, 12_288, 36, 32, 8, 128, tied=False, **_RELEASED_QWEN3
    ),
    # Qwen3-MoE, every layer sparse (Qwen3-30B-A3B, 235B-A22B). Columns as above, then experts,
    # experts routed per token, an expert's MLP width.
    "qwen3-30b-a3b": _qwen3_moe(
        _QWEN3_VOCAB, 2048, 6144, 48, 32, 4, 128, 128, 8, 768, tied=False, **_RELEASED_QWEN3
    ),
    "qwen3-235b-a22b": _qwen3_moe(
        _QWEN3_VOCAB, 4096, 12_288, 94, 64, 4, 128, 128, 8, 1536, tied=False, **_RELEASED_QWEN3
    ),
    # Qwen2.5: q/k/v biases, no q/k norm.
    "qwen2.5-7b": config_of_shape(
        152_064, 3584, 18_944, 28, 28, 4, 128, tied=False, model_type="qwen2", **_RELEASED_QWEN2_5
    ),
    # Shapes of our own: random weights only.
    # The demo and test model: a few MB; vocab 512 matches flux_jax.tiny_tokenizer.
    "tiny-qwen3": config_of_shape(512, 64, 128, 2, 4, 2, 16, tied=True, **_TINY),
    # The tiny demo model with 8 experts (top-2) of width 32 in place of its MLPs: MoE tests, demos.
    "tiny-qwen3-moe": _qwen3_moe(512, 64, 128, 2, 4, 2, 16, 8, 2, 32, tied=True, **_TINY),
    # A bench-sized Qwen3-MoE (tools/bench.py --model moe): 4 layers of 8 experts (top-2) of
    # width 384 at hidden 512; 38.8M params, 24.7M active. For dense-vs-grouped and EP timings.
    "qwen3-moe-bench": _qwen3_moe(32_768, 512, 1536, 4, 8, 4, 64, 8, 2, 384, tied=True),
    # ~40M parameters: a CPU/single-chip benchmark with a realistic layer shape.
    "qwen3-40m": config_of_shape(32_768, 512, 1536, 8, 8, 4, 64, tied=True),
    # Small layers, Qwen's full vocabulary: the LM head dominates, as it does for Qwen3-0.6B.
    "bigvocab": config_of_shape(_QWEN3_VOCAB, 256, 768, 4, 4, 2, 64, tied=True),
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
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
    "qwen/qwen3-30b-a3b-base": "qwen3-30b-a3b",
    "qwen/qwen3-30b-a3b-instruct-2507": "qwen3-30b-a3b",
    "qwen/qwen3-235b-a22b": "qwen3-235b-a22b",
    "qwen/qwen3-235b-a22b-instruct-2507": "qwen3-235b-a22b",
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
        f"Presets: {', '.join(BUILTIN_PREFIX + n for n in PRESETS)}; hub ids planned without a "
        f"download: {', '.join(sorted(HUB_NAMES))}. For another model, download it and pass "
        "its directory."
    )
