"""flux_jax: DPO fine-tuning of Qwen models in JAX/Flax NNX, with Hugging Face import and export.

from flux_jax import FluxConfig, FluxTrainer
trainer = FluxTrainer(FluxConfig.from_yaml("dpo-config.yaml"))
result = trainer.fit(prompts="preferences.jsonl", data_format="preferences")
"""

from typing import Any

from flux_jax.config import ConfigError, FluxConfig
from flux_jax.dpo import dpo_loss
from flux_jax.hf_io import CheckpointError, load_pretrained, save_pretrained
from flux_jax.models.qwen import QwenConfig, QwenForCausalLM, build_model

_TRAINER_NAMES = ("FluxTrainer", "FitResult", "StepResult")


def __getattr__(name: str) -> Any:
    # The trainer pulls in grain, orbax and the data stack; load it on first use only.
    if name in _TRAINER_NAMES:
        from flux_jax import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'flux_jax' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "FitResult",
    "FluxConfig",
    "FluxTrainer",
    "QwenConfig",
    "QwenForCausalLM",
    "StepResult",
    "build_model",
    "dpo_loss",
    "load_pretrained",
    "save_pretrained",
]
