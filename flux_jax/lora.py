"""LoRA adapters on the Qwen projections: settings, PEFT's initialisation, merging into the base.

A LoRA run trains, for each targeted projection `W [L, *in, *out]` of the frozen base, two small
matrices `A [L, *in, r]` and `B [L, r, *out]`; the layer computes
`y = x @ W + scale * ((dropout(x) @ A) @ B)` (Hu et al. 2021, "LoRA"; PEFT's `lora.Linear`).
`scale` is `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajievo 2023), as PEFT.

The adapters are a nested dict that mirrors the base's stacked-layer paths:

    adapters["layers"]["self_attn"]["q_proj"] = {"lora_a": [L, D, r], "lora_b": [L, r, N, H]}

with each kernel's in/out split exactly as `layers.token_matmul` splits it (q/k/v: in (D,), out
(N, H); o_proj: in (N, H), out (D,); gate/up: in (D,), out (F,); down: in (F,), out (D,)).
They are fp32 master weights, cast to the compute dtype at use. Initialised as PEFT does: A
kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B zero, so the first
forward is exactly the base model's and the first DPO loss is ln 2.

The model applies them when called with `lora=ActiveAdapters(...)` (models/qwen/model.py); with
none it is the plain base model, which is also the DPO reference of a LoRA run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flux_jax.models.qwen.weights import kernel_value

Params = dict[str, Any]

# Every projection LoRA can target: its group in the layer tree and how many leading kernel axes
# (after the layer axis) are its input, as token_matmul splits the kernel.
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("self_attn", 1),
    "k_proj": ("self_attn", 1),
    "v_proj": ("self_attn", 1),
    "o_proj": ("self_attn", 2),
    "gate_proj": ("mlp", 1),
    "up_proj": ("mlp", 1),
    "down_proj": ("mlp", 1),
}
DEFAULT_TARGETS = tuple(TARGETS)
ADAPTER_KEYS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The LoRA hyper-parameters of a run (PEFT's LoraConfig names): `rank` r, `alpha`,
    `dropout` on the adapter input, the `target_modules`, and `rslora` scaling."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        problems += target_errors(self.target_modules)
        if problems:
            raise ValueError("model.lora: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        """What the adapter path is multiplied by: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_config(cls, lora_config: Any) -> LoraSettings | None:
        """The settings of a config's `model.lora` section; None when LoRA is off (rank 0)."""
        if lora_config.rank == 0:
            return None
        return cls(
            rank=lora_config.rank,
            alpha=float(lora_config.alpha),
            dropout=float(lora_config.dropout),
            target_modules=tuple(lora_config.target_modules),
            rslora=bool(lora_config.rslora),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (checkpoint metadata); `from_dict` reads it back."""
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoraSettings:
        return cls(**{**values, "target_modules": tuple(values["target_modules"])})


def target_errors(target_modules: Any) -> list[str]:
    """What is wrong with a target_modules value (empty list: nothing), naming the valid names."""
    names = list(target_modules)
    unknown = [n for n in names if n not in TARGETS]
    problems = []
    if unknown:
        problems.append(f"target_modules {unknown} unknown; valid: {', '.join(DEFAULT_TARGETS)}")
    if not names:
        problems.append(f"target_modules is empty; valid: {', '.join(DEFAULT_TARGETS)}")
    if len(set(names)) != len(names):
        problems.append(f"target_modules {names} lists a module twice")
    return problems


@dataclasses.dataclass(frozen=True)
class ActiveAdapters:
    """What a forward pass with adapters needs: the adapter tree, the settings (scale, dropout)
    and the dropout key (None: no dropout, as in eval; a training step passes one)."""

    adapters: Params
    settings: LoraSettings
    dropout_rng: jax.Array | None = None


# -- shapes, initialisation, placement ---------------------------------------------------------


def _kernel(base_params: Params, name: str) -> Any:
    group, _ = TARGETS[name]
    try:
        return base_params["layers"][group][name]["kernel"]
    except (KeyError, TypeError):
        raise ValueError(
            f"model.lora.target_modules: {name!r} has no kernel at layers/{group}/{name}/kernel "
            "in this model's parameters (LoRA covers the dense attention and MLP projections)"
        ) from None


def _kernel_sharding(kernel: Any) -> NamedSharding | None:
    """The NamedSharding of a kernel: a plain array's, or a quantised leaf's codes'."""
    for leaf in (kernel, getattr(kernel, "qvalue", None)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding
    return None


def _adapter_pair_shapes(kernel: Any, num_in: int, settings: LoraSettings) -> dict[str, Any]:
    """ShapeDtypeStructs of one projection's A and B (fp32), laid out like the kernel: A keeps the
    kernel's layer and input axes' sharding, B its layer and output axes'; the rank axis is whole.
    """
    shape = tuple(kernel.shape)
    layers, in_shape, out_shape = shape[0], shape[1 : 1 + num_in], shape[1 + num_in :]
    a_shape = (layers, *in_shape, settings.rank)
    b_shape = (layers, settings.rank, *out_shape)
    sharding = _kernel_sharding(kernel)
    a_sharding = b_sharding = None
    if sharding is not None:
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
        a_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[: 1 + num_in], None))
        b_sharding = NamedSharding(sharding.mesh, PartitionSpec(spec[0], None, *spec[1 + num_in :]))
    return {
        "lora_a": jax.ShapeDtypeStruct(a_shape, jnp.float32, sharding=a_sharding),
        "lora_b": jax.ShapeDtypeStruct(b_shape, jnp.float32, sharding=b_sharding),
    }


def adapter_shapes(base_params: Params, settings: LoraSettings) -> Params:
    """The adapter tree as ShapeDtypeStructs (fp32), each with the sharding its values get over
    the base's mesh (None when the base is not on a mesh): a restore target for checkpoints."""
    tree: Params = {}
    for name in settings.target_modules:
        group, num_in = TARGETS[name]
        pair = _adapter_pair_shapes(_kernel(base_params, name), num_in, settings)
        tree.setdefault(group, {})[name] = pair
    return {"layers": tree}


def init_adapters(base_params: Params, settings: LoraSettings, key: jax.Array) -> Params:
    """Fresh adapters for `base_params` (PEFT's init: A kaiming-uniform(a=sqrt(5)), B zero).

    A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = prod(in), the bound torch's
    kaiming_uniform_ gives with a = sqrt(5). Each target's A draws from `key` folded with its index
    in TARGETS, so the values do not depend on which other modules are targeted, nor on the mesh.
    Drawn on the host with NumPy (adapters are small; a jitted threefry draw per target costs
    seconds of compilation) and placed on the kernels' mesh, each device taking its own slice.
    """
    shapes = adapter_shapes(base_params, settings)
    tree: Params = {}
    for name in settings.target_modules:
        group, num_in = TARGETS[name]
        a, b = (shapes["layers"][group][name][k] for k in ADAPTER_KEYS)
        bound = 1.0 / math.sqrt(math.prod(a.shape[1 : 1 + num_in]))
        target_key = jax.random.fold_in(key, list(TARGETS).index(name))
        rng = np.random.default_rng(np.asarray(jax.random.key_data(target_key)))
        tree.setdefault(group, {})[name] = {
            "lora_a": _place(rng.uniform(-bound, bound, a.shape).astype(np.float32), a.sharding),
            "lora_b": _place(np.zeros(b.shape, np.float32), b.sharding),
        }
    return {"layers": tree}


def _place(host: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# -- merging ------------------------------------------------------------------------------------


def adapter_delta(lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B as a kernel [L, *in, *out], in fp32."""
    num_in = lora_a.ndim - 2
    a_LxIxR = lora_a.reshape(lora_a.shape[0], -1, lora_a.shape[-1]).astype(jnp.float32)
    b_LxRxO = lora_b.reshape(lora_b.shape[0], lora_b.shape[1], -1).astype(jnp.float32)
    delta_LxIxO = jnp.einsum("lir,lro->lio", a_LxIxR, b_LxRxO, precision=jax.lax.Precision.HIGHEST)
    out_shape = (*lora_a.shape[: 1 + num_in], *lora_b.shape[2:])
    return scale * delta_LxIxO.reshape(out_shape)


def merge(base_params: Params, adapters: Params, settings: LoraSettings) -> Params:
    """The base parameters with every adapter folded in: W + scale * A @ B, summed in fp32 and
    cast to the base's dtype (a quantised base kernel is dequantised first, so the merged kernel
    is a plain array carrying the quantisation error of the base, as PEFT's merge_and_unload).

    A new plain dict: merged kernels are new arrays laid out like the base's, every other leaf is
    the base's own (not copied); `base_params` is unchanged. The merged model's forward equals the
    forward with adapters (dropout off) up to the rounding of the one sum.
    """
    check_adapters(base_params, adapters, settings)
    merged = jax.tree.map(lambda x: x, base_params, is_leaf=_is_quantized_leaf)
    for group, projections in adapters["layers"].items():
        for name, pair in projections.items():
            node = merged["layers"][group][name] = dict(merged["layers"][group][name])
            node["kernel"] = _merged_kernel(
                node["kernel"], pair["lora_a"], pair["lora_b"], settings.scale
            )
    return merged


@jax.jit(static_argnums=3)
def _merged_kernel(kernel: Any, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    delta = adapter_delta(lora_a, lora_b, scale)
    # A quantised kernel's dtype is its dense (dequantised) dtype.
    return (kernel_value(kernel, jnp.float32) + delta).astype(kernel.dtype)


def _is_quantized_leaf(x: Any) -> bool:
    return hasattr(x, "qvalue")  # a quantised kernel stays one leaf


def check_adapters(base_params: Params, adapters: Params, settings: LoraSettings) -> None:
    """Raises ValueError unless `adapters` has exactly the shapes `settings` give for this base."""
    want = jax.tree.map(lambda s: tuple(s.shape), adapter_shapes(base_params, settings))
    try:
        got = jax.tree.map(lambda x: tuple(x.shape), adapters)
    except AttributeError as e:
        raise ValueError(f"adapters are not a tree of arrays: {e}") from None
    if got != want:
        raise ValueError(
            "adapters do not match the LoRA settings and base model:\n"
            f"  expected {_describe(want)}\n  got      {_describe(got)}"
        )


def _describe(shapes: Any) -> str:
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return ", ".join(f"{jax.tree_util.keystr(p)} {s}" for p, s in flat)


def num_params(adapters: Params) -> int:
    """The number of trainable adapter parameters."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
