"""LoRA adapters <-> PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

`save_peft_adapter` writes what `peft.PeftModel.from_pretrained(base, dir)` loads onto the HF
model; `load_peft_adapter` reads such a directory (ours, or one PEFT wrote after an SFT run) back
into flux_jax's adapter tree, for `model.lora.init_from`.

The two layouts, per layer i of a projection W (HF nn.Linear weight [out, in], ours [*in, *out]):

  PEFT  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
        base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]
        y = x W^T + scale * (x A^T) B^T
  ours  adapters["layers"]["self_attn"]["q_proj"]["lora_a"][i]   [*in, r]    = A^T
        adapters["layers"]["self_attn"]["q_proj"]["lora_b"][i]   [r, *out]   = B^T
        y = x @ W + scale * (x @ a) @ b

with our head-split axes flattened in HF's order (q/k/v out (N, H) -> N*H; o_proj in (N, H) ->
N*H, head-major, as models/qwen/params.py maps the kernels). `scale` is alpha / r, or
alpha / sqrt(r) with `use_rslora`, in both. On a Qwen3-MoE base the `mlp` adapters are stacked over
the dense layers only, so their stacked index maps onto those layers' HF indices.

PEFT features that change the function beyond this (DoRA, per-module rank/alpha patterns, LoRA
biases, modules_to_save, a subset of layers, Conv1D fan_in_fan_out) are refused by name when
reading, rather than loaded as something else.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from flux_jax.lora import TARGETS, LoraSettings, adapter_shapes
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.peft_config import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PeftAdapterError,
    adapter_config,
    check_settings_match,
    read_adapter_config,
    settings_from_peft_config,
)
from flux_jax.sharding import to_host
from flux_jax.tensor_inventory import inventory_problems

PREFIX = "base_model.model.model.layers."
_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}

# ----------------------------------------------------------------------------------------------
# Shapes and layer indices


def projection_shapes(cfg: QwenConfig, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in, out) axes of one layer of projection `name`'s kernel, as token_matmul splits it."""
    D, N, K, H, F = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    return {
        "q_proj": ((D,), (N, H)),
        "k_proj": ((D,), (K, H)),
        "v_proj": ((D,), (K, H)),
        "o_proj": ((N, H), (D,)),
        "gate_proj": ((D,), (F,)),
        "up_proj": ((D,), (F,)),
        "down_proj": ((F,), (D,)),
    }[name]


def hf_layers(cfg: QwenConfig, group: str) -> list[int]:
    """HF layer index of each stacked index of `group`: every layer for attention; for the MLP
    the dense layers (a Qwen3-MoE model stacks its dense MLPs apart from its experts)."""
    if group == "mlp":
        sparse = getattr(cfg, "sparse_layers", (False,) * cfg.num_hidden_layers)
        return [i for i, is_sparse in enumerate(sparse) if not is_sparse]
    return list(range(cfg.num_hidden_layers))


def peft_name(layer: int, name: str, which: str) -> str:
    """PEFT's tensor name of `which` ("lora_a" / "lora_b") of projection `name` in HF layer i."""
    group = TARGETS[name][0]
    letter = "A" if which == "lora_a" else "B"
    return f"{PREFIX}{layer}.{group}.{name}.lora_{letter}.weight"


# ----------------------------------------------------------------------------------------------
# Writing


def peft_tensors(
    adapters: Mapping[str, Any], base_cfg: QwenConfig, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """Every adapter matrix as PEFT's tensor name -> [r, in] (A) or [out, r] (B), on the host."""
    tensors: dict[str, np.ndarray] = {}
    for group, projections in adapters["layers"].items():
        layers = hf_layers(base_cfg, group)
        for name, pair in projections.items():
            a_LxIxR = to_host(pair["lora_a"])
            b_LxRxO = to_host(pair["lora_b"])
            rank = a_LxIxR.shape[-1]
            if len(layers) != a_LxIxR.shape[0]:
                raise ValueError(
                    f"adapters layers/{group}/{name}: {a_LxIxR.shape[0]} stacked layers, the base "
                    f"config has {len(layers)} {group} layers"
                )
            a_flat = a_LxIxR.reshape(a_LxIxR.shape[0], -1, rank)
            b_flat = b_LxRxO.reshape(b_LxRxO.shape[0], rank, -1)
            for j, layer in enumerate(layers):
                tensors[peft_name(layer, name, "lora_a")] = np.ascontiguousarray(
                    a_flat[j].T.astype(dtype)
                )
                tensors[peft_name(layer, name, "lora_b")] = np.ascontiguousarray(
                    b_flat[j].T.astype(dtype)
                )
    return tensors


def save_peft_adapter(
    out_dir: str | os.PathLike,
    adapters: Mapping[str, Any],
    settings: LoraSettings,
    base_cfg: QwenConfig,
    base_model_name_or_path: str | None = None,
    *,
    dtype: str = "float32",
) -> str:
    """Writes `adapters` as a PEFT LoRA adapter directory that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the HF base model.

    `dtype`: float32 (the trained fp32 master weights, exactly), bfloat16 or float16.
    On a multi-host run every process must call this (arrays are gathered); process 0 writes.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    tensors = peft_tensors(adapters, base_cfg, _DTYPES[dtype])
    out_dir = os.fspath(out_dir)
    if jax.process_index() != 0:
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), {"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(settings, base_model_name_or_path), f, indent=2)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Reading


def load_peft_adapter(
    adapter_dir: str | os.PathLike,
    base_cfg: QwenConfig,
    expected: LoraSettings | None = None,
) -> tuple[dict[str, Any], LoraSettings]:
    """A PEFT LoRA adapter directory as (adapters, settings): the adapter tree in flux_jax's
    layout (fp32 numpy, [L, *in, r] / [L, r, *out]) and the settings its config gives.

    `expected`: the run's model.lora settings; rank, alpha, rsLoRA and the targets must match.
    Every tensor must be one this model has, with the shape `base_cfg` gives it, and every
    (layer, target) pair must be present: anything else is an error naming the file and tensor.
    """
    config, config_path = read_adapter_config(adapter_dir)
    settings = settings_from_peft_config(config, config_path)
    if expected is not None:
        check_settings_match(settings, expected, config_path)
    weights_path = os.path.join(os.fspath(adapter_dir), WEIGHTS_FILE)
    if not os.path.exists(weights_path):
        other = [n for n in os.listdir(os.fspath(adapter_dir)) if n.startswith("adapter_model")]
        hint = (
            f" (found {', '.join(other)}: PyTorch .bin adapters are not read; re-save with "
            "save_pretrained(safe_serialization=True))"
            if other
            else ""
        )
        raise PeftAdapterError(f"{weights_path}: missing{hint}")
    tensors = _read_tensors(weights_path)
    return _adapters_from_tensors(tensors, base_cfg, settings, weights_path), settings


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own errors name neither the file nor the cause
        from flux_jax.safetensors_io import describe_safetensors_damage

        raise PeftAdapterError(
            f"{path}: unreadable safetensors file: {describe_safetensors_damage(path, e)}"
        ) from e


def _adapters_from_tensors(
    tensors: dict[str, np.ndarray], cfg: QwenConfig, settings: LoraSettings, path: str
) -> dict[str, Any]:
    rank = settings.rank
    expected: dict[str, tuple[int, int]] = {}  # PEFT's name -> its [out, in] shape
    for name in settings.target_modules:
        in_shape, out_shape = projection_shapes(cfg, name)
        for layer in hf_layers(cfg, TARGETS[name][0]):
            expected[peft_name(layer, name, "lora_a")] = (rank, math.prod(in_shape))
            expected[peft_name(layer, name, "lora_b")] = (math.prod(out_shape), rank)
    problems = inventory_problems({k: v.shape for k, v in tensors.items()}, expected)
    if problems:
        raise PeftAdapterError(
            f"{path} does not fit this base model ({cfg.model_type}, {cfg.num_hidden_layers} "
            f"layers, hidden {cfg.hidden_size}) with rank {rank} and target_modules "
            f"{list(settings.target_modules)}:\n  " + "\n  ".join(problems)
        )
    adapters: dict[str, Any] = {"layers": {}}
    for name in settings.target_modules:
        group = TARGETS[name][0]
        in_shape, out_shape = projection_shapes(cfg, name)
        layers = hf_layers(cfg, group)
        a = np.stack([tensors[peft_name(i, name, "lora_a")].T for i in layers])
        b = np.stack([tensors[peft_name(i, name, "lora_b")].T for i in layers])
        adapters["layers"].setdefault(group, {})[name] = {
            "lora_a": a.astype(np.float32).reshape(len(layers), *in_shape, rank),
            "lora_b": b.astype(np.float32).reshape(len(layers), rank, *out_shape),
        }
    return adapters


def place_adapters(
    adapters: Mapping[str, Any], base_params: Mapping[str, Any], settings: LoraSettings
) -> dict[str, Any]:
    """Host adapters (as `load_peft_adapter` returns them) placed as `lora.init_adapters` places
    fresh ones: sharded like their kernels over the base's mesh, fp32. Each process copies only
    the blocks its own devices hold."""
    shapes = adapter_shapes(base_params, settings)

    def place(x: np.ndarray, shape: jax.ShapeDtypeStruct) -> jax.Array:
        if tuple(x.shape) != tuple(shape.shape):
            raise ValueError(f"adapter shape {x.shape}, the base needs {shape.shape}")
        if shape.sharding is None:
            return jax.numpy.asarray(x, shape.dtype)
        host = np.asarray(x, shape.dtype)
        return jax.make_array_from_callback(host.shape, shape.sharding, lambda i: host[i])

    return jax.tree.map(place, dict(adapters), shapes)


def load_peft_adapter_onto(
    adapter_dir: str | os.PathLike,
    base_params: Mapping[str, Any],
    base_cfg: QwenConfig,
    settings: LoraSettings,
) -> dict[str, Any]:
    """`model.lora.init_from`: a PEFT adapter directory's adapters, checked against the run's
    LoRA `settings` and placed on the base's mesh like fresh adapters."""
    adapters, _ = load_peft_adapter(adapter_dir, base_cfg, settings)
    return place_adapters(adapters, base_params, settings)
