"""Per-device memory of a DPO run, before anything is allocated: will it fit, and on what mesh.

`memory_plan` adds up, per device:

  params       each parameter's local block under `sharding.logical_to_spec` (the same function
               that places the real arrays, so this number is exact, not an estimate);
  gradients    the same blocks in the parameter dtype, plus an fp32 accumulator of them when
               grad_accum_steps > 1 (`grad_accum.accumulate_gradients`);
  optimizer    AdamW's mu and nu, each like its parameter (optax keeps them in the parameter dtype,
               so fp32 master weights give 2 x 4 bytes per local parameter);
  reference    the frozen reference weights in the compute dtype (what the trainer keeps), sharded
               like the parameters; 0 for precomputed reference log-probs or reference_free;
  activations  an estimate: flux_jax/activation_memory.py.

With LoRA (model.lora.rank > 0) the trained params are the fp32 adapters, a frozen "base" (in
model.lora.base_dtype, or quantised) replaces the reference copy, and two activation terms are
added: flux_jax/lora_memory.py.

The estimate ignores XLA's scratch buffers and fragmentation: `memory_report.fits` keeps 10% of the
device free for them (`USABLE_FRACTION`). On GPU also set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95,
since JAX preallocates 75% of the memory by default. Device names and their memory: devices.py.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from flux_jax.activation_memory import activation_terms
from flux_jax.logprob_chunk import lm_head_chunk_size
from flux_jax.logprobs import DEFAULT_CHUNK_SIZE
from flux_jax.lora import LoraSettings
from flux_jax.lora_memory import describe as describe_lora
from flux_jax.lora_memory import lora_activation_terms, lora_state_bytes
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.models.qwen.expert_parallel import check_expert_mesh
from flux_jax.models.qwen.model import build_model
from flux_jax.models.qwen.presets import resolve_architecture
from flux_jax.quantization import BaseQuantization
from flux_jax.sharding import (
    MESH_AXES,
    batch_multiple,
    logical_to_spec,
    resolve_mesh_shape,
    weight_shard_factor,
)

REFERENCE_MODES = ("model", "precomputed", "none")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _dtype_bytes(dtype: Any) -> int:
    if isinstance(dtype, str) and dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    return np.dtype(dtype).itemsize


def param_blocks(cfg: QwenConfig, mesh_shape: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Every parameter's global shape, logical axes and per-device element count on this mesh
    ((data, fsdp, tensor[, expert]) sizes; expert defaults to 1)."""
    mesh_shape = tuple(mesh_shape) + (1,) * (len(MESH_AXES) - len(mesh_shape))
    mesh = AbstractMesh(
        mesh_shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    )
    abstract = build_model(cfg, abstract=True)
    blocks = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = tuple(var.get_value().shape)
        axes = var.get_metadata()["logical_axes"]
        spec = logical_to_spec(axes, shape, mesh)
        local = math.prod(
            n // mesh.shape[a] if a is not None else n for n, a in zip(shape, spec, strict=True)
        )
        blocks["/".join(map(str, path))] = {
            "shape": shape,
            "axes": tuple(axes),
            "spec": tuple(spec),
            "local_elements": local,
        }
    return blocks


def memory_plan(
    qwen_config: QwenConfig,
    *,
    mesh_shape: tuple[int, int, int],
    batch_size: int,
    grad_accum_steps: int = 1,
    max_length: int,
    param_dtype: Any = "float32",
    compute_dtype: Any = "float32",
    remat: str = "none",
    logprob_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    logprob_chunk_mib: float = 0,
    reference: str = "model",
    lora: LoraSettings | None = None,
    base_dtype: Any = None,
    base_quantization: BaseQuantization | None = None,
) -> dict[str, Any]:
    """Per-device bytes of params, gradients, optimiser state, reference and activations.

    Args:
      qwen_config: the architecture.
      mesh_shape: (data, fsdp, tensor[, expert]) sizes (no -1: resolve it first; expert
        defaults to 1).
      batch_size, grad_accum_steps: preference pairs per optimiser step (global) and micro-batches.
      max_length: padded sequence length T.
      param_dtype, compute_dtype: "float32" / "bfloat16" (or numpy dtypes).
      remat: "none", "full" or "dots".
      logprob_chunk_size: LM-head chunk (positions); None or 0 = unchunked logits.
      logprob_chunk_mib: the trainer's cap on one chunk's logits per device (0 = none); the
        plan uses the chunk the trainer would (flux_jax.logprob_chunk.lm_head_chunk_size).
      reference: "model" (frozen copy on device), "precomputed" or "none" (reference-free).
      lora: LoRA settings (None: full fine-tuning). With LoRA, "params" are the fp32 adapters,
        the frozen base is counted under "base" in `base_dtype` (default: compute_dtype), its
        projection kernels quantised per `base_quantization`, and "reference" is 0 (the base
        with the adapters off); see flux_jax/lora_memory.py.

    Returns:
      A dict with "per_device" (bytes: params, gradients, optimizer, reference, activations,
      total), "activation_terms" (the estimate's parts), "model", "mesh", "batch", "settings"
      and "warnings". The formulas are in the module docstring.
    """
    mesh = _check_plan_args(mesh_shape, batch_size, grad_accum_steps, remat, reference)
    cb = _dtype_bytes(compute_dtype)
    blocks = param_blocks(qwen_config, tuple(mesh.values()))
    per_device, warnings = _state_bytes(
        blocks,
        weight_ways=weight_shard_factor(mesh),
        param_bytes=_dtype_bytes(param_dtype),
        reference_bytes=cb if reference == "model" else 0,
        grad_accum_steps=grad_accum_steps,
    )
    quantization = base_quantization or BaseQuantization()
    if lora is not None:
        per_device = lora_state_bytes(
            blocks,
            mesh,
            lora,
            base_dtype_bytes=_dtype_bytes(base_dtype or compute_dtype),
            quantization=quantization,
            grad_accum_steps=grad_accum_steps,
        )
    micro = batch_size // grad_accum_steps
    rows = _rows_per_device(micro, batch_multiple(mesh), warnings)
    chunk = lm_head_chunk_size(
        logprob_chunk_size,
        max_chunk_mib=logprob_chunk_mib,
        rows_per_step=2 * batch_size,
        grad_accum_steps=grad_accum_steps,
        mesh_shape=mesh,
        vocab_size=qwen_config.vocab_size,
    )
    terms = activation_terms(
        qwen_config,
        rows=rows,
        seq_len=max_length,
        tensor=mesh["tensor"],
        compute_bytes=cb,
        remat=remat,
        chunk=chunk,
        fsdp=mesh["fsdp"],
        frozen_head=lora is not None,
        expert=mesh["expert"],
    )
    if lora is not None:
        terms.update(
            lora_activation_terms(
                blocks,
                mesh,
                lora,
                tokens=rows * max_length,
                layers=qwen_config.num_hidden_layers,
                compute_bytes=cb,
                remat=remat,
                quantization=quantization,
            )
        )
    per_device["activations"] = sum(terms.values())
    per_device["total"] = sum(per_device.values())
    return {
        "model": _model_summary(qwen_config, blocks),
        "mesh": {**mesh, "devices": math.prod(mesh.values())},
        "batch": {
            "batch_size": batch_size,
            "grad_accum_steps": grad_accum_steps,
            "micro_batch": micro,
            "rows_per_device": rows,
            "max_length": max_length,
        },
        "settings": {
            "param_dtype": _dtype_name(param_dtype),
            "compute_dtype": _dtype_name(compute_dtype),
            "remat": remat,
            "logprob_chunk_size": chunk,
            "logprob_chunk_mib": logprob_chunk_mib,
            "reference": reference,
            "lora": (
                describe_lora(lora, quantization, _dtype_name(base_dtype or compute_dtype))
                if lora is not None
                else None
            ),
        },
        "per_device": per_device,
        "activation_terms": terms,
        "warnings": warnings,
    }


def _check_plan_args(
    mesh_shape: tuple[int, int, int],
    batch_size: int,
    grad_accum_steps: int,
    remat: str,
    reference: str,
) -> dict[str, int]:
    """The mesh as {data, fsdp, tensor, expert} sizes, after checking `memory_plan`'s arguments
    (a 3-tuple mesh_shape has expert = 1)."""
    if reference not in REFERENCE_MODES:
        raise ValueError(f"reference={reference!r}; valid: {', '.join(REFERENCE_MODES)}")
    if remat not in ("none", "full", "dots"):
        raise ValueError(f"remat={remat!r}; valid: none, full, dots")
    sizes = tuple(int(x) for x in mesh_shape)
    sizes += (1,) * (len(MESH_AXES) - len(sizes))
    if min(sizes) < 1:
        raise ValueError(f"mesh_shape {mesh_shape}: sizes must be >= 1 (resolve -1 first)")
    if batch_size % grad_accum_steps:
        raise ValueError(f"batch_size {batch_size} not divisible by grad_accum {grad_accum_steps}")
    return dict(zip(MESH_AXES, sizes, strict=True))


def _state_bytes(
    blocks: dict[str, dict[str, Any]],
    *,
    weight_ways: int,
    param_bytes: int,
    reference_bytes: int,
    grad_accum_steps: int,
) -> tuple[dict[str, float], list[str]]:
    """Per-device bytes of params, gradients, optimizer and reference, and a warning for the
    large parameters a dimension that does not divide leaves (partly) whole."""
    local_params = sum(b["local_elements"] for b in blocks.values())
    unsplit = [
        f"{path} {b['shape']}"
        for path, b in blocks.items()
        if math.prod(b["shape"]) > 1 << 20
        and b["local_elements"] * weight_ways > 1.5 * math.prod(b["shape"])
    ]
    warnings = []
    if unsplit:
        warnings.append(
            "large parameters not split over fsdp x tensor (a dimension does not divide): "
            + ", ".join(unsplit)
        )
    fp32_accumulator = local_params * 4 if grad_accum_steps > 1 else 0
    per_device = {
        "params": local_params * param_bytes,
        "gradients": local_params * param_bytes + fp32_accumulator,
        "optimizer": 2 * local_params * param_bytes,
        "reference": local_params * reference_bytes,
    }
    return per_device, warnings


def _rows_per_device(micro_batch: int, batch_devices: int, warnings: list[str]) -> float:
    """Chosen + rejected rows of one micro-batch on one device; appends a warning (and rounds
    up) when the micro-batch does not split evenly over the data x fsdp devices."""
    rows = 2 * micro_batch / batch_devices
    if (2 * micro_batch) % batch_devices or micro_batch % batch_devices:
        warnings.append(
            f"the micro-batch of {micro_batch} pairs does not split evenly over data x fsdp x "
            f"expert = {batch_devices} devices (shard_batch needs batch_size / grad_accum_steps "
            "to be a multiple of it)"
        )
        rows = math.ceil(2 * micro_batch / batch_devices)
    return rows


def _model_summary(cfg: QwenConfig, blocks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "model_type": cfg.model_type,
        "num_params": sum(math.prod(b["shape"]) for b in blocks.values()),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
    }


def _dtype_name(dtype: Any) -> str:
    return dtype if isinstance(dtype, str) else str(np.dtype(dtype))


def plan_from_config(flux_config: Any, num_devices: int | None = None) -> dict[str, Any]:
    """`memory_plan` for a FluxConfig: its model_path's architecture, mesh, batch and dtypes.

    `num_devices` defaults to this machine's device count (all processes); pass the target's
    count to plan a bigger machine from a laptop. model_path may be a local HF directory,
    "builtin:NAME" or a released model's hub id (planned from presets, without a download).
    """
    cfg = resolve_architecture(flux_config.model_path)
    n = jax.device_count() if num_devices is None else int(num_devices)
    m = flux_config.mesh
    mesh_shape = resolve_mesh_shape(m.data, m.fsdp, m.tensor, n, m.expert)
    check_expert_mesh(cfg, mesh_shape[3])
    algo = flux_config.algorithm
    if algo.reference_free:
        reference = "none"
    elif algo.precompute_ref_logps:
        reference = "precomputed"
    else:
        reference = "model"
    plan = memory_plan(
        cfg,
        mesh_shape=mesh_shape,
        batch_size=flux_config.batch_size,
        grad_accum_steps=flux_config.grad_accum_steps,
        max_length=flux_config.data.max_length,
        param_dtype=flux_config.model.param_dtype,
        compute_dtype=flux_config.model.compute_dtype,
        remat=flux_config.model.remat,
        logprob_chunk_size=flux_config.model.logprob_chunk_size or None,
        logprob_chunk_mib=flux_config.model.logprob_chunk_mib,
        reference=reference,
        lora=LoraSettings.from_config(flux_config.model.lora),
        base_dtype=flux_config.model.lora.base_dtype or flux_config.model.compute_dtype,
        base_quantization=BaseQuantization.from_config(flux_config.model.lora),
    )
    plan["model"]["model_path"] = flux_config.model_path
    return plan
