"""The optax chain for DPO training: AdamW, learning-rate schedule, clipping, weight-decay mask.

Parameters and optimiser state are fp32 master weights; compute-dtype casts happen in the model.
The chain is `clip_by_global_norm -> adamw(schedule, mask=weight_decay_mask)`; AdamW's decay is
decoupled and scaled by the learning rate (`p -= lr * (adam_update + weight_decay * p)`), as in
PyTorch's AdamW.

Weight-decay rule: a leaf is decayed iff the last element of its path is `kernel` or `embedding`
(matmul weights, the token embedding and an untied `lm_head`), or `lora_a` / `lora_b` (LoRA
adapter matrices, decayed as the HF Trainer decays PEFT's lora_A/lora_B). Norm scales
(`.../scale`) and biases (`.../bias`) are never decayed: shrinking a norm scale towards 0 or a
bias towards 0 is not a sensible prior, and it is the usual convention for transformer fine-tuning.

Gradient accumulation is not part of the chain: the train step averages micro-batch gradients
itself (`flux_jax.grad_accum`), so one optimiser update is one train step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

if TYPE_CHECKING:
    from flux_jax.config import FluxConfig

SCHEDULES = ("constant", "cosine", "linear")
DECAYED_PARAM_NAMES = frozenset({"kernel", "embedding", "lora_a", "lora_b"})


def make_schedule(
    *,
    learning_rate: float,
    num_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0, then constant, cosine or linear decay to `min_lr_ratio * lr`.

    Matches the Hugging Face schedulers TRL runs with (`get_{constant,cosine,linear}_schedule_with_
    warmup`, with `min_lr_rate`), so step counts mean the same thing:
      step < warmup:   lr * step / warmup          (so the very first update, step 0, uses lr 0)
      constant:        lr
      cosine:          lr * (m + (1 - m) * 0.5 * (1 + cos(pi * p)))
      linear:          lr * (m + (1 - m) * (1 - p))
    with `p = (step - warmup) / (num_steps - warmup)` clipped to [0, 1] and `m = min_lr_ratio`.
    `step` is the optimiser's update count (0 for the first update).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {list(SCHEDULES)}")
    if learning_rate < 0:
        raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
    if num_steps <= 0:
        raise ValueError(f"num_steps must be > 0, got {num_steps}")
    if not 0 <= warmup_steps <= num_steps:
        raise ValueError(f"warmup_steps must be in [0, num_steps={num_steps}], got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    decay_steps = max(num_steps - warmup_steps, 1)

    def schedule_fn(step: jax.Array | int) -> jax.Array:
        step_f = jnp.asarray(step, jnp.float32)
        warmup_frac = step_f / max(warmup_steps, 1)
        progress = jnp.clip((step_f - warmup_steps) / decay_steps, 0.0, 1.0)
        if schedule == "constant":
            decay_frac = jnp.ones_like(progress)
        elif schedule == "cosine":
            decay_frac = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + jnp.cos(math.pi * progress))
        else:  # linear
            decay_frac = min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
        return learning_rate * jnp.where(step_f < warmup_steps, warmup_frac, decay_frac)

    return schedule_fn


def current_learning_rate(schedule: optax.Schedule, step: jax.Array | int) -> jax.Array:
    """The learning rate the update with (0-based) optimiser count `step` uses, for logging."""
    return jnp.asarray(schedule(step), jnp.float32)


def _path_name(key: Any) -> str:
    """The name of one path element, as a string (dict key, attribute or list index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_decayed(path: Sequence[Any]) -> bool:
    if not path:
        return False
    # Also accept flat dicts keyed "layers/self_attn/q_proj/kernel" or "a.b.kernel".
    last = _path_name(path[-1]).replace(".", "/").rsplit("/", 1)[-1]
    return last in DECAYED_PARAM_NAMES


def weight_decay_mask(params: Any) -> Any:
    """Bool pytree over `params`: True where weight decay applies (see the module docstring).

    Works for nested dicts of arrays, `nnx.State` and flat path-keyed dicts. `nnx.Variable`s are
    treated as leaves so the array's own path element (`.value`) is not mistaken for its name; the
    result is then a prefix of the params tree, which `optax.masked` accepts.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _is_decayed(path),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_optimizer(
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    **schedule_args: Any,
) -> optax.GradientTransformation:
    """AdamW with the `make_schedule(**schedule_args)` learning rate, clipping and the decay mask.

    `schedule_args` are make_schedule's (learning_rate, num_steps, warmup_steps, schedule,
    min_lr_ratio). `max_grad_norm` of None or 0 disables clipping. The learning rate for logging
    is `current_learning_rate(make_schedule(**schedule_args), step)`.
    """
    if max_grad_norm is not None and max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be >= 0 or None, got {max_grad_norm}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    transforms = []
    if max_grad_norm:
        transforms.append(optax.clip_by_global_norm(max_grad_norm))
    transforms.append(
        optax.adamw(
            learning_rate=make_schedule(**schedule_args),
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*transforms)


def from_config(config: FluxConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain of a run's config (`learning_rate`, `num_steps`, `optimizer.*`) and its
    learning-rate schedule (for logging)."""
    opt = config.optimizer
    schedule_args = dict(
        learning_rate=config.learning_rate,
        num_steps=config.num_steps,
        warmup_steps=opt.warmup_steps,
        schedule=opt.schedule,
        min_lr_ratio=opt.min_lr_ratio,
    )
    tx = make_optimizer(
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        max_grad_norm=opt.max_grad_norm or None,
        **schedule_args,
    )
    return tx, make_schedule(**schedule_args)
