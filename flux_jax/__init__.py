"""flux_jax: DPO fine-tuning of Qwen models in JAX/Flax NNX, with Hugging Face import and export."""

from flux_jax.hf_io import CheckpointError, load_pretrained, save_pretrained
from flux_jax.models.qwen import QwenConfig, QwenForCausalLM, build_model

__all__ = [
    "CheckpointError",
    "QwenConfig",
    "QwenForCausalLM",
    "build_model",
    "load_pretrained",
    "save_pretrained",
]
