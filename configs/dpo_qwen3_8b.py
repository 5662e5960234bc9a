"""DPO on Qwen3-8B: the flux DPO tutorial's run (`dpo-config.yaml`) sized for real hardware.

Command:
  flux-jax train --config configs/dpo_qwen3_8b.py
  # any key can be overridden: --config.algorithm.beta=0.2 --config.num_steps=500

Data: preference JSONL, one {"prompt", "chosen", "rejected"} record per line (the tutorial's
`preferences.jsonl`). Model: `Qwen/Qwen3-8B` (hub id or a local HF directory with config.json and
safetensors).

Hardware: a TPU v5p-8 (4 chips x 95 GB) or 8x H100 80 GB; anything with >= 4 chips of 80-95 GB.
  Trained state: 8.2B params x (4 B fp32 weight + 4 B grad + 8 B Adam moments) ~ 130 GB, plus the
  frozen bf16 reference model 8.2B x 2 B ~ 16 GB: ~146 GB before activations, so it must be
  sharded: FSDP over all devices puts ~37 GB/chip on 4 chips, ~18 GB/chip on 8. Weights stay fp32
  because lr 5e-7 is far below bf16's resolution (8 mantissa bits: an update of 5e-7 to a weight
  of ~1e-2 would round away); matmuls run in bf16. Full remat keeps activations to one layer
  input per layer.

Expect: 1000 optimiser steps of 8 preference pairs (8000 pairs; the number of epochs depends on
  the dataset), a checkpoint every 200 steps in ./outputs/dpo (3 kept). Roughly 30-60 min on a
  v5p-8 or 15-30 min on 8x H100 at the full 1024-token length, plus a few minutes to load and
  compile (an estimate from ~10 x 8.2e9 x 16k FLOPs/step at 30-40% MFU, not a measurement).
  The loss starts at ln 2 = 0.693 (policy == reference, every margin 0) and falls; reward_margin
  starts at 0 and rises, chosen_reward pulling above rejected_reward.
"""

from flux_jax.config import FluxConfig


def get_config() -> FluxConfig:
    """Qwen3-8B DPO: lr 5e-7, beta 0.1, batch 8, 1000 steps, save every 200, bf16/FSDP/remat.

    Everything but the model and how it runs is the FluxConfig default, which is this tutorial
    run: 1000 steps of 8 pairs at lr 5e-7, beta 0.1, sigmoid loss, a checkpoint every 200 steps
    in ./outputs/dpo, 1024 / 512 tokens, fp32 weights, FSDP over every device.
    """
    config = FluxConfig.default()
    config.model_path = "Qwen/Qwen3-8B"
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.model.attention = "auto"
    return config
