"""DPO on the built-in tiny Qwen3 and the bundled demo preference pairs: a smoke run on a laptop.

Command:
  flux-jax train --config configs/tiny_demo.py
  # any key can be overridden: --config.num_steps=50 --config.algorithm.beta=0.2

Data: the small preference set bundled with flux_jax (flux_jax/assets), used when no data file is
given. Model: "builtin:tiny-qwen3", a tiny randomly initialised Qwen3 and tokenizer built on the
fly, so nothing is downloaded.

Hardware: any CPU; meant for 2 cores. Everything is float32, one device, no remat: the model is
  a few MB, so memory is not a concern.

Expect: about a minute on 2 CPU cores, most of it compilation: 200 optimiser steps of 8 pairs,
  a metrics line every 10 steps, eval every 50 steps, a checkpoint every 100 in
  ./outputs/tiny_demo. The loss starts at ln 2 = 0.693 (policy == reference, every margin 0) and
  falls as the tiny model memorises the demo pairs; reward_margin rises from 0. The learning rate
  is far above the real-model configs because a random tiny model has nothing to preserve.
"""

from flux_jax.config import FluxConfig
from flux_jax.demo import demo_config


def get_config() -> FluxConfig:
    """Tiny built-in model on the demo pairs: 200 steps of 8 pairs at lr 1e-3, float32, CPU.

    The embedded default (`flux-jax train` with no --config) runs exactly this config.
    """
    return demo_config()
