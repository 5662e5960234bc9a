"""DPO on Qwen3-0.6B: the tutorial's recipe on a model that fits one 16 GB accelerator.

Command:
  flux-jax train --config configs/dpo_qwen3_0p6b.py
  # any key can be overridden: --config.algorithm.beta=0.2 --config.num_steps=500

Data: preference JSONL, one {"prompt", "chosen", "rejected"} record per line. Model:
`Qwen/Qwen3-0.6B` (hub id or a local HF directory with config.json and safetensors).

Hardware: one chip with >= 16 GB: a TPU v5e chip, or one GPU such as an L4, A10G, A100 or H100.
  Trained state: 0.6B params x (4 B fp32 weight + 4 B grad + 8 B Adam moments) ~ 10 GB, plus the
  frozen bf16 reference 0.6B x 2 B ~ 1.2 GB: ~11 GB, leaving ~5 GB for activations and logits.
  The LM head is the tight spot: 152k-token vocabulary x 4 B = 0.6 MB of fp32 logits per token,
  so 4 micro-batches of 2 pairs (4 sequences) and 256-position log-prob chunks bound the logits
  buffer to ~0.6 GB; full remat keeps activations to one layer input per layer. Weights stay fp32
  because lr 5e-7 updates would round away in bf16.

Expect: 1000 optimiser steps of 8 preference pairs, a checkpoint every 200 steps in
  ./outputs/dpo_qwen3_0p6b (3 kept). Roughly 25 min on a v5e chip, under 10 min on one H100 at
  the full 1024-token length, plus a minute or two to load and compile (an estimate from
  ~10 x 0.6e9 x 16k FLOPs/step at ~35% MFU, not a measurement). The loss starts at
  ln 2 = 0.693 (policy == reference, every margin 0) and falls; reward_margin starts at 0 and
  rises.
"""

from flux_jax.config import FluxConfig


def get_config() -> FluxConfig:
    """Qwen3-0.6B DPO on one 16 GB chip: lr 5e-7, beta 0.1, batch 8 as 4 x 2, 1000 steps.

    The rest is the FluxConfig default (the tutorial run; see configs/dpo_qwen3_8b.py). The mesh
    default, FSDP over every device, is one device here; the same file runs sharded on more.
    """
    config = FluxConfig.default()
    config.model_path = "Qwen/Qwen3-0.6B"
    config.output_dir = "./outputs/dpo_qwen3_0p6b"
    config.grad_accum_steps = 4  # 2 pairs per micro-batch: bounds activation and logits memory
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.model.attention = "auto"
    config.model.logprob_chunk_size = 256
    return config
