"""QwenConfig: the shape of a dense Qwen2 / Qwen2.5 / Qwen3 decoder, and its HF config.json.

Qwen2 and Qwen2.5 put biases on the q/k/v projections and have no q/k norm; dense Qwen3 drops the
biases and adds an RMSNorm over each head of q and k. Everything else is shared. Settings we do not
implement (sliding-window attention switched on, rope scaling, MoE) are refused by name instead of
being silently ignored, because a model that loads but computes something else is the worst outcome.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")


class UnsupportedConfigError(ValueError):
    """An HF config asks for something this implementation does not compute."""


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Shape and numerics of a Qwen decoder. Field names follow HF's config.json."""

    model_type: str  # "qwen2" (q/k/v biases) or "qwen3" (q/k RMSNorm)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32_768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # The dtype the checkpoint was saved in ("bfloat16" for released Qwen weights); export default.
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type {self.model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    def num_params(self) -> int:
        """Parameter count, with the LM head counted once if tied."""
        d, h, k, hd, f = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.intermediate_size,
        )
        attn = d * h * hd + 2 * d * k * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * k * hd
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + d

    # ----------------------------------------------------------------------------------------
    # HF config.json conversion

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | Any) -> QwenConfig:
        """Builds a QwenConfig from an HF config (a dict or a transformers PretrainedConfig).

        Reads both the transformers 4.x style (top-level `rope_theta`, `torch_dtype`) and the 5.x
        style (`rope_parameters`, `dtype`, `layer_types`).
        """
        if not isinstance(hf, dict):
            hf = hf.to_dict()
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type {model_type!r} is not supported (MoE and multimodal Qwen variants are "
                f"not implemented); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        _refuse_unsupported(hf)
        heads = hf["num_attention_heads"]
        rope_theta = effective_rope_parameters(hf).get("rope_theta", hf.get("rope_theta", 10_000.0))
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 32_768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            torch_dtype=str(dtype).replace("torch.", ""),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> QwenConfig:
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{config_path}: no config.json in the model directory")
        with open(config_path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}: invalid JSON: {e}") from e
        try:
            return cls.from_hf_config(hf)
        except UnsupportedConfigError as e:
            raise UnsupportedConfigError(f"{config_path}: {e}") from e

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json dict transformers 5.x writes for this architecture."""
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        hf: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "use_cache": True,
            "initializer_range": 0.02,
            "dtype": dtype or self.torch_dtype,
        }
        if self.model_type == "qwen3":
            hf["attention_bias"] = False
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, key) is not None:
                hf[key] = getattr(self, key)
        return hf


def _refuse_unsupported(hf: dict[str, Any]) -> None:
    """Raises naming each setting we would otherwise silently compute differently."""
    problems = []
    if hf.get("use_sliding_window"):
        problems.append(
            f"use_sliding_window=True (sliding_window={hf.get('sliding_window')}) "
            "is not implemented"
        )
    layer_types = hf.get("layer_types") or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other and not any("use_sliding_window" in p for p in problems):
        problems.append(f"layer_types {other} are not implemented (only full_attention)")
    problems += _rope_problems(hf)
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} is not implemented (only 'silu')")
    if hf.get("model_type") == "qwen3" and hf.get("attention_bias"):
        problems.append("attention_bias=True for qwen3 is not implemented")
    if hf.get("num_experts") or hf.get("num_local_experts"):
        problems.append("mixture-of-experts layers (num_experts) are not implemented")
    if problems:
        raise UnsupportedConfigError("unsupported config: " + "; ".join(problems))


def effective_rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameters transformers 5 computes with: `rope_scaling` (the 4.x key) when it is
    set, else `rope_parameters` (transformers' `convert_rope_params_to_dict` does the same)."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    return dict(rope) if isinstance(rope, dict) else {}


def _rope_problems(hf: dict[str, Any]) -> list[str]:
    """Why this config's rotary embedding is not the plain one we compute, if it is not."""
    params, scaling = hf.get("rope_parameters"), hf.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            return [f"{key}={value!r} is not a mapping"]
    if params and scaling and scaling != params:
        # transformers 5 replaces rope_parameters by rope_scaling (and then takes rope_theta from
        # the top level or its 10000 default), so the two keys describe different models.
        return [
            f"rope_scaling={scaling!r} beside rope_parameters={params!r}: transformers 5 computes "
            "with rope_scaling and ignores rope_parameters; remove rope_scaling (or set it to "
            "null) if rope_parameters is what the model was trained with"
        ]
    rope = effective_rope_parameters(hf)
    source = "rope_scaling" if scaling else "rope_parameters"
    if any(isinstance(v, dict) for v in rope.values()):
        return [f"{source} per layer type ({sorted(rope)}) is not implemented"]
    problems = []
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        problems.append(
            f"{source} rope_type {rope_type!r} (RoPE scaling) is not implemented (only 'default')"
        )
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        problems.append(f"partial_rotary_factor={partial} is not implemented (only 1.0)")
    return problems
