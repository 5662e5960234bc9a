"""Dense Qwen2 / Qwen2.5 / Qwen3 decoders."""

from flux_jax.models.qwen.config import QwenConfig, UnsupportedConfigError
from flux_jax.models.qwen.model import QwenForCausalLM, build_model

__all__ = ["QwenConfig", "QwenForCausalLM", "UnsupportedConfigError", "build_model"]
