"""Device meshes and the one table that maps the model's logical axes onto them.

Parameters carry logical axis names (vocab, embed, heads, ...); `LOGICAL_AXIS_RULES` says which mesh
axis each one is split over. FSDP splits the embed dimension (present in every large matrix) over
`fsdp`; tensor parallelism splits heads, MLP and vocab over `tensor`; batches are split over
`data` x `fsdp`. A dimension that does not divide evenly is left replicated, and the sufficiency
check reports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
}


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Mesh axis sizes with at most one -1 replaced by the devices left over."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
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
            f"mesh: data x fsdp x tensor = {sizes[0]} x {sizes[1]} x {sizes[2]} = "
            f"{math.prod(sizes)}, but there are {num_devices} devices"
        )
    return sizes[0], sizes[1], sizes[2]


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    # Auto axis types: GSPMD propagates shardings from the annotated inputs and parameters.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
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


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings, one per Variable of `state` (same tree), from their logical_axes metadata."""

    def one(var: nnx.Variable) -> NamedSharding:
        axes = var.get_metadata().get("logical_axes")
        shape = var.get_value().shape
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
