"""The FluxConfig schema: every key of a flux_jax run, its default, its meaning, its choices.

Data only; flux_jax/config.py loads, checks and validates configs against it. The order here is
the order `to_dict`/`to_yaml` write.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flux_jax.dpo import LOSS_TYPES  # the loss registry: a new loss type is one function there
from flux_jax.logprobs import DEFAULT_CHUNK_SIZE  # also the library default of the LM-head chunk


@dataclasses.dataclass(frozen=True)
class Key:
    """One leaf of the schema: its default (whose type is the key's type), meaning, and enum.
    `path`: a filesystem path, whose `~` and `$VAR`s are expanded when it is set."""

    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    path: bool = False


ALGORITHMS_IMPLEMENTED = ("dpo",)

# The whole schema, in the order `to_dict`/`to_yaml` write it. Each doc says what the key means
# and its unit; the range checks live in flux_jax/config_rules.py.
SCHEMA: dict[str, Any] = {
    # HF model dir or hub id (config.json + *.safetensors), or "builtin:tiny-qwen3".
    "model_path": Key(
        "builtin:tiny-qwen3", "model to train; builtin = tiny random Qwen3", path=True
    ),
    "tokenizer_path": Key("", "tokenizer dir or hub id; '' = same as model_path", path=True),
    "output_dir": Key(
        "./outputs/dpo", "directory for checkpoints, logs and the saved config", path=True
    ),
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
            f"the DPO-family loss: {', '.join(LOSS_TYPES)} (formulas: flux_jax.dpo)",
            LOSS_TYPES,
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
        "train_path": Key(
            "", "training pairs: .jsonl, .jsonl.gz, dir or glob; '' = bundled demo", path=True
        ),
        "eval_path": Key(
            "", "held-out pairs for eval and best-checkpoint choice; '' = none", path=True
        ),
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
        # = flux_jax.data.records.DEFAULT_MAX_RECORD_BYTES (16 MiB; see there for why).
        "max_record_bytes": Key(
            16 * 2**20, "longest JSONL line (bytes) read; a longer one is a bad record"
        ),
        "bucket_lengths": Key(
            (), "padded lengths (tokens), last >= max_length; () = the bucket_ratio ladder"
        ),
        "bucket_ratio": Key(
            1.125,
            "default ladder: each padded length <= this x the one before (22 lengths from 64 to "
            "1024, 34 to 4096); 2 with bucket_multiple 64 = powers of two",
        ),
        "bucket_multiple": Key(32, "default ladder: padded lengths are multiples of this (tokens)"),
        "group_by_length": Key(
            True, "true = batch pairs of similar length (less padding), as HF group_by_length"
        ),
        "length_group_batches": Key(
            32, "group_by_length: pairs are sorted by length within windows of this many batches"
        ),
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
        "logprob_chunk_size": Key(
            DEFAULT_CHUNK_SIZE, "positions per chunk of LM-head logits; 0 = unchunked"
        ),
        "logprob_chunk_mib": Key(
            256, "cap on one chunk's fp32 logits per device (MiB): smaller chunks; 0 = no cap"
        ),
        "prefix_sharing": Key(False, "true = run the shared prompt once for chosen and rejected"),
        "packing": Key(False, "true = pack several pairs into one sequence row"),
    },
    "compile_cache": {
        "enabled": Key(True, "true = reuse compiled steps across runs (JAX persistent cache)"),
        "dir": Key(
            "", "cache directory; '' = $XDG_CACHE_HOME/flux_jax/xla (~/.cache/...)", path=True
        ),
        "min_compile_time_s": Key(1.0, "only compilations at least this long are cached (s)"),
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
    "training": {
        "on_nonfinite": Key(
            "stop",
            "a step with a NaN/inf loss or gradient norm: stop (nothing saved after it; the "
            "last good checkpoint is the resume point) or skip_step (its update is dropped and "
            "counted in the skipped_steps metric)",
            ("stop", "skip_step"),
        ),
        "max_consecutive_skips": Key(
            10, "skip_step: stop after this many non-finite steps in a row"
        ),
        "divergence_factor": Key(
            4.0,
            "warn once when the loss stays above this many times its starting value (its first "
            "step's) for divergence_window steps; 0 = off",
        ),
        "divergence_window": Key(10, "consecutive steps above divergence_factor before warning"),
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
