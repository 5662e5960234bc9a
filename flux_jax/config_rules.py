"""The range, enum and cross-field rules of a FluxConfig, one function per group of keys.

`range_errors(config)` returns every violated rule as a message that starts with the key it is
about (FluxConfig raises them together as one ConfigError). Type and unknown-key checks happen
earlier, when values are set (flux_jax/config.py); the keys, defaults and choices are in
flux_jax/config_schema.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from flux_jax.config_schema import ALGORITHMS_IMPLEMENTED, LEAVES, SCHEMA
from flux_jax.lora import target_errors
from flux_jax.losses.registry import LOSSES
from flux_jax.losses.settings import algorithm_problems

if TYPE_CHECKING:
    from flux_jax.config import FluxConfig


class _Rules:
    """Collects the rule violations of one config; every message starts with the key it is about."""

    def __init__(self, config: FluxConfig):
        self.config = config
        self.errors: list[str] = []

    def need(self, ok: bool, path: str, rule: str) -> None:
        """`path` must satisfy `rule` (the words after "must be")."""
        if not ok:
            self.errors.append(f"{path} must be {rule}, got {self.config[path]!r}")

    def fail(self, ok: bool, message: str) -> None:
        """A cross-field rule: `message` unless `ok`."""
        if not ok:
            self.errors.append(message)


def range_errors(c: FluxConfig) -> list[str]:
    """Range, enum and cross-field rules; every message starts with the key it is about."""
    rules = _Rules(c)
    for check in (
        _check_choices_and_finite,
        _check_run,
        _check_algorithm,
        _check_checkpoint_and_data,
        _check_model_and_optimizer,
        _check_lora,
        _check_training_eval_logging,
        _check_mesh_and_generation,
    ):
        check(c, rules)
    return rules.errors


def _check_choices_and_finite(c: FluxConfig, r: _Rules) -> None:
    for path, key in LEAVES.items():
        value = c[path]
        values = value if key.one_or_list and isinstance(value, tuple) else (value,)
        allowed = (*key.choices, True, False) if key.or_bool else key.choices
        wrong = [v for v in values if v not in allowed]
        if key.choices and wrong:
            valid = ", ".join(repr(x) for x in key.choices)
            valid += ", true, false" if key.or_bool else ""
            got = repr(list(values)) if len(values) > 1 else repr(value)
            which = f" (not valid: {', '.join(map(repr, wrong))})" if len(values) > 1 else ""
            r.errors.append(f"{path} must be one of {valid}; got {got}{which}")
        if isinstance(value, float):
            r.need(math.isfinite(value), path, "a finite number")


def _check_run(c: FluxConfig, r: _Rules) -> None:
    r.fail(
        c.algorithm.name in ALGORITHMS_IMPLEMENTED,
        f"algorithm.name {c.algorithm.name!r} is not implemented: flux_jax implements only 'dpo'",
    )
    r.fail(
        not c.adaptive_async.enabled,
        "adaptive_async.enabled=true is not supported with algorithm 'dpo': adaptive async "
        "overlaps rollout generation with training (GRPO/PPO), and DPO has no rollouts -- it "
        "trains on a fixed preference dataset. Set adaptive_async.enabled: false",
    )
    r.need(c.seed >= 0, "seed", ">= 0")
    r.need(c.num_steps >= 1, "num_steps", ">= 1")
    r.need(c.batch_size >= 1, "batch_size", ">= 1")
    r.need(c.grad_accum_steps >= 1, "grad_accum_steps", ">= 1")
    r.fail(
        c.batch_size < 1 or c.grad_accum_steps < 1 or not c.batch_size % c.grad_accum_steps,
        f"batch_size ({c.batch_size}) must be divisible by grad_accum_steps "
        f"({c.grad_accum_steps}): each micro-batch holds batch_size / grad_accum_steps pairs",
    )
    r.need(c.learning_rate > 0, "learning_rate", "> 0")


def _check_algorithm(c: FluxConfig, r: _Rules) -> None:
    a = c.algorithm
    # The loss registry knows what each loss needs (reference, label smoothing, ...): ask it.
    r.errors.extend(algorithm_problems(a))
    r.fail(
        not (a.reference_free and a.precompute_ref_logps),
        "algorithm.precompute_ref_logps needs a reference; reference_free is true",
    )
    r.fail(
        not (a.ld_alpha < 1 and a.precompute_ref_logps),
        "algorithm.ld_alpha < 1 re-weights the reference's per-token log-probs: set "
        "algorithm.precompute_ref_logps to false (precomputed sums cannot be re-weighted)",
    )
    r.fail(
        not (a.ld_alpha < 1 and (c.model.prefix_sharing is True or c.model.packing)),
        "algorithm.ld_alpha < 1 needs the standard batch layout: set model.prefix_sharing and "
        "model.packing to false",
    )
    _check_unpaired(c, r)
    _check_ref_sync(c, r)


def _check_unpaired(c: FluxConfig, r: _Rules) -> None:
    """KTO (flux_jax/losses/unpaired.py) trains on unpaired data only, and pairs train the rest;
    what the unpaired path does not support yet is refused by name."""
    names = [c.algorithm.loss_type] if isinstance(c.algorithm.loss_type, str) else []
    names = names or list(c.algorithm.loss_type)
    unpaired_loss = any(name in LOSSES and LOSSES[name].unpaired for name in names)
    unpaired_data = c.data.format == "unpaired"
    if unpaired_loss != unpaired_data:
        r.errors.append(
            f"algorithm.loss_type={names} and data.format={c.data.format!r} do not match: "
            "kto and apo_zero_unpaired train on data.format unpaired ({prompt, completion, "
            "label}), the other losses on pairs"
        )
    if not unpaired_data:
        return
    unsupported = {
        "model.prefix_sharing": (c.model.prefix_sharing is True, "set it to false or auto"),
        "model.packing": (c.model.packing, "set it to false"),
        "algorithm.precompute_ref_logps": (c.algorithm.precompute_ref_logps, "set it to false"),
        "data.eval_path": (bool(c.data.eval_path), "leave it empty ('')"),
        "data.columns": (
            any(c.data.columns.to_dict().values()),
            "name the JSONL keys prompt, completion and label",
        ),
    }
    for key, (is_set, fix) in unsupported.items():
        r.fail(not is_set, f"{key} is not supported with data.format unpaired (KTO) yet: {fix}")
    micro = c.batch_size // max(c.grad_accum_steps, 1)
    r.fail(
        micro >= 2,
        f"data.format unpaired: KTO's KL estimate needs >= 2 examples per micro-batch, got "
        f"batch_size / grad_accum_steps = {micro}",
    )


def _check_ref_sync(c: FluxConfig, r: _Rules) -> None:
    """TR-DPO (flux_jax/ref_sync.py): a reference that moves needs an online, separate one."""
    sync = c.algorithm.ref_sync
    r.need(sync.every_steps >= 0, "algorithm.ref_sync.every_steps", ">= 0 (0 = off)")
    r.need(0 < sync.mixup_alpha <= 1, "algorithm.ref_sync.mixup_alpha", "in (0, 1]")
    if sync.every_steps <= 0:
        return
    r.fail(
        not c.algorithm.precompute_ref_logps,
        "algorithm.ref_sync.every_steps > 0 updates the reference during training, so its "
        "log-probs cannot be computed once up front: set algorithm.precompute_ref_logps to false "
        "(or algorithm.ref_sync.every_steps to 0)",
    )
    r.fail(
        not c.algorithm.reference_free,
        "algorithm.ref_sync.every_steps > 0 updates the reference model, but "
        "algorithm.reference_free is true (there is none): set algorithm.ref_sync.every_steps "
        "to 0",
    )
    r.fail(
        c.model.lora.rank <= 0,
        "algorithm.ref_sync.every_steps > 0 is not supported with LoRA (model.lora.rank > 0): "
        "the reference is the frozen base with the adapters off, which the policy shares, so "
        "there is no separate reference to update; train without LoRA or set "
        "algorithm.ref_sync.every_steps to 0",
    )


def _check_checkpoint_and_data(c: FluxConfig, r: _Rules) -> None:
    d = c.data
    r.need(c.checkpoint.save_steps >= 1, "checkpoint.save_steps", ">= 1")
    r.need(c.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", ">= 1")
    r.need(d.max_length >= 2, "data.max_length", ">= 2")
    r.need(d.max_prompt_length >= 1, "data.max_prompt_length", ">= 1")
    r.fail(
        d.max_prompt_length < d.max_length,
        f"data.max_prompt_length ({d.max_prompt_length}) must be < data.max_length "
        f"({d.max_length}) to leave room for the response",
    )
    buckets = (0, *d.bucket_lengths)
    increasing = all(x < y for x, y in zip(buckets, buckets[1:], strict=False))
    r.need(
        increasing and (not d.bucket_lengths or buckets[-1] >= d.max_length),
        "data.bucket_lengths",
        "strictly increasing positive lengths, the largest >= data.max_length (so every "
        "sequence fits a bucket), or () for the default",
    )
    r.need(d.bucket_ratio >= 1, "data.bucket_ratio", ">= 1 (1 = steps of bucket_multiple)")
    r.need(d.bucket_multiple >= 1, "data.bucket_multiple", ">= 1")
    r.need(d.length_group_batches >= 1, "data.length_group_batches", ">= 1")
    r.need(c.compile_cache.min_compile_time_s >= 0, "compile_cache.min_compile_time_s", ">= 0")
    r.need(d.max_record_bytes >= 1, "data.max_record_bytes", ">= 1")
    r.need(d.num_threads >= 0, "data.num_threads", ">= 0")
    r.need(d.tokenize_workers >= 0, "data.tokenize_workers", ">= 0 (0 = min(8, CPU count))")
    r.need(d.prefetch >= 0, "data.prefetch", ">= 0")
    r.need(d.shuffle_seed >= -1, "data.shuffle_seed", ">= 0, or -1 to use seed")


def _check_model_and_optimizer(c: FluxConfig, r: _Rules) -> None:
    m, o = c.model, c.optimizer
    r.need(m.logprob_chunk_size >= 0, "model.logprob_chunk_size", ">= 0 (0 = unchunked)")
    r.need(m.logprob_chunk_mib >= 0, "model.logprob_chunk_mib", ">= 0 (0 = no cap)")
    r.fail(
        not (m.attention == "splash" and (m.prefix_sharing is True or m.packing)),
        "model.attention='splash' cannot express the shared-prefix mask of "
        "model.prefix_sharing / model.packing; use 'xla', 'cudnn' or 'auto' with them",
    )
    r.need(0 <= o.b1 < 1, "optimizer.b1", "in [0, 1)")
    r.need(0 <= o.b2 < 1, "optimizer.b2", "in [0, 1)")
    r.need(o.eps > 0, "optimizer.eps", "> 0")
    r.need(o.weight_decay >= 0, "optimizer.weight_decay", ">= 0")
    r.need(o.max_grad_norm >= 0, "optimizer.max_grad_norm", ">= 0 (0 = no clipping)")
    r.need(0 <= o.warmup_steps <= c.num_steps, "optimizer.warmup_steps", "in [0, num_steps]")
    r.need(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "in [0, 1]")


def _check_lora(c: FluxConfig, r: _Rules) -> None:
    m, lora = c.model, c.model.lora
    r.need(lora.rank >= 0, "model.lora.rank", ">= 0 (0 = LoRA off)")
    r.need(lora.alpha > 0, "model.lora.alpha", "> 0")
    r.need(0 <= lora.dropout < 1, "model.lora.dropout", "in [0, 1)")
    r.errors.extend(f"model.lora.{problem}" for problem in target_errors(lora.target_modules))
    r.need(
        lora.quantization_block >= 0,
        "model.lora.quantization_block",
        ">= 0 (0 = one scale per output channel)",
    )
    if lora.rank == 0:
        r.fail(
            lora.base_quantization == "none",
            f"model.lora.base_quantization={lora.base_quantization!r} quantises the frozen base "
            "of a LoRA run (QLoRA): set model.lora.rank > 0 (e.g. 16), or base_quantization: none",
        )
        r.fail(
            not lora.init_from,
            f"model.lora.init_from={lora.init_from!r} starts LoRA adapters from a PEFT adapter: "
            "set model.lora.rank (and alpha, target_modules, rslora) to its adapter_config.json's "
            "r, lora_alpha, target_modules, use_rslora, or init_from: ''",
        )
        return
    r.fail(
        m.param_dtype == "float32",
        f"model.param_dtype={m.param_dtype!r} with LoRA: the trained adapters are always fp32 "
        "master weights; set model.param_dtype: float32, and model.lora.base_dtype for the "
        "frozen base's dtype",
    )
    r.fail(
        not (lora.base_dtype == "bfloat16" and m.compute_dtype == "float32"),
        "model.lora.base_dtype='bfloat16' with model.compute_dtype='float32': the base is the "
        "DPO reference, which runs in the compute dtype; a bf16 base would make it (and the "
        "precomputed reference cache) another model. Use base_dtype '' (= compute dtype) or "
        "float32, or compute_dtype bfloat16",
    )


def _check_training_eval_logging(c: FluxConfig, r: _Rules) -> None:
    t = c.training
    r.need(t.max_consecutive_skips >= 1, "training.max_consecutive_skips", ">= 1")
    r.need(
        t.divergence_factor == 0 or t.divergence_factor > 1,
        "training.divergence_factor",
        "> 1, or 0 to switch the divergence warning off",
    )
    r.need(t.divergence_window >= 1, "training.divergence_window", ">= 1")
    r.need(c.eval.every_steps >= 0, "eval.every_steps", ">= 0 (0 = only at the end)")
    r.need(c.eval.batch_size >= 1, "eval.batch_size", ">= 1")
    r.need(c.eval.max_batches >= 0, "eval.max_batches", ">= 0 (0 = all)")
    r.need(c.logging.every_steps >= 1, "logging.every_steps", ">= 1")


def _check_mesh_and_generation(c: FluxConfig, r: _Rules) -> None:
    for axis in SCHEMA["mesh"]:
        r.need(c.mesh[axis] >= 1 or c.mesh[axis] == -1, f"mesh.{axis}", ">= 1, or -1")
    r.fail(
        sum(v == -1 for v in c.mesh.to_dict().values()) <= 1,
        "mesh: at most one of data, fsdp, tensor, expert may be -1 (the remaining devices)",
    )
    g = c.generation
    r.need(g.max_new_tokens >= 1, "generation.max_new_tokens", ">= 1")
    r.need(g.temperature >= 0, "generation.temperature", ">= 0 (0 = greedy)")
    r.need(g.top_k >= 0, "generation.top_k", ">= 0 (0 = off)")
    r.need(0 < g.top_p <= 1, "generation.top_p", "in (0, 1]")
