"""Device meshes and the one table that maps the model's logical axes onto them.

Parameters carry logical axis names (vocab, embed, heads, ...); `LOGICAL_AXIS_RULES` says which mesh
axis each one is split over. FSDP splits the embed dimension (present in every large matrix) over
`fsdp`; tensor parallelism splits heads, MLP and vocab over `tensor`; batches are split over
`data` x `fsdp`. A dimension that does not divide evenly is left replicated, and the sufficiency
check reports it.

The sufficiency check (`check_sharding`) answers "is it sharded enough": with weights split over
fsdp x tensor devices, each device should hold about 1 / (fsdp x tensor) of the parameters and of
the optimiser state. A state that silently ended up replicated (a missing annotation, a jit that
dropped its output shardings) trains correctly on a small model and runs out of memory on a large
one, so the trainer checks before the first step and raises `ShardingError` with a per-device
report naming the largest offenders.

Activations follow the batch: the model pins its [B, T, D] hidden states to `batch_sharding(mesh)`
between layers (`QwenForCausalLM(activation_sharding=...)`). Without that pin, GSPMD resolved the
conflict between a batch split over fsdp and weights split over fsdp by gathering the whole batch
onto every device (measured on 8 CPU devices, fsdp=8: 3x the temp memory, 3.5x slower) instead of
gathering each layer's weights, which is what FSDP means.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
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


def to_host(x: Any) -> np.ndarray:
    """A device array as numpy on every process, also when other processes hold parts of it."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_from_config(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of a config's `mesh` section: {data, fsdp, tensor} sizes, -1 = the devices left.

    `mesh_cfg` is FluxConfig's `config.mesh` or any mapping/object with those keys (a missing key
    takes FluxConfig's default: data 1, fsdp -1, tensor 1). Devices default to every device of
    every process, so on a multi-host run the mesh spans the whole slice or cluster.
    """

    def size(name: str, default: int) -> int:
        if isinstance(mesh_cfg, Mapping):
            return int(mesh_cfg.get(name, default))
        return int(getattr(mesh_cfg, name, default))

    return make_mesh(size("data", 1), size("fsdp", -1), size("tensor", 1), devices=devices)


def weight_shard_factor(mesh: Any) -> int:
    """How many ways the weights are split: fsdp x tensor (the data axis holds replicas)."""
    return math.prod(size for name, size in mesh.shape.items() if name not in ("data",))


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
    scalar = NamedSharding(leaf_shardings[0].mesh, PartitionSpec())
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
    return NamedSharding(sharding.mesh, PartitionSpec())


# ----------------------------------------------------------------------------------------------
# The sufficiency check


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


CHECKED_CATEGORIES = ("params", "opt_state", "reference")


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
    if isinstance(state, Mapping) and "params" in state:
        parts = {"params": state["params"], "opt_state": state.get("opt_state")}
        parts["other"] = {k: v for k, v in state.items() if k not in ("params", "opt_state")}
    else:
        parts = {"params": state}
    if reference is not None:
        parts["reference"] = reference

    factor = weight_shard_factor(mesh)
    mesh_devices = list(mesh.devices.flat)
    categories: dict[str, CategoryShare] = {}
    leaves: list[LeafShare] = []
    for name, tree in parts.items():
        per_device = dict.fromkeys(mesh_devices, 0)
        total = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            share = _leaf_share(leaf)
            if share is None:
                continue
            leaf_total, device_bytes, spec = share
            total += leaf_total
            for device, nbytes in device_bytes.items():
                per_device[device] = per_device.get(device, 0) + nbytes
            leaves.append(
                LeafShare(
                    category=name,
                    path=jax.tree_util.keystr(path),
                    shape=tuple(leaf.shape),
                    dtype=str(leaf.dtype),
                    spec=spec,
                    total_bytes=leaf_total,
                    device_bytes=max(device_bytes.values(), default=0),
                )
            )
        if not total and name != "params":
            continue
        ideal = total / factor
        counts = list(per_device.values())
        categories[name] = CategoryShare(
            name=name,
            total_bytes=total,
            max_device_bytes=max(counts),
            min_device_bytes=min(counts),
            ideal_bytes=ideal,
            limit_bytes=tolerance * ideal + slack_bytes,
            checked=name in CHECKED_CATEGORIES,
        )

    excess = [x for x in leaves if x.category in CHECKED_CATEGORIES]
    excess = [x for x in excess if x.device_bytes > x.total_bytes / factor]
    excess.sort(key=lambda x: x.device_bytes - x.total_bytes / factor, reverse=True)
    report = ShardingReport(
        mesh_shape=dict(mesh.shape),
        shard_factor=factor,
        categories=categories,
        offenders=tuple(excess[:num_offenders]),
        tolerance=tolerance,
        slack_bytes=slack_bytes,
    )
    if raise_error and not report.ok:
        raise ShardingError(report)
    return report


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


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units, as device memory is quoted."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


# ----------------------------------------------------------------------------------------------
# Placing an existing parameter tree


def shard_params_like(
    params: Any, mesh: Mesh, *, dtype: Any = None, copy: bool = False
) -> dict[str, Any]:
    """A Qwen parameter dict (as from `nnx.to_pure_dict`) placed on its shardings over `mesh`.

    For a tree built outside the model, such as a reference copy in another dtype or weights read
    on the host. The logical axes come from the model itself (model.py's annotations, for the
    architecture the shapes describe), so this cannot drift from what `state_shardings` gives.
    Host (numpy) leaves are placed with `jax.make_array_from_callback`, so on a multi-host run a
    process copies only the blocks its devices hold. `dtype` casts (e.g. bf16 for the frozen
    reference). Where neither placement nor dtype changes, the result may share buffers with
    `params`: pass `copy=True` when `params` will be donated (e.g. the policy's parameters that
    the train step updates in place) and the result must outlive that.
    """
    axes_tree = qwen_logical_axes(params)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731

    def place(axes: tuple[str | None, ...], x: Any) -> jax.Array:
        target = NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh))
        out_dtype = np.dtype(dtype if dtype is not None else x.dtype)
        if not isinstance(x, jax.Array):
            host = np.asarray(x)
            return jax.make_array_from_callback(
                host.shape, target, lambda index: host[index].astype(out_dtype), dtype=out_dtype
            )
        out = jax.device_put(x, target)
        if out.dtype != out_dtype:
            return out.astype(out_dtype)  # elementwise: keeps the sharding, new buffers
        return jax.numpy.copy(out) if copy and out is x else out

    return jax.tree.map(place, axes_tree, params, is_leaf=is_axes)


def qwen_logical_axes(params: Any) -> dict[str, Any]:
    """The logical axes of every parameter of a Qwen parameter dict, same tree, from model.py."""
    from flux_jax.models.qwen.model import build_model  # the model does not import us

    abstract = build_model(_architecture_of(params), abstract=True)
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    axes: dict[str, Any] = {}
    for path, var in flat:
        node = axes
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(var.get_metadata()["logical_axes"])
    got = jax.tree.structure(jax.tree.map(lambda _: 0, params))
    want = jax.tree.structure(
        jax.tree.map(lambda _: 0, axes, is_leaf=lambda x: isinstance(x, tuple))
    )
    if got != want:
        raise ValueError(
            f"not a Qwen parameter dict of the shape model.py builds:\n  got  {got}\n  want {want}"
        )
    return axes


def _architecture_of(params: Any) -> Any:
    """The QwenConfig whose parameter shapes these are (numerics fields left at defaults)."""
    from flux_jax.models.qwen.config import QwenConfig

    try:
        vocab, hidden = params["embed_tokens"]["embedding"].shape
        attn = params["layers"]["self_attn"]
        layers, _, heads, head_dim = attn["q_proj"]["kernel"].shape
        kv_heads = attn["k_proj"]["kernel"].shape[2]
        mlp = params["layers"]["mlp"]["gate_proj"]["kernel"].shape[2]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a Qwen parameter dict (as from nnx.to_pure_dict): {e!r}") from e
    return QwenConfig(
        model_type="qwen2" if "bias" in attn["q_proj"] else "qwen3",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings="lm_head" not in params,
    )
