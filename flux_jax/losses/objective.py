"""The training objective: the selected losses, weighted (MPO), plus the regularisers, and the
metrics TRL users read.

`PairLogps` carries one batch's log-probs; `training_objective(settings, pair, loss_state)` is
the single implementation behind the train step, the evals and the public `dpo_loss` /
`dpo_objective`.
Order of work, as TRL 1.16's `_compute_loss`: LD-DPO weighting of the summed log-probs, log-ratios
against the reference (zero when reference-free), f-DPO scores, then each loss per pair, WPO
weights, batch means, and `sum_i loss_weights[i] * mean_i`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flux_jax.losses import reweighting, unpaired
from flux_jax.losses.reference_free import orpo_log_odds
from flux_jax.losses.registry import LossInputs
from flux_jax.losses.regularisers import kl_penalty, per_token, sft_loss, upcast
from flux_jax.losses.settings import DPOSettings
from flux_jax.losses.state import BATCH_MEAN_METRIC, LossState, bco_shift


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """One batch's log-probs for the objective; [B] per pair unless noted.

    policy_chosen / policy_rejected: summed response log-probs under the policy.
    ref_chosen / ref_rejected: the same under the reference; None without one (reference-free
      training). With `reference_free` the loss ignores them but, as TRL, the reward metrics
      still use them when given.
    chosen_counts / rejected_counts: response token counts; needed by the length-normalised
      losses, the NLL terms (`sft`, `cpo`, `orpo`, `sft_coef`) and LD-DPO.
    policy_tokens / ref_tokens / token_mask: per-token log-probs [2B, T] (chosen rows first) and
      their mask, in the standard layout; needed by `kl_coef` and by LD-DPO (`ld_alpha < 1`).
    wpo_log_weights: [2B] WPO log-weights (chosen rows first; `reweighting.wpo_log_weights`);
      needed by `use_weighting`.
    labels: [B] bool, unpaired data only (KTO; flux_jax.losses.unpaired): true = desirable. The
      "chosen" values are then each example's completion, the "rejected" ones its KL row.
    """

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    ref_chosen: jax.Array | None = None
    ref_rejected: jax.Array | None = None
    chosen_counts: jax.Array | None = None
    rejected_counts: jax.Array | None = None
    policy_tokens: jax.Array | None = None
    ref_tokens: jax.Array | None = None
    token_mask: jax.Array | None = None
    wpo_log_weights: jax.Array | None = None
    labels: jax.Array | None = None


def _needs_counts(s: DPOSettings) -> bool:
    nll = {"sft", "cpo", "orpo"} & set(s.loss_type)
    return bool(nll) or any(loss.length_normalised for loss in s.losses) or s.sft_coef > 0


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _ld_sums(tokens_NxT: jax.Array, mask_NxT: jax.Array, ld_alpha: float):
    weighted = upcast(tokens_NxT) * reweighting.ld_token_weights(mask_NxT, ld_alpha)
    return jnp.split(weighted.sum(axis=1), 2)


def loss_inputs(
    s: DPOSettings, pair: PairLogps, loss_state: LossState | None
) -> tuple[LossInputs, jax.Array, jax.Array]:
    """The `LossInputs` of a batch, and the reference log-probs the reward metrics use."""
    pi_c, pi_r = upcast(pair.policy_chosen), upcast(pair.policy_rejected)
    zeros = jnp.zeros_like(pi_c)
    has_ref = pair.ref_chosen is not None and pair.ref_rejected is not None
    _require(
        has_ref or not s.needs_reference,
        f"loss_type={list(s.loss_type)} needs the reference log-probs (ref_chosen, ref_rejected)",
    )
    ref_c = upcast(pair.ref_chosen) if has_ref else zeros
    ref_r = upcast(pair.ref_rejected) if has_ref else zeros
    if _needs_counts(s) or s.ld_alpha < 1:
        _require(
            pair.chosen_counts is not None and pair.rejected_counts is not None,
            f"loss_type={list(s.loss_type)} (or sft_coef / ld_alpha) needs chosen_token_counts "
            "and rejected_token_counts",
        )
    counts_c = zeros + 1 if pair.chosen_counts is None else upcast(pair.chosen_counts)
    counts_r = zeros + 1 if pair.rejected_counts is None else upcast(pair.rejected_counts)

    nll_c = pi_c  # the NLL terms always see the raw log-probs
    if s.ld_alpha < 1:
        _require(
            pair.policy_tokens is not None and pair.token_mask is not None,
            "ld_alpha < 1 needs the per-token log-probs (policy_token_logps, token_loss_mask)",
        )
        pi_c, pi_r = _ld_sums(pair.policy_tokens, pair.token_mask, s.ld_alpha)
        if s.needs_reference:
            _require(
                pair.ref_tokens is not None,
                "ld_alpha < 1 needs the reference's per-token log-probs (ref_token_logps): "
                "precomputed reference sums cannot be re-weighted",
            )
            ref_c, ref_r = _ld_sums(pair.ref_tokens, pair.token_mask, s.ld_alpha)
    loss_ref_c, loss_ref_r = (zeros, zeros) if s.reference_free else (ref_c, ref_r)

    def score(logratios: jax.Array) -> jax.Array:
        return reweighting.f_divergence_scores(
            logratios, s.f_divergence_type, s.f_alpha_divergence_coef
        )

    shift = jnp.zeros((), pi_c.dtype)
    if "bco_pair" in s.loss_type:
        rewards = s.beta * jnp.concatenate([pi_c - loss_ref_c, pi_r - loss_ref_r])
        shift = bco_shift(loss_state, rewards.mean())
    x = LossInputs(
        chosen_logps=pi_c,
        rejected_logps=pi_r,
        ref_chosen_logps=loss_ref_c,
        ref_rejected_logps=loss_ref_r,
        chosen_counts=jnp.maximum(counts_c, 1),
        rejected_counts=jnp.maximum(counts_r, 1),
        chosen_token_total=jnp.maximum(counts_c.sum(), 1),
        chosen_scores=score(pi_c - loss_ref_c),
        rejected_scores=score(pi_r - loss_ref_r),
        nll_chosen_logps=nll_c,
        reward_shift=shift,
    )
    return x, ref_c, ref_r


def _unpaired_inputs(s: DPOSettings, pair: PairLogps) -> LossInputs:
    _require(
        pair.labels is not None,
        f"loss_type={list(s.loss_type)} trains on unpaired examples and needs their labels "
        "(PairLogps.labels; standalone: flux_jax.losses.kto_loss)",
    )
    _require(
        pair.ref_chosen is not None and pair.ref_rejected is not None,
        f"loss_type={list(s.loss_type)} needs the reference log-probs (ref_chosen, ref_rejected)",
    )
    ones = jnp.ones_like(upcast(pair.policy_chosen))
    return unpaired.unpaired_inputs(
        pair.policy_chosen,
        pair.policy_rejected,
        pair.ref_chosen,
        pair.ref_rejected,
        pair.labels,
        ones if pair.chosen_counts is None else pair.chosen_counts,
        ones if pair.rejected_counts is None else pair.rejected_counts,
        needs_kl=s.needs_kl_rows,
    )


def _loss_metrics(s: DPOSettings, x: LossInputs) -> dict[str, jax.Array]:
    """Metrics the papers define for the selected losses."""
    m: dict[str, jax.Array] = {}
    if "bco_pair" in s.loss_type:
        rewards = s.beta * jnp.concatenate([x.chosen_logratios, x.rejected_logratios])
        m["bco/reward_mean"] = x.reward_shift
        m[BATCH_MEAN_METRIC] = rewards.mean()
    if "simpo" in s.loss_type:  # SimPO's reward margin, b * (a_c - a_r), before the target gamma
        a_c, a_r = x.chosen_logps / x.chosen_counts, x.rejected_logps / x.rejected_counts
        m["simpo/margin"] = (s.beta * (a_c - a_r)).mean()
    if "orpo" in s.loss_type:  # TRL's ORPO names
        log_odds = orpo_log_odds(x)
        m["orpo/log_odds_chosen"] = log_odds.mean()
        m["orpo/log_odds_ratio"] = jax.nn.log_sigmoid(log_odds).mean()
        m["orpo/nll_loss"] = (-x.nll_chosen_logps / x.chosen_counts).mean()
    if "cpo" in s.loss_type:
        m["cpo/nll_loss"] = x.chosen_token_nll().mean()
    return m


def preference_loss(
    s: DPOSettings, pair: PairLogps, loss_state: LossState | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sum_i w_i * mean(loss_i)` over the selected losses, and the reward metrics (no
    regularisers; see `training_objective`). Metrics carry no gradient."""
    if s.unpaired:
        return unpaired.unpaired_loss(s, _unpaired_inputs(s, pair))
    x, ref_c, ref_r = loss_inputs(s, pair, loss_state)
    weights_B = None
    if s.use_weighting:
        _require(pair.wpo_log_weights is not None, "use_weighting needs wpo_log_weights")
        log_w_c, log_w_r = jnp.split(upcast(pair.wpo_log_weights), 2)
        weights_B = jax.lax.stop_gradient(jnp.exp(log_w_c + log_w_r))

    loss = jnp.zeros((), x.chosen_logps.dtype)
    metrics: dict[str, jax.Array] = {}
    for spec, weight in zip(s.losses, s.loss_weights, strict=True):
        losses_B = spec.losses(x, s)
        if weights_B is not None:
            losses_B = losses_B * weights_B
        mean = losses_B.mean()
        loss = loss + weight * mean
        if len(s.loss_type) > 1:
            metrics[f"loss/{spec.name}"] = mean

    # Rewards as TRL: b * (logp - ref) with the reference passed in (even when reference_free);
    # per-token when every selected loss is length-normalised (IPO, SimPO, ORPO...).
    pi_c, pi_r = x.chosen_logps, x.rejected_logps
    if s.length_normalised:
        pi_c, pi_r = per_token(pi_c, x.chosen_counts), per_token(pi_r, x.rejected_counts)
        ref_c, ref_r = per_token(ref_c, x.chosen_counts), per_token(ref_r, x.rejected_counts)
    chosen_rewards_B, rejected_rewards_B = s.beta * (pi_c - ref_c), s.beta * (pi_r - ref_r)
    metrics.update(
        {
            "loss": loss,
            "chosen_reward": chosen_rewards_B.mean(),
            "rejected_reward": rejected_rewards_B.mean(),
            "reward_margin": (chosen_rewards_B - rejected_rewards_B).mean(),
            "reward_accuracy": (chosen_rewards_B > rejected_rewards_B).astype(loss.dtype).mean(),
            "chosen_logps": pi_c.mean(),
            "rejected_logps": pi_r.mean(),
            # TRL's names: the summed (LD-weighted) response log-probs, never per-token.
            "logps/chosen": x.chosen_logps.mean(),
            "logps/rejected": x.rejected_logps.mean(),
        }
    )
    if weights_B is not None:
        metrics["wpo/weight"] = weights_B.mean()
    metrics.update(_loss_metrics(s, x))
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def training_objective(
    s: DPOSettings, pair: PairLogps, loss_state: LossState | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`preference_loss` plus `sft_coef * sft_loss + kl_coef * kl_penalty`: what is trained.

    Returns `(loss, metrics)`: `loss` the total (fp32, or float64 for float64 inputs); `metrics`
    `preference_loss`'s with `loss` = the total and `dpo_loss` = the preference part, plus
    `sft_loss` / `kl` when their coefficient is > 0. A regulariser at 0 is not computed.
    """
    loss, metrics = preference_loss(s, pair, loss_state)
    metrics["dpo_loss"] = metrics["loss"]
    if s.sft_coef > 0:
        sft = sft_loss(pair.policy_chosen, pair.chosen_counts)
        loss = loss + s.sft_coef * sft
        metrics["sft_loss"] = jax.lax.stop_gradient(sft)
    if s.kl_coef > 0:
        _require(
            pair.policy_tokens is not None
            and pair.ref_tokens is not None
            and pair.token_mask is not None,
            "kl_coef > 0 needs policy_token_logps, ref_token_logps and token_loss_mask",
        )
        kl = kl_penalty(pair.policy_tokens, pair.ref_tokens, pair.token_mask)
        loss = loss + s.kl_coef * kl
        metrics["kl"] = jax.lax.stop_gradient(kl)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics
