"""State some losses carry across steps: BCO's running reward mean.

BCO (Jung et al. 2024, arXiv:2404.04656) shifts the rewards by delta, the mean of the batch-mean
rewards seen so far (TRL < 0.20's `RunningMoments` fed one scalar per batch). The state is part
of the train state (`state["loss_state"]`), so it is checkpointed and restored exactly with it:
`{"bco_reward_mean": f32 [], "bco_batches": f32 []}`. Without `bco_pair` there is no state.

Each (micro-)batch's loss uses `delta = (mean * n + m) / (n + 1)`, `m` its own mean reward: the
running mean updated with the current batch first, as TRL did. With gradient accumulation every
micro-batch of a step starts from the step's state and the step then folds all K micro-batch
means in (n += K); TRL updated after each micro-batch, so micro-batches 2..K saw slightly
different deltas there. With K = 1 the two are identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from flux_jax.losses.settings import DPOSettings

LossState = dict[str, jax.Array]
BATCH_MEAN_METRIC = "bco/batch_reward_mean"  # this (micro-)batch's m, averaged over micro-batches


def initial_loss_state(settings: DPOSettings) -> LossState | None:
    """The state before step 1, or None when no selected loss carries state."""
    if "bco_pair" not in settings.loss_type:
        return None
    return {
        "bco_reward_mean": jnp.zeros((), jnp.float32),
        "bco_batches": jnp.zeros((), jnp.float32),
    }


def bco_shift(state: LossState | None, batch_mean_reward: jax.Array) -> jax.Array:
    """delta for this batch: the running mean including `batch_mean_reward` (no gradient)."""
    m = jax.lax.stop_gradient(batch_mean_reward)
    if state is None:  # a standalone call (dpo_loss): the batch is the whole history
        return m
    n = state["bco_batches"].astype(m.dtype)
    return (state["bco_reward_mean"].astype(m.dtype) * n + m) / (n + 1)


def next_loss_state(
    state: LossState | None, metrics: dict[str, jax.Array], num_microbatches: int
) -> LossState | None:
    """The state after a step whose (micro-batch averaged) metrics are `metrics`."""
    if state is None:
        return None
    n, k = state["bco_batches"], jnp.float32(num_microbatches)
    total = state["bco_reward_mean"] * n + metrics[BATCH_MEAN_METRIC].astype(jnp.float32) * k
    return {"bco_reward_mean": total / (n + k), "bco_batches": n + k}
