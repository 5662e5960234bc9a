"""The Qwen decoder run over a KV cache: the same layer math as the model, one chunk of slots at a
time.

A batch of prompts is left-padded to a common width P, so every row's last prompt token sits in
slot P - 1 and every decode step writes the same slot for all rows. The cache holds every layer's
keys and values, `k`, `v`: [L, B, S, K, H] with S = P + max_new_tokens, and is threaded through
the `jax.lax.scan` over layers as part of its xs and ys (layer l reads its cache slice, writes the
new tokens' k and v into it with `dynamic_update_slice`, and attends over the whole slice).

Left padding must change nothing for the real tokens:
  position of slot s in row b = s - num_pad[b]   (RoPE sees 0, 1, ... from the first real token)
  query slot t sees key slot s  iff  s <= t and (s >= num_pad[b] or s == t)
Pad slots see only themselves, so no softmax row is empty; their outputs are never used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.models.qwen import layer_stack, moe
from flux_jax.models.qwen import layers as qwen_layers
from flux_jax.models.qwen.model import SPLASH_IMPLS, QwenForCausalLM

FLASH_ONLY_IMPLS = ("cudnn", *SPLASH_IMPLS)

Params = dict[str, Any]
KVCache = dict[str, jax.Array]  # {"k", "v"}: [L, B, S, K, H] each


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """The model's static numerics, hashable so it can be a static argument of a jitted function."""

    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    compute_dtype: Any
    attention_impl: str | None
    # Qwen3-MoE: which layers are sparse, and how they route (None for a dense model).
    sparse_layers: tuple[bool, ...] = ()
    moe: moe.MoeSpec | None = None

    @classmethod
    def of(cls, model: QwenForCausalLM) -> DecoderSpec:
        cfg = model.config
        # cuDNN flash and splash attention are for long full sequences; the cached path attends
        # one query over an explicit [B, 1, T, S] mask, which the XLA implementation handles for
        # any shape.
        impl = "xla" if model.attention_impl in FLASH_ONLY_IMPLS else model.attention_impl
        return cls(
            head_dim=cfg.head_dim,
            rope_theta=float(cfg.rope_theta),
            rms_norm_eps=float(cfg.rms_norm_eps),
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            compute_dtype=jnp.dtype(model.compute_dtype),
            attention_impl=impl,
            sparse_layers=cfg.sparse_layers,
            moe=model.moe_spec,
        )


def decoder_params(model: QwenForCausalLM) -> Params:
    """The model's parameters as a plain dict of (already placed) arrays: no copies."""
    params = {
        "embed": model.embed_tokens.embedding.get_value(),
        "layers": nnx.to_pure_dict(nnx.state(model.layers, nnx.Param)),
        "norm": model.norm.scale.get_value(),
    }
    if not model.config.tie_word_embeddings:
        params["lm_head"] = model.lm_head.kernel.get_value()
    return params


def init_kv_cache(spec: DecoderSpec, params: Params, batch: int, max_len: int) -> KVCache:
    """An all-zero cache for `batch` rows of `max_len` slots, in the compute dtype."""
    num_layers, _, kv_heads, head_dim = params["layers"]["self_attn"]["k_proj"]["kernel"].shape
    shape = (num_layers, batch, max_len, kv_heads, head_dim)
    return {"k": jnp.zeros(shape, spec.compute_dtype), "v": jnp.zeros(shape, spec.compute_dtype)}


def rope_positions(slots_T: jax.Array, num_pad_B: jax.Array) -> jax.Array:
    """[B, T] positions of the slots: 0 at each row's first real token (pad slots get 0).

    RoPE attention only sees position differences, so a constant per-row shift would give the same
    logits up to rounding; the absolute positions still matter for matching HF's numerics and for
    the model's position range.
    """
    return jnp.maximum(slots_T[None, :] - num_pad_B[:, None], 0)


def cache_attention_mask(slots_T: jax.Array, num_pad_B: jax.Array, max_len: int) -> jax.Array:
    """[B, 1, T, S]: query slot t sees earlier-or-equal real slots, and a pad slot sees itself."""
    key_slots_S = jnp.arange(max_len, dtype=jnp.int32)
    causal_TxS = key_slots_S[None, :] <= slots_T[:, None]
    real_BxS = key_slots_S[None, :] >= num_pad_B[:, None]
    own_TxS = key_slots_S[None, :] == slots_T[:, None]
    return ((causal_TxS[None] & real_BxS[:, None, :]) | own_TxS[None])[:, None]


def forward_cached(
    spec: DecoderSpec,
    params: Params,
    input_ids_BxT: jax.Array,
    start: jax.Array | int,
    num_pad_B: jax.Array,
    cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    """Runs T new tokens that occupy cache slots [start, start + T); returns the final normed
    hidden states [B, T, D] and the updated cache.

    Prefill is one call with start = 0 and T = P; each decode step is a call with T = 1.
    `num_pad_B` counts each row's left padding (see the module docstring).
    """
    dtype = spec.compute_dtype
    eps = spec.rms_norm_eps
    max_len = cache["k"].shape[2]
    start = jnp.asarray(start, jnp.int32)
    num_pad_B = num_pad_B.astype(jnp.int32)
    slots_T = start + jnp.arange(input_ids_BxT.shape[1], dtype=jnp.int32)
    positions_BxT = rope_positions(slots_T, num_pad_B)
    sin, cos = qwen_layers.rope_tables(positions_BxT, spec.head_dim, spec.rope_theta, dtype)
    mask_Bx1xTxS = cache_attention_mask(slots_T, num_pad_B, max_len)
    x_BxTxD = jnp.take(params["embed"], input_ids_BxT, axis=0).astype(dtype)
    zero = jnp.zeros((), jnp.int32)

    def layer_step(x_BxTxD, layer, cache_slices, run):
        k_cache_BxSxKxH, v_cache_BxSxKxH = cache_slices
        q, k, v = qwen_layers.layer_qkv(layer, x_BxTxD, sin, cos, eps=eps, dtype=dtype)
        at = (zero, start, zero, zero)
        k_cache_BxSxKxH = jax.lax.dynamic_update_slice(
            k_cache_BxSxKxH, k.astype(k_cache_BxSxKxH.dtype), at
        )
        v_cache_BxSxKxH = jax.lax.dynamic_update_slice(
            v_cache_BxSxKxH, v.astype(v_cache_BxSxKxH.dtype), at
        )
        attn_BxTxNxH = qwen_layers.attention_core(
            q, k_cache_BxSxKxH, v_cache_BxSxKxH, mask_Bx1xTxS, spec.attention_impl
        )
        if run.sparse:
            x_BxTxD, _ = moe.layer_residual_and_moe(
                layer, x_BxTxD, attn_BxTxNxH, eps=eps, spec=spec.moe, dtype=dtype
            )
        else:
            x_BxTxD = qwen_layers.layer_residual_and_mlp(
                layer, x_BxTxD, attn_BxTxNxH, eps=eps, dtype=dtype
            )
        return x_BxTxD, (k_cache_BxSxKxH, v_cache_BxSxKxH)

    num_layers = cache["k"].shape[0]
    runs = layer_stack.layer_runs(spec.sparse_layers or (False,) * num_layers)
    x_BxTxD, outputs = layer_stack.scan_runs(
        layer_step, x_BxTxD, params["layers"], runs, per_layer=(cache["k"], cache["v"])
    )
    k_LxBxSxKxH, v_LxBxSxKxH = layer_stack.concat_runs(outputs, runs, sparse_only=False)
    hidden_BxTxD = qwen_layers.rms_norm(x_BxTxD, params["norm"], eps)
    return hidden_BxTxD, {"k": k_LxBxSxKxH, "v": v_LxBxSxKxH}


def lm_logits(spec: DecoderSpec, params: Params, hidden_BxTxD: jax.Array) -> jax.Array:
    """fp32 logits [B, T, V] of final hidden states, as the model's head computes them."""
    head_DxV = params["embed"].T if spec.tie_word_embeddings else params["lm_head"]
    return jnp.einsum(
        "BTD,DV->BTV",
        hidden_BxTxD,
        head_DxV.astype(spec.compute_dtype),
        preferred_element_type=jnp.float32,
    )
