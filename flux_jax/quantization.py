"""The quantised frozen base of a QLoRA run: int8 or NF4 codes with fp32 scales, through qwix.

`model.lora.base_quantization` picks the format of the seven projection kernels of every decoder
layer (q/k/v/o, gate/up/down); `model.lora.quantization_block` the scale granularity:

  int8  symmetric absmax: code = round(w / s) in [-127, 127], s = absmax / 127.5 (qwix's bound).
        Error <= s / 2 = absmax / 255 per weight.
  nf4   QLoRA's NormalFloat-4 (Dettmers et al. 2023, appendix E): code = the nearest of 16
        quantiles of N(0, 1) scaled to [-1, 1], s = absmax. Error <= s x half the widest gap
        between neighbouring codes = 0.152 x absmax (at the -1 / -0.696 pair; 0.08 near 0).

  quantization_block 0   one scale per output channel over all its input features (LLM.int8's
                         vector-wise layout): a kernel [L, *in, *out] has scales [L, 1.., *out].
  quantization_block b   one scale per block of b consecutive input features of one output
                         channel, as bitsandbytes' blocks of 64 over a [out, in] weight: the last
                         input axis (D, F, or o_proj's head_dim) is tiled by b.

Embeddings, norms, biases and the LM head stay in the base dtype, as in QLoRA and PEFT (which
quantise nn.Linear layers but skip lm_head): they are a small share of the weights of the models
QLoRA is for (Qwen3-8B: 1.2 GiB of 16 in bf16), the embedding is a gather rather than a matmul,
and the LM head's error would land directly on every log-prob the DPO loss compares.

Quantising uses qwix's QArray (`qwix.quantize` / `qwix.dequantize`, the library Tunix builds its
QLoRA on); the result is a `qwix.QArray` pytree in the kernel's place. Its codes have the kernel's
shape and sharding; its scales have the same rank and are split over the same mesh axes wherever
their (smaller) dimension still divides, so each device holds the scales of its own codes. A
QArray slices along the stacked layer axis like an array, so it passes through `jax.lax.scan`, and
models/qwen/weights.kernel_value dequantises one layer right before its matmul.

Quantising runs one layer at a time (`quantize_stacked_kernel`): qwix's NF4 bucketing keeps
~10 bytes of temporaries per weight, which over a whole stacked kernel of Qwen3-8B
([36, 4096, 12288]) would be 13.5 GiB, and is 0.4 GiB for one layer of it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from jax.sharding import NamedSharding, PartitionSpec

from flux_jax.models.qwen.weights import is_quantized

FORMATS = ("none", "int8", "nf4")
_QTYPES: dict[str, Any] = {"int8": jnp.int8, "nf4": "nf4"}
_CODE_BITS = {"int8": 8, "nf4": 4}

# (group, projection) -> how many input axes follow the layer axis in its kernel [L, *in, *out],
# as layers.token_matmul splits it. These are the kernels a QLoRA base quantises.
QUANTIZED_KERNELS: dict[tuple[str, str], int] = {
    ("self_attn", "q_proj"): 1,
    ("self_attn", "k_proj"): 1,
    ("self_attn", "v_proj"): 1,
    ("self_attn", "o_proj"): 2,  # in = (heads, head_dim)
    ("mlp", "gate_proj"): 1,
    ("mlp", "up_proj"): 1,
    ("mlp", "down_proj"): 1,
}


@dataclasses.dataclass(frozen=True)
class BaseQuantization:
    """How the frozen base's projection kernels are stored: `format` none, int8 or nf4;
    `block_size` input features per scale (0 = one scale per output channel)."""

    format: str = "none"
    block_size: int = 64

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(
                f"model.lora.base_quantization={self.format!r}; valid: {', '.join(FORMATS)}"
            )
        if self.block_size < 0:
            raise ValueError(
                f"model.lora.quantization_block={self.block_size} must be >= 0 "
                "(0 = one scale per output channel)"
            )

    @property
    def enabled(self) -> bool:
        return self.format != "none"

    @classmethod
    def from_config(cls, lora_config: Any) -> BaseQuantization:
        """From FluxConfig's `model.lora` section (base_quantization, quantization_block)."""
        return cls(
            format=str(lora_config.base_quantization),
            block_size=int(lora_config.quantization_block),
        )


def scale_axes(
    kernel_shape: tuple[int, ...], in_axes: int, block_size: int, name: str = "kernel"
) -> tuple[tuple[int, ...], dict[int, int]]:
    """qwix's (channelwise_axes, tiled_axes) of one layer [*in, *out] of a stacked kernel.

    Per channel: every output axis is channelwise and the input axes are reduced. Blocks: the last
    input axis is tiled by `block_size`, the other input axes (o_proj's heads) are channelwise.
    """
    layer_shape = kernel_shape[1:]
    out_axes = tuple(range(in_axes, len(layer_shape)))
    if block_size == 0:
        return out_axes, {}
    last_in = in_axes - 1
    width = layer_shape[last_in]
    if width % block_size:
        raise ValueError(
            f"model.lora.quantization_block={block_size} does not divide the input width "
            f"{width} of {name} {tuple(kernel_shape)}: use a divisor of it, or 0 (one scale "
            "per output channel)"
        )
    return tuple(range(last_in)) + out_axes, {last_in: block_size}


def scale_shape(
    kernel_shape: tuple[int, ...], in_axes: int, block_size: int, name: str = "kernel"
) -> tuple[int, ...]:
    """The shape of a stacked kernel's scales [L, ...] (same rank as the kernel)."""
    channelwise, tiled = scale_axes(kernel_shape, in_axes, block_size, name)
    layer = [
        size if axis in channelwise else size // tiled[axis] if axis in tiled else 1
        for axis, size in enumerate(kernel_shape[1:])
    ]
    return (kernel_shape[0], *layer)


def quantize_layer(
    layer_kernel: jax.Array,
    in_axes: int,
    spec: BaseQuantization,
    name: str = "kernel",
) -> qwix.QArray:
    """One layer [*in, *out] of a stacked kernel as a QArray (codes of its shape, fp32 scales of
    its rank), quantised from its fp32 values."""
    channelwise, tiled = scale_axes((1, *layer_kernel.shape), in_axes, spec.block_size, name)
    return qwix.quantize(
        layer_kernel.astype(jnp.float32),
        _QTYPES[spec.format],
        channelwise_axes=channelwise,
        tiled_axes=tiled,
        scale_dtype=jnp.float32,
    )


def quantize_kernel(
    kernel: jax.Array, in_axes: int, spec: BaseQuantization, name: str = "kernel"
) -> qwix.QArray:
    """A stacked kernel [L, *in, *out] as one QArray, in a single traced function (for tests and
    small kernels; `quantize_stacked_kernel` is the memory-bounded path for real models)."""
    return jax.vmap(lambda w: quantize_layer(w, in_axes, spec, name))(kernel)


def quantized_sharding(kernel_sharding: Any, leaf_shapes: qwix.QArray) -> Any:
    """Shardings for a QArray replacing a kernel placed on `kernel_sharding`.

    The codes take the kernel's spec; the scales keep each mesh axis of it on the dimensions where
    their size still divides by it (a per-channel scale's size-1 input axis is replicated).
    Returns None when the kernel is not NamedSharding-placed.
    """
    if not isinstance(kernel_sharding, NamedSharding):
        return None
    mesh, spec = kernel_sharding.mesh, tuple(kernel_sharding.spec)
    spec = spec + (None,) * (len(leaf_shapes.scale.shape) - len(spec))

    def fit(shape: tuple[int, ...]) -> NamedSharding:
        kept = []
        for axis, size in zip(spec, shape, strict=True):
            names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
            ways = math.prod(mesh.shape[n] for n in names)
            kept.append(axis if names and size % ways == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*kept))

    return dataclasses.replace(
        leaf_shapes, qvalue=fit(leaf_shapes.qvalue.shape), scale=fit(leaf_shapes.scale.shape)
    )


@functools.partial(jax.jit, static_argnames=("in_axes", "spec"))
def _quantize_layer_of(
    kernel: jax.Array, index: jax.Array, *, in_axes: int, spec: BaseQuantization
) -> qwix.QArray:
    layer = jax.lax.dynamic_index_in_dim(kernel, index, keepdims=False)
    return quantize_layer(layer, in_axes, spec)


@jax.jit
def _stack_layers(parts: list[qwix.QArray]) -> qwix.QArray:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


def quantize_stacked_kernel(
    kernel: jax.Array, in_axes: int, spec: BaseQuantization, name: str = "kernel"
) -> qwix.QArray:
    """A stacked kernel [L, *in, *out] quantised layer by layer into a QArray sharded like it.

    One compiled function quantises layer `i` (a traced index: it compiles once per kernel shape
    and format); the layers are stacked at the end. A loop inside one jit (lax.map) would not
    bound the memory: XLA moves the fp32 conversion of the input out of the loop, materialising
    the whole kernel in fp32 (measured: 7.0 GiB of temporaries for Qwen3-8B's [36, 4096, 12288]
    gate_proj, against 0.47 GiB for one layer of it here).
    """
    scale_axes(kernel.shape, in_axes, spec.block_size, name)  # a block that does not divide
    parts = [
        _quantize_layer_of(kernel, jnp.int32(i), in_axes=in_axes, spec=spec)
        for i in range(kernel.shape[0])
    ]
    stacked = _stack_layers(parts)
    del parts
    shardings = quantized_sharding(getattr(kernel, "sharding", None), stacked)
    return stacked if shardings is None else jax.device_put(stacked, shardings)


def quantize_base(
    params: Mapping[str, Any], spec: BaseQuantization, *, delete_originals: bool = False
) -> dict[str, Any]:
    """The base parameter tree with its projection kernels replaced by QArrays.

    `params` is the model's parameter tree as nested dicts (`nnx.to_pure_dict` of the Param
    state, or flux_jax.lora's base): `params["layers"][group][proj]["kernel"]` [L, *in, *out].
    Every other leaf is kept as it is, Qwen3-MoE's routed experts (layers/moe) included.
    `delete_originals` frees each dense kernel on its devices as soon as its codes exist, so
    loading never holds more than the dense base plus one quantised kernel (the caller must not
    use those arrays afterwards).
    """
    if not spec.enabled:
        return dict(params)
    out = _copy_tree(params)
    layers = out.get("layers")
    if layers is None:
        raise ValueError("quantize_base: the parameter tree has no 'layers' (not a Qwen model?)")
    for (group, proj), in_axes in QUANTIZED_KERNELS.items():
        if proj not in layers.get(group, {}):
            continue  # a Qwen3-MoE model whose layers are all sparse has no dense MLP
        holder = layers[group][proj]
        kernel = holder["kernel"]
        if is_quantized(kernel):
            raise ValueError(f"layers/{group}/{proj}/kernel is already quantised")
        holder["kernel"] = quantize_stacked_kernel(
            kernel, in_axes, spec, f"layers/{group}/{proj}/kernel"
        )
        if delete_originals and isinstance(kernel, jax.Array):
            kernel.delete()
    return out


def dequantize_base(params: Mapping[str, Any], dtype: Any = jnp.float32) -> dict[str, Any]:
    """The tree with every QArray replaced by its dequantised values in `dtype` (other leaves
    unchanged): what a merged export of a QLoRA run folds its adapters into."""

    def dense(x: Any) -> Any:
        return qwix.dequantize(x).astype(dtype) if is_quantized(x) else x

    return jax.tree.map(dense, _copy_tree(params), is_leaf=is_quantized)


def leaf_bytes(x: Any) -> int:
    """Bytes a leaf occupies on its devices, all shards together: codes at their bit width
    (NF4 packs two codes per byte, as XLA stores uint4), plus fp32 scales."""
    if is_quantized(x):
        parts = [x.qvalue, x.scale] + ([x.zero_point] if x.zero_point is not None else [])
        return sum(leaf_bytes(p) for p in parts)
    bits = jax.dtypes.itemsize_bits(x.dtype)
    return math.ceil(math.prod(x.shape) * bits / 8)


def tree_bytes(tree: Any) -> int:
    """`leaf_bytes` summed over a parameter tree (QArrays count as one leaf each)."""
    return sum(leaf_bytes(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def code_bits(format: str) -> int:
    """Bits per stored code of a quantisation format (int8: 8, nf4: 4)."""
    return _CODE_BITS[format]


def _copy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dicts copied (leaves shared), so replacing a leaf leaves the input untouched."""
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
