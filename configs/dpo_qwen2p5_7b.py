"""DPO on Qwen2.5-7B-Instruct: the tutorial's recipe on the previous Qwen generation.

Command:
  flux-jax train --config configs/dpo_qwen2p5_7b.py
  # any key can be overridden: --config.algorithm.beta=0.2 --config.num_steps=500

Data: preference JSONL, one {"prompt", "chosen", "rejected"} record per line. Model:
`Qwen/Qwen2.5-7B-Instruct` (hub id or a local HF directory with config.json and safetensors);
DPO starts from an instruction-tuned model, whose chat template formats the prompts.

Hardware: a TPU v5p-8 (4 chips x 95 GB) or 8x H100 80 GB; anything with >= 4 chips of 80-95 GB.
  Trained state: 7.6B params x (4 B fp32 weight + 4 B grad + 8 B Adam moments) ~ 122 GB, plus the
  frozen bf16 reference 7.6B x 2 B ~ 15 GB: ~137 GB before activations, so FSDP over all devices
  (~34 GB/chip on 4 chips, ~17 GB/chip on 8). Weights stay fp32 because lr 5e-7 updates would
  round away in bf16; matmuls run in bf16; full remat keeps one layer input per layer.

Expect: 1000 optimiser steps of 8 preference pairs, a checkpoint every 200 steps in
  ./outputs/dpo_qwen2p5_7b (3 kept). Roughly 30-60 min on a v5p-8 or 15-30 min on 8x H100 at the
  full 1024-token length, plus a few minutes to load and compile (an estimate from
  ~10 x 7.6e9 x 16k FLOPs/step at 30-40% MFU, not a measurement). The loss starts at
  ln 2 = 0.693 (policy == reference, every margin 0) and falls; reward_margin starts at 0 and
  rises.
"""

from flux_jax.config import FluxConfig


def get_config() -> FluxConfig:
    """Qwen2.5-7B-Instruct DPO: lr 5e-7, beta 0.1, batch 8, 1000 steps, bf16/FSDP/remat.

    The rest is the FluxConfig default (the tutorial run; see configs/dpo_qwen3_8b.py).
    """
    config = FluxConfig.default()
    config.model_path = "Qwen/Qwen2.5-7B-Instruct"
    config.output_dir = "./outputs/dpo_qwen2p5_7b"
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.model.attention = "auto"
    return config
