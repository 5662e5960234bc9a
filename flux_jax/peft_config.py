"""adapter_config.json: what PEFT's LoRA config says, in LoraSettings terms, both ways.

`adapter_config` writes the file PEFT reads for our settings; `read_adapter_config` and
`settings_from_peft_config` read one (ours, or PEFT's after an SFT run), refusing by name the PEFT
features that compute something else (DoRA, rank/alpha patterns, LoRA biases, modules_to_save, a
subset of layers, fan_in_fan_out); `check_settings_match` compares it with model.lora.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from flux_jax.lora import TARGETS, LoraSettings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"  # beside it (flux_jax.peft_io)

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
            target_modules=target_names(config["target_modules"], path),
            rslora=bool(config.get("use_rslora", False)),
        )
    except ValueError as e:
        if isinstance(e, PeftAdapterError):
            raise
        raise PeftAdapterError(f"{path}: {e}") from e


def target_names(target_modules: Any, path: str) -> tuple[str, ...]:
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
