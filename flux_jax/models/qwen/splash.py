"""Causal, segment-masked GQA attention through the Pallas splash-attention kernel (TPU).

Splash attention is the TPU flash-attention kernel that MaxText and Tunix use: it never builds the
[T, T] logits in HBM and skips the fully masked blocks above the diagonal. Its mask is static
(here causal) and-ed with per-token segment ids, which covers the standard layout (segment 0 =
padding attends to earlier padding, as in `layers.causal_segment_mask`). It cannot express the
branch mask of the shared-prefix and packed layouts, so config validation refuses
`prefix_sharing` and `packing` with it.

The kernel works per example on [heads, T, head_dim]; it is vmapped over the batch and, on a
mesh, run under `jax.shard_map` with the batch split over the data axes and the heads over the
tensor axis (a Pallas kernel cannot be partitioned by XLA itself). `interpret=True` runs the
same kernel through the Pallas interpreter on any backend: that is how the tests check it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding, PartitionSpec

# Sequence blocks must be multiples of the TPU lane width; longer blocks amortise the per-block
# overhead (MaxText's default is 512).
LANES = 128
MAX_BLOCK = 512
# Query padding added to reach a block multiple gets its own segment, so it only sees itself.
PAD_SEGMENT = -1


def padded_length(seq_len: int) -> int:
    """`seq_len` rounded up to a multiple of the lane width (and of the block, past 512)."""
    padded = -(-seq_len // LANES) * LANES
    if padded > MAX_BLOCK:
        padded = -(-padded // MAX_BLOCK) * MAX_BLOCK
    return padded


def _kernel(num_heads: int, seq_len: int, interpret: bool):
    """The splash kernel for a causal mask over `seq_len` (a multiple of the block) per head.

    Built per trace, not cached: the kernel holds its block-sparsity tables as jax arrays, which
    would leak from one trace into the next.
    """
    block = min(seq_len, MAX_BLOCK)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _attention_on_shard(
    q_BxTxNxH: jax.Array,
    k_BxTxKxH: jax.Array,
    v_BxTxKxH: jax.Array,
    segment_ids_BxT: jax.Array,
    interpret: bool,
) -> jax.Array:
    batch, seq_len, num_heads, head_dim = q_BxTxNxH.shape
    padded = padded_length(seq_len)
    pad = padded - seq_len

    def heads_first(x_BxTxNxH):
        x = jnp.pad(x_BxTxNxH, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    # The kernel does not scale the logits: fold 1 / sqrt(H) into q, as jax.nn does.
    q_BxNxTxH = heads_first(q_BxTxNxH * jnp.asarray(head_dim**-0.5, q_BxTxNxH.dtype))
    k_BxKxTxH, v_BxKxTxH = heads_first(k_BxTxKxH), heads_first(v_BxTxKxH)
    segments_BxT = jnp.pad(
        segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=PAD_SEGMENT
    )
    kernel = _kernel(num_heads, padded, interpret)

    def one_example(q, k, v, segments):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=segments, kv=segments))

    out_BxNxTxH = jax.vmap(one_example)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT)
    return out_BxNxTxH.transpose(0, 2, 1, 3)[:, :seq_len].astype(q_BxTxNxH.dtype)


def splash_attention(
    q_BxTxNxH: jax.Array,
    k_BxTxKxH: jax.Array,
    v_BxTxKxH: jax.Array,
    segment_ids_BxT: jax.Array,
    *,
    activation_sharding: jax.sharding.Sharding | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention within segments, [B, T, N, H] out, by the splash kernel.

    With a NamedSharding for the [B, T, D] activations (batch over the data axes), the kernel runs
    per device under shard_map: the batch split as the activations are, the heads over "tensor"
    when the mesh has that axis (the projections already split them there).
    """
    if q_BxTxNxH.shape[2] % k_BxTxKxH.shape[2]:
        raise ValueError(f"{q_BxTxNxH.shape[2]} query heads are not a multiple of the KV heads")
    attend = functools.partial(_attention_on_shard, interpret=interpret)
    if not isinstance(activation_sharding, NamedSharding):
        return attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    mesh = activation_sharding.mesh
    batch_axes = activation_sharding.spec[0] if len(activation_sharding.spec) else None
    head_axis = "tensor" if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 else None
    heads_spec = PartitionSpec(batch_axes, None, head_axis, None)
    return jax.shard_map(
        attend,
        mesh=mesh,
        in_specs=(heads_spec, heads_spec, heads_spec, PartitionSpec(batch_axes, None)),
        out_specs=heads_spec,
        check_vma=False,
    )(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
