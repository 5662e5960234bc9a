"""The splash-attention path (Pallas TPU kernel) equals the XLA attention, checked on CPU.

The kernel runs through the Pallas interpreter ("splash_interpret"): the same kernel code, block
schedule, masking and custom VJP as on a TPU, executed by XLA:CPU. Compared with
`grouped_query_attention` over `causal_segment_mask`, values and gradients, on lengths that need
padding to the 128-token block and on packed segments; then a whole model on a (fsdp, tensor) mesh,
where the kernel runs under shard_map. Tolerance: fp32, 2e-5 absolute (values of order 1; the
kernel's online softmax sums in another order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax.config import ConfigError, FluxConfig
from flux_jax.model_setup import ModelOptions
from flux_jax.models.qwen.layers import causal_segment_mask, grouped_query_attention
from flux_jax.models.qwen.model import build_model
from flux_jax.models.qwen.presets import PRESETS
from flux_jax.models.qwen.splash import padded_length, splash_attention
from flux_jax.sharding import batch_sharding, make_mesh

TOL = 2e-5


def _segments(batch: int, seq: int) -> np.ndarray:
    """Row 0: one sequence then padding; row 1: two packed sequences then padding; rest full."""
    segments = np.ones((batch, seq), np.int32)
    segments[0, seq - seq // 3 :] = 0
    segments[1, seq // 4 : seq - 5] = 2
    segments[1, seq - 5 :] = 0
    return segments


@pytest.mark.parametrize("seq,heads,kv_heads", [(40, 4, 2), (130, 4, 1), (128, 2, 2)])
def test_splash_equals_xla_attention_values_and_grads(seq, heads, kv_heads):
    rng = np.random.default_rng(seq)
    batch, head_dim = 3, 32

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k, v = (
        r(batch, seq, heads, head_dim),
        r(batch, seq, kv_heads, head_dim),
        r(batch, seq, kv_heads, head_dim),
    )
    segments = jnp.asarray(_segments(batch, seq))
    mask = causal_segment_mask(segments)
    weights = r(batch, seq, heads, head_dim)

    def ours(q, k, v):
        return splash_attention(q, k, v, segments, interpret=True)

    def reference(q, k, v):
        return grouped_query_attention(q, k, v, mask)

    out, ref = jax.jit(ours)(q, k, v), reference(q, k, v)
    assert out.shape == ref.shape == (batch, seq, heads, head_dim)
    scale = max(1.0, float(np.abs(np.asarray(ref)).max()))  # rounding grows with the values
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL * scale)

    def grads(fn):
        return jax.jit(jax.grad(lambda *a: (fn(*a) * weights).sum(), argnums=(0, 1, 2)))(q, k, v)

    for name, got, want in zip("qkv", grads(ours), grads(reference), strict=True):
        scale = max(1.0, float(np.abs(np.asarray(want)).max()))
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), atol=TOL * scale, err_msg=name
        )


def test_padded_length_is_a_block_multiple():
    assert [padded_length(n) for n in (1, 64, 128, 129, 512, 513, 1000, 1024)] == [
        128,
        128,
        128,
        256,
        512,
        1024,
        1024,
        1024,
    ]


def test_model_with_splash_on_a_mesh_equals_xla():
    """Whole tiny Qwen3 on a (fsdp 2, tensor 2) mesh: splash under shard_map vs the XLA path."""
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    model = build_model(PRESETS["tiny-qwen3"], activation_sharding=batch_sharding(mesh))
    batch, seq = 4, 48
    rng = np.random.default_rng(0)
    ids = jax.device_put(
        jnp.asarray(rng.integers(0, 512, (batch, seq)), jnp.int32), batch_sharding(mesh)
    )
    segments = jax.device_put(jnp.asarray(_segments(batch, seq)), batch_sharding(mesh))

    @nnx.jit
    def logits(model, ids, segments):
        return model(ids, segment_ids_BxT=segments)

    want = logits(model, ids, segments)
    model.attention_impl = "splash_interpret"
    got = logits(model, ids, segments)
    real = np.asarray(segments) > 0  # padding positions attend differently only in padding
    scale = max(1.0, float(np.abs(np.asarray(want)[real]).max()))  # logits: scale-aware
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-4 * scale)


def test_splash_refuses_branch_masks():
    model = build_model(PRESETS["tiny-qwen3"], attention_impl="splash_interpret")
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="splash attention cannot express the shared-prefix"):
        model(ids, segment_ids_BxT=ids, branch_ids_BxT=jnp.zeros_like(ids))


def test_config_and_backend_checks():
    config = FluxConfig()
    config.model.attention = "splash"
    config.model.prefix_sharing = True
    with pytest.raises(ConfigError, match="model.attention='splash' cannot express"):
        config.validate()
    with pytest.raises(ValueError, match="Pallas TPU kernel; this backend is 'cpu'"):
        _ = ModelOptions(attention="splash").attention_impl
    assert ModelOptions(attention="auto").attention_impl == "xla"  # on CPU: our GQA einsums
    assert ModelOptions(attention="xla").attention_impl == "xla"


def test_parameter_gradients_through_splash_with_remat_equal_xla():
    """d(loss)/d(params) through scan + remat "full" + shard_map + the kernel's custom VJP."""
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    model = build_model(
        PRESETS["tiny-qwen3"], remat="full", activation_sharding=batch_sharding(mesh)
    )
    batch, seq = 4, 40
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 512, (batch, seq)), jnp.int32)
    segments = jnp.asarray(_segments(batch, seq))
    weights = jnp.asarray(rng.normal(size=(batch, seq, 512)), jnp.float32)
    weights = weights * (segments > 0)[:, :, None]

    @nnx.jit
    def grads(model):
        def loss(model):
            return (model(ids, segment_ids_BxT=segments) * weights).sum() / weights.size

        return nnx.grad(loss)(model)

    want = nnx.to_flat_state(grads(model))
    model.attention_impl = "splash_interpret"
    got = nnx.to_flat_state(grads(model))
    for (path, g), (_, w) in zip(got, want, strict=True):
        g, w = np.asarray(g.get_value()), np.asarray(w.get_value())
        scale = max(float(np.abs(w).max()), 1e-8)
        np.testing.assert_allclose(g / scale, w / scale, atol=1e-4, err_msg=str(path))
