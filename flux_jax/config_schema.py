"""The FluxConfig schema: every key of a flux_jax run, its default, its meaning, its choices.

Data only; flux_jax/config.py loads, checks and validates configs against it. The order here is
the order `to_dict`/`to_yaml` write.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Key:
    """One leaf of the schema: its default (whose type is the key's type), meaning, and enum."""

    default: Any
    doc: str
    choices: tuple[str, ...] = ()


ALGORITHMS_IMPLEMENTED = ("dpo",)

# The whole schema, in the order `to_dict`/`to_yaml` write it. Each doc says what the key means
# and its unit; the range checks live in `_range_errors`.
SCHEMA: dict[str, Any] = {
    # HF model dir or hub id (config.json + *.safetensors), or "builtin:tiny-qwen3".
    "model_path": Key("builtin:tiny-qwen3", "model to train; builtin = tiny random Qwen3"),
    "tokenizer_path": Key("", "tokenizer dir or hub id; '' = same as model_path"),
    "output_dir": Key("./outputs/dpo", "directory for checkpoints, logs and the saved config"),
    "seed": Key(0, "PRNG seed for parameter init (builtin model), data order and sampling"),
    "num_steps": Key(1000, "number of optimiser steps to train for"),
    "batch_size": Key(8, "preference pairs per optimiser step, global over devices/hosts"),
    "grad_accum_steps": Key(1, "micro-batches per optimiser step; must divide batch_size"),
    "learning_rate": Key(5e-7, "peak AdamW learning rate (after warmup)"),
    "sglang": {
        # Accepted so the tutorial's YAML loads; DPO trains on a fixed dataset, no rollouts.
        "base_url": Key("", "SGLang rollout server URL; unused by DPO"),
    },
    "algorithm": {
        "name": Key("dpo", "training algorithm; only 'dpo' is implemented"),
        "beta": Key(0.1, "inverse temperature on the policy/reference log-ratios (unitless)"),
        "reference_free": Key(False, "true = no reference model (its log-probs taken as 0)"),
        "label_smoothing": Key(0.0, "assumed label-flip probability (cDPO/robust), [0, 0.5)"),
        "loss_type": Key(
            "sigmoid",
            "sigmoid (DPO), ipo, hinge (SLiC) or robust (rDPO)",
            ("sigmoid", "ipo", "hinge", "robust"),
        ),
        "sft_coef": Key(0.0, "weight of the NLL loss on chosen responses added to the loss"),
        "kl_coef": Key(0.0, "weight of a KL(policy || reference) penalty added to the loss"),
        "precompute_ref_logps": Key(False, "true = reference log-probs computed once, up front"),
    },
    "adaptive_async": {
        "enabled": Key(False, "async rollout/train overlap for GRPO/PPO; must be false for DPO"),
    },
    "checkpoint": {
        "save_steps": Key(200, "save a checkpoint every this many optimiser steps"),
        "max_to_keep": Key(3, "number of most recent checkpoints kept on disk"),
        "resume": Key(True, "true = resume from the latest checkpoint in output_dir if any"),
        "async_save": Key(True, "true = write checkpoints in the background while training"),
    },
    "data": {
        "train_path": Key("", "training pairs: .jsonl, .jsonl.gz, dir or glob; '' = bundled demo"),
        "eval_path": Key("", "held-out pairs for eval and best-checkpoint choice; '' = none"),
        "format": Key(
            "preferences",
            "preferences ({prompt, chosen, rejected} strings), conversational (chat messages) "
            "or implicit_prompt (chosen/rejected only; the shared start is the prompt)",
            ("preferences", "conversational", "implicit_prompt"),
        ),
        "max_length": Key(1024, "maximum tokens per sequence (prompt + response)"),
        "max_prompt_length": Key(512, "maximum prompt tokens; must be < max_length"),
        "drop_truncated": Key(False, "true = drop pairs that need truncation, false = truncate"),
        "on_bad_record": Key("error", "bad JSONL record: error or skip", ("error", "skip")),
        "bucket_lengths": Key((), "padded lengths (tokens), last >= max_length; () = powers of 2"),
        "num_threads": Key(2, "data-loading threads per host"),
        "prefetch": Key(4, "batches prefetched ahead of the training step"),
        "shuffle_seed": Key(-1, "seed of the data shuffle; -1 = use seed"),
    },
    "model": {
        "param_dtype": Key("float32", "trained weights and Adam state", ("float32", "bfloat16")),
        "compute_dtype": Key("float32", "activations and matmuls", ("float32", "bfloat16")),
        "remat": Key(
            "none", "per-layer remat: none, full, dots (keep matmuls)", ("none", "full", "dots")
        ),
        "attention": Key(
            "xla",
            "attention kernel: xla, cudnn (NVIDIA flash), splash (Pallas TPU), auto (per backend)",
            ("xla", "cudnn", "splash", "auto"),
        ),
        "logprob_chunk_size": Key(512, "positions per chunk of LM-head logits; 0 = unchunked"),
        "logprob_chunk_mib": Key(
            256, "cap on one chunk's fp32 logits per device (MiB): smaller chunks; 0 = no cap"
        ),
        "prefix_sharing": Key(False, "true = run the shared prompt once for chosen and rejected"),
        "packing": Key(False, "true = pack several pairs into one sequence row"),
    },
    "optimizer": {
        "b1": Key(0.9, "AdamW first-moment decay"),
        "b2": Key(0.999, "AdamW second-moment decay"),
        "eps": Key(1e-8, "AdamW denominator epsilon"),
        "weight_decay": Key(0.0, "decoupled AdamW weight decay (per step, times the LR)"),
        "max_grad_norm": Key(1.0, "clip the global gradient L2 norm to this; 0 = off"),
        "schedule": Key("constant", "LR after warmup", ("constant", "cosine", "linear")),
        "warmup_steps": Key(0, "optimiser steps of linear warmup from 0 to learning_rate"),
        "min_lr_ratio": Key(0.0, "final LR as a fraction of learning_rate (cosine, linear)"),
    },
    "eval": {
        "every_steps": Key(0, "evaluate every this many optimiser steps; 0 = only at the end"),
        "batch_size": Key(8, "preference pairs per eval batch, global"),
        "max_batches": Key(0, "eval batches per evaluation; 0 = the whole eval set"),
    },
    "logging": {
        "every_steps": Key(1, "write metrics every this many optimiser steps"),
        "tensorboard": Key(True, "true = write TensorBoard event files under output_dir"),
        "progress_bar": Key(True, "true = show a progress bar on the terminal"),
    },
    # Devices per mesh axis; -1 = the remaining devices. The product must equal the device
    # count, which is only known (and checked) when the mesh is built.
    "mesh": {
        "data": Key(1, "devices on the data-parallel axis"),
        "fsdp": Key(-1, "devices on the FSDP (sharded weights and optimiser state) axis"),
        "tensor": Key(1, "devices on the tensor-parallel axis"),
    },
    "generation": {
        "max_new_tokens": Key(128, "maximum tokens generated per prompt"),
        "temperature": Key(0.0, "sampling temperature; 0 = greedy"),
        "top_k": Key(0, "sample from the k most likely tokens; 0 = no top-k filter"),
        "top_p": Key(1.0, "nucleus sampling probability mass, (0, 1]; 1 = off"),
        "use_chat_template": Key(True, "true = wrap prompts in the tokenizer's chat template"),
    },
}

SECTIONS = tuple(k for k, v in SCHEMA.items() if isinstance(v, dict))
LEAVES: dict[str, Key] = {}
for _name, _entry in SCHEMA.items():
    if isinstance(_entry, dict):
        LEAVES.update({f"{_name}.{k}": v for k, v in _entry.items()})
    else:
        LEAVES[_name] = _entry
