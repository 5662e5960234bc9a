"""The unpaired preference losses (`data.format: unpaired`): KTO and TRL's apo_zero_unpaired.

KTO, Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv:2402.01306, eq. 7-8), as TRL 1.16's `KTOTrainer._compute_loss`. Each example is one
completion y of a prompt x with a label (desirable or undesirable); with the log-ratio
`r = logp(y|x) - ref(y|x)` and the reference point `z0`:

    desirable:    loss = desirable_weight   * (1 - sig(b * (r - z0)))
    undesirable:  loss = undesirable_weight * (1 - sig(b * (z0 - r)))
    objective     = the mean of the weighted losses over the batch's examples (TRL's nanmean)

`z0` estimates KL(policy || reference) on mismatched pairs: in a micro-batch of m examples the
KL row of example i is its prompt with another example's completion (flux_jax.data.unpaired
builds them as TRL does, completions rotated by one), and
`z0 = max(0, mean_i (logp(y'_i|x_i) - ref(y'_i|x_i)))`, with no gradient (the paper's
estimate; TRL averages per device, then over devices: on a mesh our micro-batch mean is that
same global mean).

apo_zero_unpaired (D'Oosterlinck et al. 2024, "Anchored Preference Optimization",
arXiv:2408.06266, eq. 7, unpaired as in TRL): desirable `1 - sig(b r)`, undesirable `sig(b r)`;
no KL rows are needed, but the batch layout keeps them (one layout for every unpaired loss).

In the standard [2B, T] layout the "chosen" rows hold the examples' own completions and the
"rejected" rows their KL rows, so `LossInputs.chosen_*` are the target log-probs and
`LossInputs.rejected_*` the KL rows'; `labels` [B] says which examples are desirable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from flux_jax.losses.registry import LossInputs, register_loss
from flux_jax.losses.regularisers import upcast

if TYPE_CHECKING:
    from flux_jax.losses.settings import DPOSettings

UNPAIRED_KEYS = ("desirable_weight", "undesirable_weight")


def _labels(x: LossInputs) -> jax.Array:
    if x.labels is None:
        raise ValueError("an unpaired loss needs the examples' labels (LossInputs.labels)")
    return x.labels.astype(bool)


@register_loss("kto", unpaired=True, extra_keys=UNPAIRED_KEYS, trl="KTOTrainer")
def kto_losses(x: LossInputs, s: DPOSettings) -> jax.Array:
    """KTO (arXiv:2402.01306, eq. 7-8; TRL 1.16 `loss_type="kto"`): see the module docstring."""
    r, z0, desirable = x.chosen_logratios, x.kl_baseline, _labels(x)
    if z0 is None:
        raise ValueError("loss_type 'kto' needs the KL baseline (LossInputs.kl_baseline)")
    return jnp.where(
        desirable,
        s.desirable_weight * (1 - jax.nn.sigmoid(s.beta * (r - z0))),
        s.undesirable_weight * (1 - jax.nn.sigmoid(s.beta * (z0 - r))),
    )


@register_loss("apo_zero_unpaired", unpaired=True, extra_keys=UNPAIRED_KEYS, trl="KTOTrainer")
def apo_zero_unpaired_losses(x: LossInputs, s: DPOSettings) -> jax.Array:
    """APO-zero, unpaired (arXiv:2408.06266 eq. 7; TRL 1.16 `loss_type="apo_zero_unpaired"`):
    desirable `dw * (1 - sig(b r))`, undesirable `uw * sig(b r)`; no KL baseline."""
    r, desirable = x.chosen_logratios, _labels(x)
    return jnp.where(
        desirable,
        s.desirable_weight * (1 - jax.nn.sigmoid(s.beta * r)),
        s.undesirable_weight * jax.nn.sigmoid(s.beta * r),
    )


def kl_baseline(policy_kl_logps: jax.Array, ref_kl_logps: jax.Array) -> jax.Array:
    """KTO's z0: `max(0, mean(policy - reference))` over the KL rows, without gradient."""
    kl = (upcast(policy_kl_logps) - upcast(ref_kl_logps)).mean()
    return jax.lax.stop_gradient(jnp.maximum(kl, 0))


def unpaired_inputs(
    policy_logps: jax.Array,
    policy_kl_logps: jax.Array,
    ref_logps: jax.Array,
    ref_kl_logps: jax.Array,
    labels: jax.Array,
    counts: jax.Array,
    kl_counts: jax.Array,
    *,
    needs_kl: bool,
) -> LossInputs:
    """The `LossInputs` of an unpaired batch (chosen = the examples, rejected = the KL rows)."""
    pi, pi_kl = upcast(policy_logps), upcast(policy_kl_logps)
    ref, ref_kl = upcast(ref_logps), upcast(ref_kl_logps)
    return LossInputs(
        chosen_logps=pi,
        rejected_logps=pi_kl,
        ref_chosen_logps=ref,
        ref_rejected_logps=ref_kl,
        chosen_counts=jnp.maximum(upcast(counts), 1),
        rejected_counts=jnp.maximum(upcast(kl_counts), 1),
        chosen_token_total=jnp.maximum(upcast(counts).sum(), 1),
        chosen_scores=pi - ref,
        rejected_scores=pi_kl - ref_kl,
        nll_chosen_logps=pi,
        reward_shift=jnp.zeros((), pi.dtype),
        labels=jnp.asarray(labels).astype(bool),
        kl_baseline=kl_baseline(pi_kl, ref_kl) if needs_kl else jnp.zeros((), pi.dtype),
    )


def _group_mean(values_B: jax.Array, in_group_B: jax.Array) -> jax.Array:
    """Mean of `values_B` over the group; 0 for an empty group (TRL logs nothing then)."""
    count = in_group_B.sum()
    return jnp.where(in_group_B, values_B, 0).sum() / jnp.maximum(count, 1)


def unpaired_metrics(s: DPOSettings, x: LossInputs, loss: jax.Array) -> dict[str, jax.Array]:
    """TRL's KTO metrics (`kl`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
    `logps/chosen`, `logps/rejected`; chosen = desirable, rejected = undesirable) and ours:
    `loss`, `chosen_reward`/`rejected_reward`/`reward_margin`/`chosen_logps`/`rejected_logps`
    (the same values under the paired names) and `desirable_fraction`. A group the batch lacks
    reads 0 (TRL skips the value). No `reward_accuracy`: unpaired data has no pairs to rank."""
    desirable = _labels(x)
    rewards_B = s.beta * x.chosen_logratios
    chosen_reward = _group_mean(rewards_B, desirable)
    rejected_reward = _group_mean(rewards_B, ~desirable)
    chosen_logps = _group_mean(x.chosen_logps, desirable)
    rejected_logps = _group_mean(x.chosen_logps, ~desirable)
    metrics = {
        "loss": loss,
        "kl": x.kl_baseline,
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "reward_margin": chosen_reward - rejected_reward,
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "desirable_fraction": desirable.astype(loss.dtype).mean(),
    }
    return jax.tree.map(jax.lax.stop_gradient, metrics)


def unpaired_loss(s: DPOSettings, x: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sum_i loss_weights[i] * mean(loss_i)` over the selected unpaired losses, and the
    metrics (`unpaired_metrics`, plus `loss/<name>` with several losses)."""
    loss = jnp.zeros((), x.chosen_logps.dtype)
    per_loss = {}
    for spec, weight in zip(s.losses, s.loss_weights, strict=True):
        mean = spec.losses(x, s).mean()
        loss = loss + weight * mean
        per_loss[f"loss/{spec.name}"] = jax.lax.stop_gradient(mean)
    metrics = unpaired_metrics(s, x, loss)
    if len(s.loss_type) > 1:
        metrics.update(per_loss)
    return loss, metrics


def kto_loss(
    policy_logps: jax.Array,
    policy_kl_logps: jax.Array,
    ref_logps: jax.Array,
    ref_kl_logps: jax.Array,
    labels: jax.Array,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The unpaired loss of one batch from summed log-probs [B] (the public pure function):
    `policy_logps` / `ref_logps` of each example's completion, `policy_kl_logps` /
    `ref_kl_logps` of its KL row, `labels` [B] bool (true = desirable). Returns (loss, metrics)."""
    from flux_jax.losses.settings import DPOSettings

    s = DPOSettings(
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    ones = jnp.ones_like(upcast(policy_logps))
    x = unpaired_inputs(
        policy_logps,
        policy_kl_logps,
        ref_logps,
        ref_kl_logps,
        labels,
        ones,
        ones,
        needs_kl=s.needs_kl_rows,
    )
    return unpaired_loss(s, x)
