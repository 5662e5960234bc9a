"""The public face of the preference-loss family: `dpo_loss`, `dpo_objective` and the registry.

The losses, settings and objective live in `flux_jax.losses` (one module per job); this module
keeps the names users and the rest of flux_jax import: `dpo_loss`, `dpo_objective`,
`dpo_objective_for` (the train step's entry), `preference_loss` (the evals': no regularisers),
`PairLogps`, `DPOSettings`, `LOSSES`, `LOSS_TYPES`,
`register_loss`, `sft_loss`, `kl_penalty`. A new loss type is one decorated function in
flux_jax/losses/ (`register_loss`); the config's `algorithm.loss_type` choices are the registry's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from flux_jax.losses import (
    LOSSES,
    DPOSettings,
    LossType,
    PairLogps,
    initial_loss_state,
    kl_penalty,
    next_loss_state,
    register_loss,
    sft_loss,
)
from flux_jax.losses.objective import preference_loss, training_objective
from flux_jax.losses.state import LossState

# The built-in loss types, in registration order (the config schema's choices).
LOSS_TYPES = tuple(LOSSES)

__all__ = [
    "LOSSES",
    "LOSS_TYPES",
    "DPOSettings",
    "LossType",
    "PairLogps",
    "dpo_loss",
    "dpo_objective",
    "dpo_objective_for",
    "initial_loss_state",
    "kl_penalty",
    "next_loss_state",
    "preference_loss",
    "register_loss",
    "sft_loss",
]


def _pair_logps(
    summed_logps: tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None],
    token_counts: tuple[jax.Array | None, jax.Array | None],
    **token_logps: jax.Array | None,
) -> PairLogps:
    """The `PairLogps` of the public functions' arrays: summed (policy chosen, policy rejected,
    ref chosen, ref rejected) log-probs, (chosen, rejected) token counts, and optionally the
    per-token ones (policy_tokens, ref_tokens, token_mask)."""
    chosen_counts, rejected_counts = token_counts
    return PairLogps(
        *summed_logps, chosen_counts=chosen_counts, rejected_counts=rejected_counts, **token_logps
    )


def dpo_objective_for(
    settings: DPOSettings, pair: PairLogps, loss_state: LossState | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective of one batch (the train step's call; see `dpo_objective`)."""
    return training_objective(settings, pair, loss_state)


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None,
    ref_rejected_logps: jax.Array | None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_token_counts: jax.Array | None = None,
    rejected_token_counts: jax.Array | None = None,
    **options: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Preference loss, averaged over the batch of pairs, and TRL's reward metrics.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B]
        summed response log-probs (`sequence_logprobs`) under the policy and the reference. The
        ref ones may be None for the losses that need no reference (simpo, cpo, orpo, sft).
      loss_type: a registered name (`LOSS_TYPES`; the functions in `LOSSES` give the formulas)
        or a list of them, combined with `loss_weights` (MPO).
      beta: inverse temperature (DPO and most), the regulariser tau (IPO), lambda (ORPO).
      label_smoothing: assumed probability that a preference label is flipped, in [0, 0.5);
        only for the losses whose registry entry uses it.
      reference_free: drop the reference from the loss (an implicit uniform reference). As in
        TRL the reward metrics still use the ref log-probs passed in.
      chosen_token_counts, rejected_token_counts: [B] response token counts; required by the
        length-normalised losses (ipo, sigmoid_norm, simpo, orpo) and the NLL ones (sft, cpo).
      **options: the other `DPOSettings` fields (loss_weights, f_divergence_type,
        f_alpha_divergence_coef, discopop_tau, simpo_gamma, cpo_alpha).

    Returns:
      `(loss, metrics)`: `loss` is a float32 scalar (float64 for float64 inputs). `metrics`
      holds batch means without gradient: `loss`, `chosen_reward` (beta * mean(pi_c - ref_c)),
      `rejected_reward`, `reward_margin`, `reward_accuracy`, `chosen_logps`, `rejected_logps`
      (per-token for length-normalised losses), `logps/chosen`, `logps/rejected` (TRL's: summed),
      `loss/<name>` per loss when several, and the losses' own (`bco/reward_mean`, ...).

    `bco_pair` outside training has no history: its running mean is this batch's mean reward.
    """
    settings = DPOSettings(
        loss_type=tuple(loss_type) if not isinstance(loss_type, str) else loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        **options,
    )
    pair = _pair_logps(
        (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps),
        (chosen_token_counts, rejected_token_counts),
    )
    return preference_loss(settings, pair)


def dpo_objective(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None,
    ref_rejected_logps: jax.Array | None,
    *,
    chosen_token_counts: jax.Array | None = None,
    rejected_token_counts: jax.Array | None = None,
    policy_token_logps: jax.Array | None = None,
    ref_token_logps: jax.Array | None = None,
    token_loss_mask: jax.Array | None = None,
    **settings: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`dpo_loss` plus `sft_coef * sft_loss + kl_coef * kl_penalty`: the training objective.

    `**settings` are `DPOSettings` fields (loss_type, beta, label_smoothing, reference_free,
    sft_coef, kl_coef, ld_alpha, ...). Extra inputs:
      sft_coef: needs `chosen_token_counts`; uses the raw summed chosen log-probs.
      kl_coef, ld_alpha < 1: need `policy_token_logps`, `ref_token_logps` and `token_loss_mask`,
        all [2B, T] (the `token_logprobs` of the chosen rows, then the rejected rows).
    A regulariser whose coefficient is 0 is not computed and adds no metric.

    Returns `(loss, metrics)` where `loss` is the total; `metrics` has `dpo_loss`'s entries with
    `loss` replaced by the total and `dpo_loss` added, plus `sft_loss` and/or `kl` when enabled.
    """
    pair = _pair_logps(
        (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps),
        (chosen_token_counts, rejected_token_counts),
        policy_tokens=policy_token_logps,
        ref_tokens=ref_token_logps,
        token_mask=token_loss_mask,
    )
    return training_objective(DPOSettings(**settings), pair)
