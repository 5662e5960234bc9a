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
        _check_training_eval_logging,
        _check_mesh_and_generation,
    ):
        check(c, rules)
    return rules.errors


def _check_choices_and_finite(c: FluxConfig, r: _Rules) -> None:
    for path, key in LEAVES.items():
        value = c[path]
        if key.choices and value not in key.choices:
            valid = ", ".join(repr(x) for x in key.choices)
            r.errors.append(f"{path} must be one of {valid}; got {value!r}")
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
    r.need(a.beta > 0, "algorithm.beta", "> 0")
    r.need(0 <= a.label_smoothing < 0.5, "algorithm.label_smoothing", "in [0, 0.5)")
    r.fail(
        not (a.label_smoothing > 0 and a.loss_type in ("hinge", "ipo")),
        f"algorithm.label_smoothing={a.label_smoothing} has no effect with "
        f"loss_type={a.loss_type!r} (only 'sigmoid' and 'robust' use it); set it to 0",
    )
    r.need(a.sft_coef >= 0, "algorithm.sft_coef", ">= 0")
    r.need(a.kl_coef >= 0, "algorithm.kl_coef", ">= 0")
    r.fail(
        not (a.reference_free and a.kl_coef > 0),
        "algorithm.kl_coef > 0 needs the reference model; reference_free is true",
    )
    r.fail(
        not (a.reference_free and a.precompute_ref_logps),
        "algorithm.precompute_ref_logps needs a reference; reference_free is true",
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
    r.need(d.prefetch >= 0, "data.prefetch", ">= 0")
    r.need(d.shuffle_seed >= -1, "data.shuffle_seed", ">= 0, or -1 to use seed")


def _check_model_and_optimizer(c: FluxConfig, r: _Rules) -> None:
    m, o = c.model, c.optimizer
    r.need(m.logprob_chunk_size >= 0, "model.logprob_chunk_size", ">= 0 (0 = unchunked)")
    r.need(m.logprob_chunk_mib >= 0, "model.logprob_chunk_mib", ">= 0 (0 = no cap)")
    r.fail(
        not (m.attention == "splash" and (m.prefix_sharing or m.packing)),
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
        "mesh: at most one of data, fsdp, tensor may be -1 (the remaining devices)",
    )
    g = c.generation
    r.need(g.max_new_tokens >= 1, "generation.max_new_tokens", ">= 1")
    r.need(g.temperature >= 0, "generation.temperature", ">= 0 (0 = greedy)")
    r.need(g.top_k >= 0, "generation.top_k", ">= 0 (0 = off)")
    r.need(0 < g.top_p <= 1, "generation.top_p", "in (0, 1]")
