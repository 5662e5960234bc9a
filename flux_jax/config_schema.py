"""The FluxConfig schema: every key of a flux_jax run, its default, its meaning, its choices.

Data only; flux_jax/config.py loads, checks and validates configs against it. The order here is
the order `to_dict`/`to_yaml` write.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flux_jax.dpo import LOSS_TYPES  # the loss registry: a new loss type is one function there
from flux_jax.logprobs import DEFAULT_CHUNK_SIZE  # also the library default of the LM-head chunk
from flux_jax.lora import DEFAULT_TARGETS  # every projection LoRA can adapt


@dataclasses.dataclass(frozen=True)
class Key:
    """One leaf of the schema: its default (whose type is the key's type), meaning, and enum.
    `path`: a filesystem path, whose `~` and `$VAR`s are expanded when it is set."""

    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    path: bool = False
    # A list key's element type when its (empty) default cannot show it: float for weights.
    items: type | None = None
    # A string key with choices that also takes a list of them (algorithm.loss_type: MPO).
    one_or_list: bool = False
    # A string key with choices that also takes true / false (model.prefix_sharing: auto).
    or_bool: bool = False

    @property
    def item_kind(self) -> type:
        """A list key's element type: `items` if set, else str when its default lists strings,
        else int."""
        if self.items is not None:
            return self.items
        return str if self.default and isinstance(self.default[0], str) else int


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
        "reference_free": Key(
            False,
            "true = no reference model (its log-probs taken as 0); required by the losses that "
            "need none (simpo, cpo, orpo, sft)",
        ),
        "label_smoothing": Key(0.0, "assumed label-flip probability (cDPO/robust), [0, 0.5)"),
        "loss_type": Key(
            "sigmoid",
            f"the preference loss: {', '.join(LOSS_TYPES)} (formulas: flux_jax/losses/); or a "
            "list of them, summed with loss_weights (TRL's MPO)",
            LOSS_TYPES,
            one_or_list=True,
        ),
        "loss_weights": Key(
            (),
            "weight of each loss_type in the sum, one per name; [] = 1 each",
            items=float,
        ),
        "use_weighting": Key(
            False,
            "WPO: weight each pair's loss by its responses' sampling probability under the policy "
            "(arXiv:2406.11827; TRL's use_weighting)",
        ),
        "f_divergence_type": Key(
            "reverse_kl",
            "f-DPO regulariser: reverse_kl (standard DPO), forward_kl, js_divergence, "
            "alpha_divergence (sigmoid, hinge, ipo, exo_pair, robust, discopop, sigmoid_norm)",
            ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
        ),
        "f_alpha_divergence_coef": Key(0.5, "alpha of alpha_divergence (f-DPO), in (0, 1)"),
        "discopop_tau": Key(0.05, "DiscoPOP's tau (loss_type discopop)"),
        "simpo_gamma": Key(0.5, "SimPO's target reward margin gamma (loss_type simpo)"),
        "cpo_alpha": Key(1.0, "weight of CPO's NLL on chosen responses (loss_type cpo)"),
        "ld_alpha": Key(
            1.0, "LD-DPO: weight of the longer response's tokens past the shorter's length; 1 = off"
        ),
        "desirable_weight": Key(1.0, "KTO: weight of the desirable examples' losses"),
        "undesirable_weight": Key(1.0, "KTO: weight of the undesirable examples' losses"),
        "sft_coef": Key(0.0, "weight of the NLL loss on chosen responses added to the loss"),
        "kl_coef": Key(0.0, "weight of a KL(policy || reference) penalty added to the loss"),
        "router_aux_loss_coef": Key(
            -1.0,
            "MoE models: weight of the router load-balancing loss added to the loss; -1 = the "
            "model's router_aux_loss_coef (config.json)",
        ),
        "precompute_ref_logps": Key(False, "true = reference log-probs computed once, up front"),
        # TR-DPO (arXiv:2404.09656; TRL's sync_ref_model): flux_jax/ref_sync.py.
        "ref_sync": {
            "every_steps": Key(
                0,
                "TR-DPO: every this many optimiser steps, reference = mixup_alpha * policy + "
                "(1 - mixup_alpha) * reference (TRL's ref_model_sync_steps); 0 = fixed reference",
            ),
            "mixup_alpha": Key(
                0.6, "TR-DPO's alpha in (0, 1]; 1 = copy the policy (TRL's ref_model_mixup_alpha)"
            ),
        },
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
            "",
            "training pairs: .jsonl(.gz), .parquet, save_to_disk dir, dir or glob of them, or "
            "hf:org/name[:split]; '' = bundled demo",
            path=True,
        ),
        "eval_path": Key(
            "", "held-out pairs for eval and best-checkpoint choice; '' = none", path=True
        ),
        "format": Key(
            "preferences",
            "preferences ({prompt, chosen, rejected} strings), conversational (chat messages), "
            "implicit_prompt (chosen/rejected only; the shared start is the prompt) or unpaired "
            "({prompt, completion, label: true|false}, strings or messages; loss_type kto)",
            ("preferences", "conversational", "implicit_prompt", "unpaired"),
        ),
        "tokenization": Key(
            "separate",
            "separate = prompt and completion tokenised apart, eos id appended (TRL 0.12-0.28); "
            "joint = prompt + completion + eos text tokenised as one, split at the common token "
            "prefix (TRL >= 0.29; TRL 1.16 id for id): see flux_jax.data.tokenization",
            ("separate", "joint"),
        ),
        "max_length": Key(1024, "maximum tokens per sequence (prompt + response)"),
        "max_prompt_length": Key(512, "maximum prompt tokens; must be < max_length"),
        "drop_truncated": Key(False, "true = drop pairs that need truncation, false = truncate"),
        "on_bad_record": Key("error", "bad JSONL record: error or skip", ("error", "skip")),
        # 16 MiB per line: about 1.4M tokens in each of prompt, chosen and rejected at ~4 bytes
        # per token, far beyond any context window trained today, while a line's transient cost
        # when parsed, rendered and tokenised (~190x its size, measured on a 50 MB line) stays
        # near 3 GB. (flux_jax.data.records.DEFAULT_MAX_RECORD_BYTES reads it from here.)
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
        # Tokenise once, memory-map after: flux_jax.data.token_cache / token_store.
        "token_cache": Key(
            True,
            "true = tokenise into an on-disk store on first use and memory-map it on later runs "
            "(keyed by data, tokenizer and these settings); false = tokenise in memory each run; "
            "unpaired (KTO) data is always tokenised in memory",
        ),
        "token_cache_dir": Key(
            "",
            "token stores' directory; '' = $FLUX_JAX_CACHE/tokens, else "
            "$XDG_CACHE_HOME/flux_jax/tokens (~/.cache/flux_jax/tokens)",
            path=True,
        ),
        "tokenize_workers": Key(
            0, "processes tokenising a new token store of large data; 0 = min(8, CPU count)"
        ),
        # The dataset's own column (or JSONL key) for each field; errors then name that column.
        "columns": {
            "prompt": Key("", "column holding the prompt; '' = 'prompt'"),
            "chosen": Key("", "column holding the chosen response; '' = 'chosen'"),
            "rejected": Key("", "column holding the rejected response; '' = 'rejected'"),
        },
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
        "moe_impl": Key(
            "auto",
            "MoE experts: grouped (ragged_dot over routed tokens), dense (every expert on every "
            "token: the reference), auto (= grouped)",
            ("dense", "grouped", "auto"),
        ),
        "logprob_chunk_size": Key(
            DEFAULT_CHUNK_SIZE, "positions per chunk of LM-head logits; 0 = unchunked"
        ),
        "logprob_chunk_mib": Key(
            256, "cap on one chunk's fp32 logits per device (MiB): smaller chunks; 0 = no cap"
        ),
        "prefix_sharing": Key(
            "auto",
            "true = run the shared prompt once for chosen and rejected (one row per pair); "
            "auto = true with attention 'xla' unless the run needs standard rows (ld_alpha < 1, "
            "unpaired data); false = standard rows",
            ("auto",),
            or_bool=True,
        ),
        "packing": Key(False, "true = pack several pairs into one sequence row"),
        # LoRA (flux_jax/lora.py): train low-rank adapters on a frozen base, which is also the
        # DPO reference (no second copy of the model).
        "lora": {
            "rank": Key(0, "LoRA rank r of the adapters; 0 = off (full fine-tuning)"),
            "alpha": Key(
                16.0, "LoRA alpha: the adapter path is scaled by alpha / rank (PEFT's lora_alpha)"
            ),
            "dropout": Key(0.0, "dropout on the adapter input while training, [0, 1)"),
            "target_modules": Key(
                DEFAULT_TARGETS, f"projections that get adapters: {', '.join(DEFAULT_TARGETS)}"
            ),
            "rslora": Key(False, "true = rank-stabilised scale alpha / sqrt(rank) (rsLoRA)"),
            "base_dtype": Key(
                "",
                "dtype of the frozen base: '' = model.compute_dtype; float32; bfloat16 (with "
                "compute_dtype bfloat16)",
                ("", "float32", "bfloat16"),
            ),
            # QLoRA (flux_jax/quantization.py, through qwix): the frozen base's attention and MLP
            # projections stored as int8 or NF4 codes with fp32 scales.
            "base_quantization": Key(
                "none",
                "quantise the frozen base's projections: none, int8 (absmax, error <= 1/255 of "
                "the scale's absmax) or nf4 (QLoRA's NormalFloat-4, 1/8 of fp32 + scales)",
                ("none", "int8", "nf4"),
            ),
            "quantization_block": Key(
                64, "input features per quantisation scale; 0 = one per output channel"
            ),
            "init_from": Key(
                "",
                "PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors) to start "
                "the adapters from, e.g. after SFT; '' = fresh (B = 0)",
                path=True,
            ),
        },
    },
    "compile_cache": {
        "enabled": Key(True, "true = reuse compiled steps across runs (JAX persistent cache)"),
        "dir": Key(
            "", "cache directory; '' = $XDG_CACHE_HOME/flux_jax/xla (~/.cache/...)", path=True
        ),
        "min_compile_time_s": Key(0.0, "only compilations at least this long are cached (s)"),
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
        "logits_metrics": Key(
            True,
            "true = report TRL's logits/chosen and logits/rejected (mean logit over the vocabulary "
            "per response token): one more reduction over each LM-head chunk's logits in the "
            "forward pass, none in the backward",
        ),
        # Optional trackers (flux_jax/trackers.py; extras flux_jax[wandb], flux_jax[trackio]):
        # each gets the metrics.jsonl lines and the config; on when its project is set.
        "wandb": {
            "project": Key("", "Weights & Biases project; '' = W&B off"),
            "entity": Key("", "W&B team or user; '' = your default entity"),
            "name": Key("", "W&B run name; '' = W&B picks one"),
            "mode": Key(
                "online",
                "online, offline (local files; `wandb sync` later) or disabled",
                ("online", "offline", "disabled"),
            ),
        },
        "trackio": {
            "project": Key("", "Trackio project (local database, `trackio show`); '' = off"),
            "name": Key("", "Trackio run name; '' = Trackio picks one"),
        },
    },
    # Devices per mesh axis; -1 = the remaining devices. The product must equal the device
    # count, which is only known (and checked) when the mesh is built.
    "mesh": {
        "data": Key(1, "devices on the data-parallel axis"),
        "fsdp": Key(-1, "devices on the FSDP (sharded weights and optimiser state) axis"),
        "tensor": Key(1, "devices on the tensor-parallel axis"),
        "expert": Key(
            1,
            "devices on the expert-parallel axis (Qwen3-MoE: experts split over it, the batch "
            "too; must divide num_experts)",
        ),
    },
    "generation": {
        "max_new_tokens": Key(128, "maximum tokens generated per prompt"),
        "temperature": Key(0.0, "sampling temperature; 0 = greedy"),
        "top_k": Key(0, "sample from the k most likely tokens; 0 = no top-k filter"),
        "top_p": Key(1.0, "nucleus sampling probability mass, (0, 1]; 1 = off"),
        "use_chat_template": Key(True, "true = wrap prompts in the tokenizer's chat template"),
    },
}

SECTIONS = tuple(k for k, v in SCHEMA.items() if isinstance(v, dict))  # top-level sections
SUBSECTIONS: list[str] = []  # sections inside sections, dotted: "model.lora"
LEAVES: dict[str, Key] = {}  # every key by its dotted path: "model.lora.rank"


def _collect(prefix: str, entries: dict[str, Any]) -> None:
    for name, entry in entries.items():
        if isinstance(entry, dict):
            if prefix:
                SUBSECTIONS.append(prefix + name)
            _collect(f"{prefix}{name}.", entry)
        else:
            LEAVES[prefix + name] = entry


_collect("", SCHEMA)


def section_schema(path: str) -> dict[str, Any]:
    """The schema of the section at dotted `path` ("model", "model.lora")."""
    entries = SCHEMA
    for name in path.split("."):
        entries = entries[name]
    return entries
