"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

The filters follow Hugging Face's logits processors, in their order: divide by the temperature,
keep the k largest logits (top-k), then keep the smallest set of the most likely tokens whose
probability mass reaches p (top-p, nucleus; computed on the top-k-filtered distribution). Tokens
tied with the last kept one are kept too.

temperature, top_k and top_p are traced values, so changing them does not recompile; only the
choice greedy / sampled is static (greedy needs no sort).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_BxV: jax.Array, top_k: jax.Array | int, top_p: jax.Array | float):
    """`logits_BxV` with every token outside the top-k / top-p set at -inf.

    top_k = 0 and top_p = 1 switch the respective filter off.
    """
    vocab = logits_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
    top_k = jnp.asarray(top_k, jnp.int32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, k - 1, 1, axis=-1)
    sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, -jnp.inf)

    top_p = jnp.asarray(top_p, jnp.float32)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # The most likely token always stays (mass before it is 0 < top_p); top_p = 1 keeps everything
    # even where the cumulative sum rounds to 1 before the tail.
    keep_BxV = (mass_before_BxV < top_p) | (top_p >= 1.0)
    nucleus_min_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    threshold_Bx1 = jnp.maximum(kth_Bx1, nucleus_min_Bx1)
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def next_token(
    logits_BxV: jax.Array,
    key: jax.Array,
    *,
    greedy: bool,
    temperature: jax.Array | float,
    top_k: jax.Array | int,
    top_p: jax.Array | float,
) -> jax.Array:
    """int32 [B]: the argmax when `greedy` (static), else a sample from the filtered softmax."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    scaled_BxV = logits_BxV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    filtered_BxV = filter_logits(scaled_BxV, top_k, top_p)
    return jax.random.categorical(key, filtered_BxV, axis=-1).astype(jnp.int32)
