"""Is the state sharded enough? Per-device bytes of a train state against its ideal share.

With weights split over fsdp x tensor devices, each device should hold about 1 / (fsdp x tensor)
of the parameters and of the optimiser state. A state that silently ended up replicated (a missing
annotation, a jit that dropped its output shardings) trains correctly on a small model and runs
out of memory on a large one, so the trainer calls `check_sharding` before the first step, which
raises `ShardingError` with a per-device report naming the largest offenders.

Leaves may be jax Arrays or ShapeDtypeStructs with a sharding, so a plan can be checked before
anything is allocated (tests/test_memory_plan.py does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from flux_jax.sharding import format_bytes, weight_shard_factor

# The parts of a state that must be split over fsdp x tensor; anything else is reported only.
CHECKED_CATEGORIES = ("params", "opt_state", "reference")


class ShardingError(ValueError):
    """The state is not sharded enough for the mesh; `report` says which device holds what."""

    def __init__(self, report: ShardingReport):
        self.report = report
        super().__init__(
            "parameters or optimiser state are not sharded over the mesh as configured: some "
            "device holds more than its 1/(fsdp x tensor) share (a replicated state, missing "
            "logical_axes, or a jit that dropped its output shardings?)\n" + str(report)
        )


@dataclasses.dataclass(frozen=True)
class LeafShare:
    """One array of the state: its size, layout and the most bytes any one device holds of it."""

    category: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: str
    total_bytes: int
    device_bytes: int


@dataclasses.dataclass(frozen=True)
class CategoryShare:
    """Bytes of one part of the state (params, opt_state, reference, other) over the mesh."""

    name: str
    total_bytes: int
    max_device_bytes: int
    min_device_bytes: int
    ideal_bytes: float  # total / (fsdp x tensor)
    limit_bytes: float  # tolerance x ideal + slack
    checked: bool

    @property
    def ok(self) -> bool:
        return not self.checked or self.max_device_bytes <= self.limit_bytes


@dataclasses.dataclass(frozen=True)
class ShardingReport:
    """What `check_sharding` measured; `str(report)` is a table for logs and errors."""

    mesh_shape: dict[str, int]
    shard_factor: int
    categories: dict[str, CategoryShare]
    offenders: tuple[LeafShare, ...]  # the leaves furthest above their ideal share, largest first
    tolerance: float
    slack_bytes: int

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.categories.values())

    def device_bytes(self, category: str) -> int:
        """The most bytes of `category` any one device holds (0 if the state has none)."""
        share = self.categories.get(category)
        return share.max_device_bytes if share else 0

    def __str__(self) -> str:
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        lines = [
            f"sharding check, mesh {mesh}: weights split {self.shard_factor} ways "
            f"(fsdp x tensor); limit = {self.tolerance:g} x ideal + "
            f"{format_bytes(self.slack_bytes)}",
            f"  {'':<10} {'total':>11} {'max/device':>11} {'min/device':>11} {'ideal':>11} "
            f"{'limit':>11}  verdict",
        ]
        for c in self.categories.values():
            verdict = "ok" if c.ok else "TOO BIG"
            if not c.checked:
                verdict = "not checked"
            lines.append(
                f"  {c.name:<10} {format_bytes(c.total_bytes):>11} "
                f"{format_bytes(c.max_device_bytes):>11} {format_bytes(c.min_device_bytes):>11} "
                f"{format_bytes(c.ideal_bytes):>11} {format_bytes(c.limit_bytes):>11}  {verdict}"
            )
        if self.offenders:
            lines.append("  largest shares above 1/(fsdp x tensor) of their array:")
            for leaf in self.offenders:
                lines.append(
                    f"    {leaf.category}{leaf.path} {leaf.shape} {leaf.dtype} {leaf.spec}: "
                    f"{format_bytes(leaf.device_bytes)}/device, ideal "
                    f"{format_bytes(leaf.total_bytes / self.shard_factor)}"
                )
        return "\n".join(lines)


def check_sharding(
    state: Any,
    mesh: Mesh,
    *,
    reference: Any = None,
    tolerance: float = 1.1,
    slack_bytes: int = 1 << 20,
    raise_error: bool = True,
    num_offenders: int = 5,
) -> ShardingReport:
    """Checks that each device holds about 1/(fsdp x tensor) of the parameters and optimiser state.

    Args:
      state: the train state `{"step", "params", "opt_state"}` (any other top-level key counts as
        "other", reported but not checked), or a bare parameter tree. Leaves are jax Arrays or
        ShapeDtypeStructs with a sharding (so a plan can be checked before anything is allocated);
        leaves without a sharding (host arrays) are skipped.
      mesh: the mesh the state should be sharded over.
      reference: optionally the frozen reference parameters, checked as their own category.
      tolerance, slack_bytes: a category passes when its largest per-device share is at most
        `tolerance x total / (fsdp x tensor) + slack_bytes`. The tolerance and slack absorb what
        cannot be split: q/k norms, scalars, dimensions that do not divide the mesh axis (which
        `logical_to_spec` leaves whole). The default 1 MiB of slack is noise for any model whose
        memory matters and lets toy models with odd vocabularies through.
      raise_error: raise `ShardingError` (with the report) when a checked category fails.

    Returns:
      The `ShardingReport`; `report.device_bytes("params")` is the most parameter bytes on any
      device.
    """
    factor = weight_shard_factor(mesh)
    mesh_devices = list(mesh.devices.flat)
    categories: dict[str, CategoryShare] = {}
    leaves: list[LeafShare] = []
    for name, tree in _state_parts(state, reference).items():
        per_device, tree_leaves = _measure(name, tree, mesh_devices)
        leaves += tree_leaves
        total = sum(leaf.total_bytes for leaf in tree_leaves)
        if not total and name != "params":
            continue
        ideal = total / factor
        categories[name] = CategoryShare(
            name=name,
            total_bytes=total,
            max_device_bytes=max(per_device.values()),
            min_device_bytes=min(per_device.values()),
            ideal_bytes=ideal,
            limit_bytes=tolerance * ideal + slack_bytes,
            checked=name in CHECKED_CATEGORIES,
        )
    report = ShardingReport(
        mesh_shape=dict(mesh.shape),
        shard_factor=factor,
        categories=categories,
        offenders=_largest_excess(leaves, factor)[:num_offenders],
        tolerance=tolerance,
        slack_bytes=slack_bytes,
    )
    if raise_error and not report.ok:
        raise ShardingError(report)
    return report


def _state_parts(state: Any, reference: Any) -> dict[str, Any]:
    """The state split into the report's categories: params, opt_state, other, reference."""
    if isinstance(state, Mapping) and "params" in state:
        parts = {"params": state["params"], "opt_state": state.get("opt_state")}
        parts["other"] = {k: v for k, v in state.items() if k not in ("params", "opt_state")}
    else:
        parts = {"params": state}
    if reference is not None:
        parts["reference"] = reference
    return parts


def _measure(
    category: str, tree: Any, mesh_devices: list[Any]
) -> tuple[dict[Any, int], list[LeafShare]]:
    """Bytes of `tree` on each mesh device, and one LeafShare per sharded leaf."""
    per_device = dict.fromkeys(mesh_devices, 0)
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        share = _leaf_share(leaf)
        if share is None:
            continue
        leaf_total, device_bytes, spec = share
        for device, nbytes in device_bytes.items():
            per_device[device] = per_device.get(device, 0) + nbytes
        leaves.append(
            LeafShare(
                category=category,
                path=jax.tree_util.keystr(path),
                shape=tuple(leaf.shape),
                dtype=str(leaf.dtype),
                spec=spec,
                total_bytes=leaf_total,
                device_bytes=max(device_bytes.values(), default=0),
            )
        )
    return per_device, leaves


def _largest_excess(leaves: list[LeafShare], factor: int) -> tuple[LeafShare, ...]:
    """The checked leaves some device holds more than 1/factor of, furthest above it first."""
    excess = [
        x
        for x in leaves
        if x.category in CHECKED_CATEGORIES and x.device_bytes > x.total_bytes / factor
    ]
    excess.sort(key=lambda x: x.device_bytes - x.total_bytes / factor, reverse=True)
    return tuple(excess)


def _itemsize(dtype: Any) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes (PRNG keys) carry their own
        return int(getattr(dtype, "itemsize", 0))


def _leaf_share(leaf: Any) -> tuple[int, dict[Any, int], str] | None:
    """(total bytes, bytes per device, spec) of one array, or None for a host value."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or not hasattr(leaf, "shape"):
        return None
    shape = tuple(leaf.shape)
    itemsize = _itemsize(leaf.dtype)
    total = math.prod(shape) * itemsize
    try:
        shard_bytes = math.prod(sharding.shard_shape(shape)) * itemsize
        device_bytes = dict.fromkeys(sharding.device_set, shard_bytes)
    except ValueError:  # an uneven sharding: count each device's own block
        device_bytes = {
            d: math.prod(len(range(*s.indices(n))) for s, n in zip(idx, shape, strict=True))
            * itemsize
            for d, idx in sharding.devices_indices_map(shape).items()
        }
    spec = str(sharding.spec) if isinstance(sharding, NamedSharding) else type(sharding).__name__
    return total, device_bytes, spec
