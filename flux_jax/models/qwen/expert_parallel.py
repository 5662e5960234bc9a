"""Expert parallelism: a sparse block's experts split over the mesh's `expert` axis.

The expert kernels [E, ...] are sharded on their E axis over `expert` (sharding.LOGICAL_AXIS_RULES
maps the logical axis `expert` onto it), so each device holds E / expert experts; the router and
every non-expert weight are whole on each `expert` shard, and the batch is split over `expert`
as over a data axis (sharding.BATCH_AXES), as MaxText does.

The token exchange is a `jax.shard_map` manual over the `expert` axis only (data/fsdp/tensor stay
automatic, so GSPMD still shards inside it as without expert parallelism):
  1. all-gather the routed tokens (hidden states, top-k weights and expert ids) over `expert`;
  2. each shard renumbers the experts it holds 0..E_local-1 and sends every other slot to an
     out-of-range id, which `jax.lax.ragged_dot` (group sizes count only real ids) and the dense
     path's one-hot both leave at zero, and zeroes that slot's weight;
  3. runs the unchanged dense or grouped expert function on its experts;
  4. reduce-scatters (psum_scatter) the partial outputs back to the shard that owns each token.
This is the all-gather / reduce-scatter form of the exchange: it moves E_shards x more activation
bytes than a ragged all-to-all of only the routed slots, but it is plain collectives that run on
every backend (CPU included) under jit and reverse-mode autodiff, and `ragged_dot` sees a static
shape. When the tokens do not divide over `expert` (a decode step of one row) they go in whole
and the partial outputs are summed (psum) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from flux_jax.models.qwen.weights import kernel_value

EXPERT_AXIS = "expert"


def expert_ways(mesh: Mesh | Mapping[str, int]) -> int:
    """The size of the mesh's `expert` axis (1 when it has none); a Mesh or its shape."""
    shape = mesh if isinstance(mesh, Mapping) else dict(mesh.shape)
    return int(shape.get(EXPERT_AXIS, 1))


def check_expert_mesh(config: Any, ways: int) -> None:
    """Raises unless a model with this QwenConfig can run on an `expert` axis of `ways` devices:
    it must have experts, and `ways` must divide their count (each device holds whole experts)."""
    if ways == 1:
        return
    if not config.is_moe:
        raise ValueError(
            f"mesh.expert={ways}: the model ({config.model_type}) has no mixture-of-experts "
            "layers; set mesh.expert: 1 and put those devices on mesh.data or mesh.fsdp"
        )
    if config.num_experts % ways:
        n = config.num_experts
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(
            f"mesh.expert={ways} does not divide the model's num_experts={n} (config.json): "
            f"each device must hold whole experts; set mesh.expert to one of {divisors}"
        )


def run_sharded(
    run: Callable[..., jax.Array],
    experts: dict[str, Any],
    h_MxD: jax.Array,
    weights_MxK: jax.Array,
    experts_MxK: jax.Array,
    dtype: Any,
    *,
    mesh: Mesh,
) -> jax.Array:
    """`run(experts, h, weights, experts_idx, dtype)` (moe.dense_experts or grouped_experts) with
    the experts split over `mesh`'s `expert` axis; the same [M, D] output as `run` on one device.
    """
    ways = expert_ways(mesh)
    kernels = {name: {"kernel": kernel_value(p["kernel"], dtype)} for name, p in experts.items()}
    num_local = next(iter(kernels.values()))["kernel"].shape[0] // ways
    split_tokens = h_MxD.shape[0] % ways == 0
    token_spec = PartitionSpec(EXPERT_AXIS) if split_tokens else PartitionSpec()

    def local(kernels, h_MxD, weights_MxK, experts_MxK):
        if split_tokens:
            h_MxD, weights_MxK, experts_MxK = (
                jax.lax.all_gather(x, EXPERT_AXIS, axis=0, tiled=True)
                for x in (h_MxD, weights_MxK, experts_MxK)
            )
        first = jax.lax.axis_index(EXPERT_AXIS) * num_local
        local_MxK = experts_MxK - first
        mine_MxK = (local_MxK >= 0) & (local_MxK < num_local)
        local_MxK = jnp.where(mine_MxK, local_MxK, num_local)  # out of range: contributes 0
        weights_MxK = jnp.where(mine_MxK, weights_MxK, jnp.zeros_like(weights_MxK))
        out_MxD = run(kernels, h_MxD, weights_MxK, local_MxK, dtype)
        if split_tokens:
            return jax.lax.psum_scatter(out_MxD, EXPERT_AXIS, scatter_dimension=0, tiled=True)
        return jax.lax.psum(out_MxD, EXPERT_AXIS)

    kernel_specs = jax.tree.map(lambda _: PartitionSpec(EXPERT_AXIS), kernels)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(kernel_specs, token_spec, token_spec, token_spec),
        out_specs=token_spec,
        axis_names={EXPERT_AXIS},
    )(kernels, h_MxD, weights_MxK, experts_MxK)
