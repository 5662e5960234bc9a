"""flux_jax's "xla" attention (grouped_query_attention) equals jax.nn.dot_product_attention.

Model-level parity with transformers is in test_qwen_parity.py; this pins the kernel itself, with
its gradients, on GQA groupings, a KV cache longer than the queries, and padded segments.
Tolerances: fp32 1e-5 absolute (values of order 1); bf16 2e-2 (bf16 holds ~3 digits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax.models.qwen.layers import causal_segment_mask, grouped_query_attention


@pytest.mark.parametrize(
    "heads,kv_heads,seq_q,seq_k,dtype",
    [
        (8, 4, 12, 12, jnp.float32),
        (4, 1, 9, 9, jnp.float32),
        (6, 6, 5, 5, jnp.float32),
        (8, 2, 3, 11, jnp.float32),
        (8, 4, 12, 12, jnp.bfloat16),
    ],
)
def test_grouped_query_attention_equals_jax_nn(heads, kv_heads, seq_q, seq_k, dtype):
    rng = np.random.default_rng(0)
    batch, head_dim = 3, 16

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    q, k, v = (
        r(batch, seq_q, heads, head_dim),
        r(batch, seq_k, kv_heads, head_dim),
        r(batch, seq_k, kv_heads, head_dim),
    )
    segments = np.ones((batch, seq_k), np.int32)
    segments[1, seq_k - 3 :] = 0  # a padded row
    mask = causal_segment_mask(jnp.asarray(segments))[:, :, seq_k - seq_q :]  # the last queries
    weights = r(batch, seq_q, heads, head_dim).astype(jnp.float32)

    def loss(fn, q, k, v):
        return (fn(q, k, v).astype(jnp.float32) * weights).sum()

    def reference(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=head_dim**-0.5, implementation="xla"
        )

    def ours(q, k, v):
        return grouped_query_attention(q, k, v, mask)

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    out, ref = ours(q, k, v), reference(q, k, v)
    assert out.dtype == ref.dtype == dtype
    # Scaled by the values' size (atol alone below 1): rounding grows with the summed terms.
    scale = max(1.0, float(np.abs(np.float32(ref)).max()))
    np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=tol * scale)
    grads = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
    for g, h in zip(grads, ref_grads, strict=True):
        scale = max(1.0, float(np.abs(np.float32(h)).max()))
        np.testing.assert_allclose(np.float32(g), np.float32(h), atol=tol * 4 * scale)
