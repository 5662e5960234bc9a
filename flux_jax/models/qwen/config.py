"""QwenConfig: the shape of a dense Qwen2 / Qwen2.5 / Qwen3 decoder, and its HF config.json.

Qwen2 and Qwen2.5 put biases on the q/k/v projections and have no q/k norm; dense Qwen3 drops the
biases and adds an RMSNorm over each head of q and k. Qwen3-MoE ("qwen3_moe") is Qwen3 attention
with a routed mixture of SwiGLU experts in place of the MLP in its sparse layers (`sparse_layers`).
Everything else is shared. Settings we do not implement (sliding-window attention switched on, rope
scaling, Qwen2-MoE's shared expert) are refused by name instead of being silently ignored, because
a model that loads but computes something else is the worst outcome.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe")


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
    # Mixture of experts (model_type "qwen3_moe"; HF's Qwen3MoeConfig names). num_experts 0 = dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse iff (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001

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
        if self.model_type == "qwen3_moe":
            self._check_moe()
        elif self.num_experts:
            raise UnsupportedConfigError(
                f"num_experts={self.num_experts} with model_type {self.model_type!r}: "
                "mixture-of-experts layers are only implemented for qwen3_moe"
            )

    def _check_moe(self) -> None:
        problems = []
        if self.num_experts < 1:
            problems.append(f"num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.num_experts_per_tok <= max(self.num_experts, 1):
            problems.append(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts]"
            )
        if self.moe_intermediate_size < 1:
            problems.append(f"moe_intermediate_size={self.moe_intermediate_size} must be >= 1")
        if self.decoder_sparse_step < 1:
            problems.append(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            problems.append(f"mlp_only_layers {bad} are not in [0, {self.num_hidden_layers})")
        if problems:
            raise UnsupportedConfigError("qwen3_moe: " + "; ".join(problems))

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type in ("qwen3", "qwen3_moe")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer: whether its MLP is the routed mixture of experts (transformers' rule)."""
        return tuple(
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_hidden_layers)
        )

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
        sparse = sum(self.sparse_layers)
        dense_mlp = 3 * d * f
        moe = self.num_experts * (3 * d * self.moe_intermediate_size + d)  # experts + router
        layers = self.num_hidden_layers * (attn + 2 * d)
        layers += (self.num_hidden_layers - sparse) * dense_mlp + sparse * moe
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return layers + embed + d

    def num_active_params(self) -> int:
        """Parameters a token passes through: only its top-k experts (and the router) count.

        The embedding is a lookup, but counted as num_params counts it, so that a dense model's
        active count equals its num_params.
        """
        sparse = sum(self.sparse_layers)
        idle = self.num_experts - self.num_experts_per_tok
        return self.num_params() - sparse * idle * 3 * self.hidden_size * self.moe_intermediate_size

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
                f"model_type {model_type!r} is not supported (Qwen2-MoE and multimodal Qwen "
                f"variants are not implemented); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        _refuse_unsupported(hf)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        missing = [k for k in (*required, "num_attention_heads") if hf.get(k) is None]
        if missing:
            raise UnsupportedConfigError(
                f"model_type {model_type!r}: missing required keys {', '.join(missing)}"
            )
        heads = hf["num_attention_heads"]
        rope_theta = effective_rope_parameters(hf).get("rope_theta", hf.get("rope_theta", 10_000.0))
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        moe = _moe_fields(hf) if model_type == "qwen3_moe" else {}
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
            **moe,
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
        arch = {
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM",
        }[self.model_type]
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
        if self.model_type in ("qwen3", "qwen3_moe"):
            hf["attention_bias"] = False
        if self.model_type == "qwen3_moe":
            hf.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=False,
            )
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
    model_type = hf.get("model_type")
    if model_type in ("qwen3", "qwen3_moe") and hf.get("attention_bias"):
        problems.append(f"attention_bias=True for {model_type} is not implemented")
    if model_type != "qwen3_moe" and (hf.get("num_experts") or hf.get("num_local_experts")):
        problems.append(
            f"mixture-of-experts layers (num_experts) with model_type {model_type!r} are not "
            "implemented (only qwen3_moe)"
        )
    if model_type == "qwen3_moe" and hf.get("shared_expert_intermediate_size"):
        problems.append("a shared expert (shared_expert_intermediate_size) is not implemented")
    if problems:
        raise UnsupportedConfigError("unsupported config: " + "; ".join(problems))


def _moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """QwenConfig's MoE fields from a qwen3_moe config.json, with transformers' defaults.

    transformers 5 writes the expert count as `num_local_experts` (an alias); released
    checkpoints write `num_experts`. `output_router_logits` is a forward option, ignored here.
    """
    return {
        "num_experts": int(hf.get("num_experts") or hf.get("num_local_experts") or 128),
        "num_experts_per_tok": int(hf.get("num_experts_per_tok", 8)),
        "moe_intermediate_size": int(hf.get("moe_intermediate_size", 768)),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "decoder_sparse_step": int(hf.get("decoder_sparse_step", 1)),
        "mlp_only_layers": tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
        "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
    }


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
