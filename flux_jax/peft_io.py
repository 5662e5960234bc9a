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
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from flux_jax.lora import TARGETS, LoraSettings, adapter_shapes
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.sharding import to_host

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers."
_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}

# adapter_config.json fields whose non-default values mean a function we do not compute.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none",),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}


class PeftAdapterError(ValueError):
    """A PEFT adapter directory that does not describe adapters for this model and config."""


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


def adapter_config(settings: LoraSettings, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json of these settings (PEFT fills every other field with defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "use_rslora": settings.rslora,
        "target_modules": sorted(settings.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


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


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """adapter_config.json as a dict, and its path; errors name the file."""
    path = os.path.join(os.fspath(adapter_dir), CONFIG_FILE)
    if not os.path.isdir(os.fspath(adapter_dir)):
        raise PeftAdapterError(
            f"{os.fspath(adapter_dir)}: not a directory (model.lora.init_from must be a PEFT "
            f"adapter directory holding {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    if not os.path.exists(path):
        raise PeftAdapterError(
            f"{path}: missing; a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(as written by PeftModel.save_pretrained or flux-jax export --adapter-only)"
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftAdapterError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise PeftAdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config, path


def settings_from_peft_config(config: Mapping[str, Any], path: str) -> LoraSettings:
    """The LoraSettings an adapter_config.json describes, refusing what we cannot compute."""
    if config.get("peft_type", "LORA") != "LORA":
        raise PeftAdapterError(
            f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be loaded"
        )
    for field, allowed in _UNSUPPORTED.items():
        if field in config and config[field] not in allowed:
            raise PeftAdapterError(
                f"{path}: {field} = {config[field]!r} is not supported (flux_jax's LoRA is plain "
                f"LoRA on the attention and MLP projections of every layer; it needs {field} = "
                f"{allowed[0]!r})"
            )
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        raise PeftAdapterError(f"{path}: missing field(s) {', '.join(missing)}")
    try:
        return LoraSettings(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=_target_names(config["target_modules"], path),
            rslora=bool(config.get("use_rslora", False)),
        )
    except ValueError as e:
        if isinstance(e, PeftAdapterError):
            raise
        raise PeftAdapterError(f"{path}: {e}") from e


def _target_names(target_modules: Any, path: str) -> tuple[str, ...]:
    """PEFT's target_modules (names matched as module-name suffixes, "all-linear", or one regex
    matched against full module names) as our projection names, in TARGETS order."""
    modules = {f"{group}.{name}": name for name, (group, _) in TARGETS.items()}
    if target_modules == "all-linear":  # PEFT: every nn.Linear but the output layer
        return tuple(TARGETS)
    if isinstance(target_modules, str):
        full = {f"model.layers.0.{module}": name for module, name in modules.items()}
        found = {name for key, name in full.items() if re.fullmatch(target_modules, key)}
        if not found:
            raise PeftAdapterError(
                f"{path}: target_modules regex {target_modules!r} matches none of the "
                f"projections ({', '.join(TARGETS)})"
            )
        return tuple(n for n in TARGETS if n in found)
    found, unknown = set(), []
    for entry in target_modules:
        hits = {n for m, n in modules.items() if m == entry or m.endswith("." + entry)}
        if not hits:
            unknown.append(entry)
        found |= hits
    if unknown:
        raise PeftAdapterError(
            f"{path}: target_modules {unknown} name no LoRA-capable projection of a Qwen model; "
            f"valid: {', '.join(TARGETS)}"
        )
    return tuple(n for n in TARGETS if n in found)


def check_settings_match(file_settings: LoraSettings, expected: LoraSettings, path: str) -> None:
    """Raises unless the adapter's rank, alpha, rsLoRA and targets equal the config's
    (dropout is a training choice, not part of the adapter, and may differ)."""
    pairs = [
        ("r", file_settings.rank, "rank", expected.rank),
        ("lora_alpha", file_settings.alpha, "alpha", expected.alpha),
        ("use_rslora", file_settings.rslora, "rslora", expected.rslora),
        (
            "target_modules",
            sorted(file_settings.target_modules),
            "target_modules",
            sorted(expected.target_modules),
        ),
    ]
    problems = [
        f"{field} = {got!r} but model.lora.{key} = {want!r}"
        for field, got, key, want in pairs
        if got != want
    ]
    if problems:
        raise PeftAdapterError(
            f"{path}: the adapter does not match the config: {'; '.join(problems)}. Set "
            "model.lora.{rank, alpha, rslora, target_modules} to the adapter's values, or start "
            "from fresh adapters (model.lora.init_from: '')"
        )


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
    expected: dict[str, tuple[str, int, str, tuple[int, int]]] = {}
    for name in settings.target_modules:
        group = TARGETS[name][0]
        in_shape, out_shape = projection_shapes(cfg, name)
        for j, layer in enumerate(hf_layers(cfg, group)):
            expected[peft_name(layer, name, "lora_a")] = (
                name,
                j,
                "lora_a",
                (rank, math.prod(in_shape)),
            )
            expected[peft_name(layer, name, "lora_b")] = (
                name,
                j,
                "lora_b",
                (math.prod(out_shape), rank),
            )
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (expected {expected[k][3]})"
        for k in sorted(set(tensors) & set(expected))
        if tuple(tensors[k].shape) != expected[k][3]
    ]
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} tensor(s) this model and target_modules "
            f"{list(settings.target_modules)} do not have: {_first(unknown)}"
        )
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_first(missing)}")
    if wrong:
        problems.append(f"shape mismatch: {_first(wrong)}")
    if problems:
        raise PeftAdapterError(
            f"{path} does not fit this base model ({cfg.model_type}, {cfg.num_hidden_layers} "
            f"layers, hidden {cfg.hidden_size}) with rank {rank}:\n  " + "\n  ".join(problems)
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


def _first(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")
