"""Device meshes and the one table that maps the model's logical axes onto them.

Parameters carry logical axis names (vocab, embed, heads, ...); `LOGICAL_AXIS_RULES` says which mesh
axis each one is split over. FSDP splits the embed dimension (present in every large matrix) over
`fsdp`; tensor parallelism splits heads, MLP and vocab over `tensor`; batches are split over
`data` x `fsdp` (`BATCH_AXES`; `batch_multiple` is their size). A dimension that does not divide
evenly is left replicated, and the sufficiency check (flux_jax.sharding_check) reports it.

Activations follow the batch: the model pins its [B, T, D] hidden states to `batch_sharding(mesh)`
between layers (`QwenForCausalLM(activation_sharding=...)`). Without that pin, GSPMD resolved the
conflict between a batch split over fsdp and weights split over fsdp by gathering the whole batch
onto every device (measured on 8 CPU devices, fsdp=8: 3x the temp memory, 3.5x slower) instead of
gathering each layer's weights, which is what FSDP means.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# The batch is also split over `expert`: outside the sparse blocks that axis is one more data
# axis (non-expert weights are whole on each of its shards), as in MaxText. It comes first
# (major): the sparse block's shard_map splits tokens over `expert` first and leaves data x fsdp
# to GSPMD inside, so the rows each device holds are the same inside and outside (with
# `expert` last, GSPMD had to rematerialise whole activations between the two layouts).
BATCH_AXES = ("expert", "data", "fsdp")

LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "expert": "expert",  # Qwen3-MoE expert kernels [L, E, ...]: models/qwen/expert_parallel.py
}


def resolve_mesh_shape(
    data: int, fsdp: int, tensor: int, num_devices: int, expert: int = 1
) -> tuple[int, int, int, int]:
    """Mesh axis sizes (data, fsdp, tensor, expert) with at most one -1 replaced by the devices
    left over."""
    sizes = [data, fsdp, tensor, expert]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor} "
            f"expert={expert}"
        )
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh: {num_devices} devices do not divide by the fixed axes' product {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: data x fsdp x tensor x expert = {sizes[0]} x {sizes[1]} x {sizes[2]} x "
            f"{sizes[3]} = {math.prod(sizes)}, but there are {num_devices} devices"
        )
    return sizes[0], sizes[1], sizes[2], sizes[3]


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[Any] | None = None,
    expert: int = 1,
) -> Mesh:
    """A (data, fsdp, tensor, expert) mesh over `devices` (default: all devices of all
    processes). `expert` > 1 splits Qwen3-MoE experts (models/qwen/expert_parallel.py)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices), expert)
    # Auto axis types: GSPMD propagates shardings from the annotated inputs and parameters.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: dict[str, str | None] | None = None,
) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes, leaving non-divisible dims whole."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    used: set[str] = set()
    spec: list[str | None] = []
    for name, size in zip(logical_axes, shape, strict=True):
        mesh_axis = rules.get(name) if name is not None else None
        if (
            mesh_axis is None
            or mesh_axis in used
            or mesh.shape[mesh_axis] == 1
            or size % mesh.shape[mesh_axis]
        ):
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def logical_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]
) -> NamedSharding:
    """Where an array with these logical axes lives on `mesh` (see `logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings, one per Variable of `state` (same tree), from their logical_axes metadata."""

    def one(var: nnx.Variable) -> NamedSharding:
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            return replicated(mesh)
        return logical_sharding(mesh, axes, var.get_value().shape)

    return jax.tree.map(one, state, is_leaf=_is_variable)


def state_shardings_of(state: Any) -> Any:
    """The shardings of a (concrete) state, to pin a jitted step's output to them."""
    return jax.tree.map(lambda x: x.sharding, state)


def to_host(x: Any) -> np.ndarray:
    """A device array as numpy on every process, also when other processes hold parts of it."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp x expert; every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every axis whole: a full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def mesh_from_config(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of a config's `mesh` section: {data, fsdp, tensor, expert} sizes, -1 = the
    devices left.

    `mesh_cfg` is FluxConfig's `config.mesh` or any mapping/object with those keys (a missing key
    takes FluxConfig's default: data 1, fsdp -1, tensor 1). Devices default to every device of
    every process, so on a multi-host run the mesh spans the whole slice or cluster.
    """

    def size(name: str, default: int) -> int:
        if isinstance(mesh_cfg, Mapping):
            return int(mesh_cfg.get(name, default))
        return int(getattr(mesh_cfg, name, default))

    sizes = size("data", 1), size("fsdp", -1), size("tensor", 1)
    return make_mesh(*sizes, devices=devices, expert=size("expert", 1))


def batch_multiple(mesh: Mesh | Mapping[str, int]) -> int:
    """How many ways a batch is split (data x fsdp x expert): batch sizes must be multiples of it.

    `mesh` is a Mesh (or AbstractMesh) or its shape, a mapping of axis name to size (an axis it
    lacks counts as 1).
    """
    shape = mesh if isinstance(mesh, Mapping) else mesh.shape
    return math.prod(shape.get(axis, 1) for axis in BATCH_AXES)


def shard_batch(
    batch: dict[str, Any], mesh: Mesh | None, *, same_on_every_process: bool = False
) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, its leading axis split over data x fsdp.

    On a multi-host run each process passes its own slice of the global batch, unless
    `same_on_every_process` (eval: every process holds the whole batch), where each process
    places only the rows its devices hold. Without a mesh the arrays go to the default device.
    """
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    if same_on_every_process:
        return {
            k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in batch.items()
        }
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def weight_shard_factor(mesh: Mesh | Mapping[str, int]) -> int:
    """How many ways the weights are split: fsdp x tensor (the data axis holds replicas, and so
    does `expert` for every weight but the expert kernels, which it splits further).

    `mesh` is a Mesh (or AbstractMesh) or its shape, a mapping of axis name to size.
    """
    shape = mesh if isinstance(mesh, Mapping) else mesh.shape
    return math.prod(size for name, size in shape.items() if name not in ("data", "expert"))


def opt_state_shardings(tx: Any, params: Any) -> Any | None:
    """Shardings for `tx.init(params)`: moments (mu, nu) like their parameter, counters replicated.

    `jax.jit(tx.init)(params)` alone does not do this: the moments are zeros with no data
    dependence on the parameters, so GSPMD has nothing to propagate and puts the whole optimiser
    state on one device. Returns None when the parameters are not NamedSharding-placed (one
    device, host arrays): there is nothing to follow then.
    """
    leaf_shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(params)]
    if not leaf_shardings or not all(isinstance(s, NamedSharding) for s in leaf_shardings):
        return None
    scalar = replicated(leaf_shardings[0].mesh)
    shapes = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx,
        lambda _, param: param.sharding,
        shapes,
        params,
        transform_non_params=lambda _: scalar,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )


def replicated_like(params: Any) -> NamedSharding | None:
    """Replicated over the mesh the parameters lie on (for the step counter), or None."""
    leaves = jax.tree.leaves(params)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    if not isinstance(sharding, NamedSharding):
        return None
    return replicated(sharding.mesh)


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units, as device memory is quoted."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


# Names that moved to their own modules, still importable from here for callers not yet switched
# (trainer.py imports check_sharding from here). Resolved on first use: sharding_check imports
# this module, so an import at the top would be circular.
_MOVED = {
    "CHECKED_CATEGORIES": "flux_jax.sharding_check",
    "ShardingError": "flux_jax.sharding_check",
    "ShardingReport": "flux_jax.sharding_check",
    "check_sharding": "flux_jax.sharding_check",
    "qwen_logical_axes": "flux_jax.model_setup",
    "shard_params_like": "flux_jax.model_setup",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
