"""The LoRA and QLoRA part of the memory plan: a frozen, maybe quantised base and fp32 adapters.

With LoRA (flux_jax.lora) `memory_plan` counts, per device:

  base        the frozen base: each parameter's local block in model.lora.base_dtype, except, with
              model.lora.base_quantization, the seven projection kernels: codes (int8: 1 byte,
              nf4: half a byte per weight) plus fp32 scales, the scales split like the codes
              where their (smaller) dimension still divides (flux_jax.quantization);
  params      the trained adapters, fp32: A [L, *in, r] split like its kernel's input axes,
              B [L, r, *out] like its output axes, the rank axis whole (lora.adapter_shapes);
  gradients   the adapters' gradients, fp32 (+ an fp32 accumulator with grad_accum_steps > 1);
  optimizer   AdamW's mu and nu of the adapters, 2 x 4 bytes per adapter weight;
  reference   0: the reference is the same base with the adapters switched off.

Activations are the full fine-tune's (the backward still runs through every frozen layer to reach
the adapters below it, and needs the same residuals), plus:

  lora_path            x @ A [rows x T, r] of every adapted projection in the compute dtype,
                       saved for the backward (every layer's, or one layer's under remat full);
  dequantized_weights  a quantised base's layer dequantised to the compute dtype around its
                       matmuls (the codes stay resident; one layer's dense copy at a time).

The base bytes use the same shapes and sharding rules as the arrays the trainer places, so they
are exact (tests/test_lora_plan.py checks them against a quantised base's real leaves).
"""

from __future__ import annotations

import math
from typing import Any

from flux_jax.lora import TARGETS, LoraSettings
from flux_jax.quantization import QUANTIZED_KERNELS, BaseQuantization, code_bits, scale_shape


def _local(shape: tuple[int, ...], spec: tuple[Any, ...], mesh: dict[str, int]) -> float:
    """Elements of one device's block of `shape` under `spec`, a dimension whose size does not
    divide its mesh axis left whole (as logical_to_spec and quantized_sharding do)."""
    n = 1
    for size, axis in zip(shape, spec, strict=True):
        ways = mesh[axis] if axis is not None else 1
        n *= size // ways if size % ways == 0 else size
    return n


def _kernel_path(group: str, name: str) -> str:
    return f"layers/{group}/{name}/kernel"


def base_bytes(
    blocks: dict[str, dict[str, Any]],
    mesh: dict[str, int],
    *,
    dtype_bytes: int,
    quantization: BaseQuantization,
) -> float:
    """Per-device bytes of the frozen base (`blocks` from memory_plan.param_blocks)."""
    quantized = {_kernel_path(g, n): k for (g, n), k in QUANTIZED_KERNELS.items()}
    total = 0.0
    for path, block in blocks.items():
        if not quantization.enabled or path not in quantized:
            total += block["local_elements"] * dtype_bytes
            continue
        codes = block["local_elements"] * code_bits(quantization.format) / 8
        scales = scale_shape(block["shape"], quantized[path], quantization.block_size, path)
        total += codes + 4 * _local(scales, block["spec"], mesh)
    return total


def present_targets(blocks: dict[str, dict[str, Any]], settings: LoraSettings) -> list[str]:
    """The targeted projections this model has: an all-sparse Qwen3-MoE has no dense MLP, so
    the default gate/up/down targets adapt nothing there (experts take no adapters)."""
    return [
        name for name in settings.target_modules if _kernel_path(TARGETS[name][0], name) in blocks
    ]


def adapter_elements(
    blocks: dict[str, dict[str, Any]], mesh: dict[str, int], settings: LoraSettings
) -> tuple[float, int]:
    """(per-device, global) adapter weights: A and B of every targeted projection."""
    local, total = 0.0, 0
    for name in present_targets(blocks, settings):
        group, num_in = TARGETS[name]
        block = blocks[_kernel_path(group, name)]
        shape, spec, r = block["shape"], block["spec"], settings.rank
        a_shape, a_spec = (*shape[: 1 + num_in], r), (*spec[: 1 + num_in], None)
        b_shape, b_spec = (shape[0], r, *shape[1 + num_in :]), (spec[0], None, *spec[1 + num_in :])
        local += _local(a_shape, a_spec, mesh) + _local(b_shape, b_spec, mesh)
        total += math.prod(a_shape) + math.prod(b_shape)
    return local, total


def lora_state_bytes(
    blocks: dict[str, dict[str, Any]],
    mesh: dict[str, int],
    settings: LoraSettings,
    *,
    base_dtype_bytes: int,
    quantization: BaseQuantization,
    grad_accum_steps: int,
) -> dict[str, float]:
    """Per-device bytes of base, params (adapters), gradients, optimizer and reference."""
    adapters, _ = adapter_elements(blocks, mesh, settings)
    accumulator = adapters * 4 if grad_accum_steps > 1 else 0
    return {
        "base": base_bytes(blocks, mesh, dtype_bytes=base_dtype_bytes, quantization=quantization),
        "params": adapters * 4,
        "gradients": adapters * 4 + accumulator,
        "optimizer": 2 * adapters * 4,
        "reference": 0.0,
    }


def lora_activation_terms(
    blocks: dict[str, dict[str, Any]],
    mesh: dict[str, int],
    settings: LoraSettings,
    *,
    tokens: float,
    layers: int,
    compute_bytes: int,
    remat: str,
    quantization: BaseQuantization,
) -> dict[str, float]:
    """The activation terms LoRA adds (see the module docstring), bytes per device."""
    saved_layers = 1 if remat == "full" else layers
    terms = {
        "lora_path": saved_layers
        * tokens
        * len(present_targets(blocks, settings))
        * settings.rank
        * compute_bytes
    }
    if quantization.enabled:
        # After the FSDP gather: split over the tensor axis only.
        tensor = {axis: size if axis == "tensor" else 1 for axis, size in mesh.items()}
        one_layer = sum(
            _local(b["shape"], b["spec"], tensor) / b["shape"][0]
            for path, b in blocks.items()
            if path in {_kernel_path(g, n) for g, n in QUANTIZED_KERNELS}
        )
        terms["dequantized_weights"] = one_layer * compute_bytes
    return terms


def describe(settings: LoraSettings, quantization: BaseQuantization, base_dtype: str) -> str:
    """One line for the plan's table: rank, targets, scaling and how the base is stored."""
    if quantization.enabled:
        blocks = (
            f"blocks of {quantization.block_size}"
            if quantization.block_size
            else "per output channel"
        )
        stored = f"{quantization.format} ({blocks}, fp32 scales), the rest {base_dtype}"
    else:
        stored = base_dtype
    return (
        f"LoRA r={settings.rank} alpha={settings.alpha:g}{' rsLoRA' if settings.rslora else ''} "
        f"on {', '.join(settings.target_modules)}; frozen base {stored}"
    )
