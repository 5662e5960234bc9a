"""Gradient accumulation over micro-batches inside one jitted step, as a pure `lax.scan`.

A step's batch of B pairs is split into K equal micro-batches of B / K pairs. The DPO loss is a
mean over pairs, so the mean of the K micro-batch means equals the full-batch mean, and likewise
for its gradient: micro-batches are weighted equally. Gradients are summed in fp32 whatever their
dtype and divided by K once at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def split_microbatches(batch: PyTree, num_microbatches: int) -> PyTree:
    """Reshape every [B, ...] leaf to [K, B / K, ...] with a strided split.

    Micro-batch k takes rows k, k + K, k + 2K, ... rather than a contiguous block. When B is
    sharded over data-parallel devices, a contiguous block would live on only some devices; the
    strided split gives every micro-batch rows from every device shard.
    """

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"batch dim {x.shape[0]} is not divisible by num_microbatches={num_microbatches}"
            )
        x_MxKx = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(x_MxKx, 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_and_grad_fn: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
    params: PyTree,
    microbatches: PyTree,
) -> tuple[PyTree, PyTree]:
    """Mean gradients and mean aux over a leading micro-batch axis, one micro-batch at a time.

    Args:
      loss_and_grad_fn: `(params, microbatch) -> (aux, grads)`, e.g.
        `jax.value_and_grad(loss_fn, has_aux=True)`, whose `aux` is then `(loss, metrics)`.
        Every leaf of `aux` must be a per-micro-batch mean (or anything whose equal-weight mean
        over micro-batches is what you want to log).
      params: passed unchanged to every call.
      microbatches: pytree whose leaves are [K, ...]; leaf[k] is micro-batch k
        (see `split_microbatches`).

    Returns:
      `(mean_grads, mean_aux)`: grads in their original dtype (fp32 for fp32 master weights),
      accumulated in fp32; aux leaves as fp32 means.
    """
    leaves = jax.tree.leaves(microbatches)
    if not leaves:
        raise ValueError("microbatches has no array leaves")
    num_micro = leaves[0].shape[0]

    # Shapes of one call's outputs, to allocate the fp32 accumulators (trace-time only).
    first = jax.tree.map(lambda x: x[0], microbatches)
    aux_shape, grads_shape = jax.eval_shape(loss_and_grad_fn, params, first)

    def zeros_f32(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        return jnp.zeros(leaf.shape, jnp.float32)

    def add_f32(acc: jax.Array, x: jax.Array) -> jax.Array:
        return acc + x.astype(jnp.float32)

    def step(
        carry: tuple[PyTree, PyTree], microbatch: PyTree
    ) -> tuple[tuple[PyTree, PyTree], None]:
        grad_sum, aux_sum = carry
        aux, grads = loss_and_grad_fn(params, microbatch)
        return (jax.tree.map(add_f32, grad_sum, grads), jax.tree.map(add_f32, aux_sum, aux)), None

    init = (jax.tree.map(zeros_f32, grads_shape), jax.tree.map(zeros_f32, aux_shape))
    (grad_sum, aux_sum), _ = jax.lax.scan(step, init, microbatches)
    mean_grads = jax.tree.map(lambda g, s: (g / num_micro).astype(s.dtype), grad_sum, grads_shape)
    mean_aux = jax.tree.map(lambda a: a / num_micro, aux_sum)
    return mean_grads, mean_aux
