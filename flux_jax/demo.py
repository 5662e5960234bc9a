"""The embedded default run: the tiny built-in Qwen3 on the bundled demo preference pairs.

`flux-jax train` with no --config (or `flux-jax demo`) runs this; configs/tiny_demo.py is the same
config as a file to copy and edit. Nothing is downloaded: the model and its tokenizer are built on
the fly and the pairs ship in flux_jax/assets.
"""

from __future__ import annotations

from flux_jax.config import FluxConfig


def demo_config() -> FluxConfig:
    """Tiny built-in model on the demo pairs: 200 steps of 8 pairs at lr 1e-3, float32, CPU.

    Only what differs from the FluxConfig default is set: the default model is already the
    built-in tiny Qwen3, with beta 0.1, batch 8, float32 and no remat. The learning rate is far
    above a real model's because a random tiny model has nothing to preserve; short sequences
    and frequent eval, logging and checkpoints make a run of a minute show its whole life.
    """
    config = FluxConfig.default()
    config.output_dir = "./outputs/tiny_demo"
    config.num_steps = 200
    config.learning_rate = 1e-3
    config.checkpoint.save_steps = 100
    config.checkpoint.max_to_keep = 2
    config.data.max_length = 128
    config.data.max_prompt_length = 64
    config.eval.every_steps = 50
    config.logging.every_steps = 10
    return config.validate()
