"""The DPO loss family, its reward metrics and two optional regularisers, as pure functions.

Everything here takes log-probabilities (see `flux_jax.logprobs`) and returns jnp scalars; nothing
touches a model. The loss types follow TRL's `DPOTrainer.dpo_loss` exactly. Each is one function of
`h = (pi_c - pi_r) - (ref_c - ref_r)` (the ref terms are 0 when `reference_free`), registered by
name in `LOSSES` with its formula and paper in its docstring; the config's `algorithm.loss_type`
choices are the registry's names, so a new loss type is one decorated function here.

`DPOSettings` is every setting of the objective (and of the step computing it), built once from the
config; `dpo_loss_for` / `dpo_objective_for` take it. `dpo_loss` / `dpo_objective` are the same
functions with the settings as keyword arguments (the public API).

Regularisers (default off), combined with the DPO loss by `dpo_objective`:
  sft: mean over pairs of the chosen response's per-token NLL, `-chosen_logps / chosen_tokens`.
  kl:  mean over all response tokens (chosen and rejected) of the k3 estimator
       `exp(ref - pi) - (ref - pi) - 1` (>= 0 per token). k3 is an unbiased estimate of KL(pi||ref)
       only for tokens sampled from pi; our tokens come from the preference data, so this is a
       per-token "stay near the reference" penalty, not the exact KL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flux_jax.logprobs import DEFAULT_CHUNK_SIZE  # the one home of the 512 default

# (h_B, beta, label_smoothing) -> per-pair losses [B]
PairLosses = Callable[[jax.Array, float, float], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossType:
    """One registered loss: its per-pair function and what it needs from the inputs."""

    name: str
    losses: PairLosses
    # IPO: all four log-probs are divided by their response length before `h` (TRL does the same).
    length_normalised: bool = False
    # Whether `label_smoothing` enters the formula (TRL ignores it for the others; so do we).
    uses_label_smoothing: bool = False


LOSSES: dict[str, LossType] = {}


def register_loss(
    name: str, *, length_normalised: bool = False, uses_label_smoothing: bool = False
) -> Callable[[PairLosses], PairLosses]:
    """Registers `fn(h_B, beta, label_smoothing) -> losses_B` as loss type `name` (a decorator)."""

    def register(fn: PairLosses) -> PairLosses:
        if name in LOSSES:
            raise ValueError(f"loss type {name!r} is already registered ({LOSSES[name].losses})")
        LOSSES[name] = LossType(name, fn, length_normalised, uses_label_smoothing)
        return fn

    return register


@register_loss("sigmoid", uses_label_smoothing=True)
def sigmoid_loss(h_B: jax.Array, beta: float, label_smoothing: float) -> jax.Array:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290, eq. 7); cDPO (Mitchell 2023) when ls > 0.

    `-(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h)`
    """
    ls = label_smoothing
    return -(1 - ls) * jax.nn.log_sigmoid(beta * h_B) - ls * jax.nn.log_sigmoid(-beta * h_B)


@register_loss("ipo", length_normalised=True)
def ipo_loss(h_B: jax.Array, beta: float, label_smoothing: float) -> jax.Array:
    """IPO, Azar et al. 2023 (arXiv:2310.12036, eq. 17), on length-normalised log-probs.

    `(h - 1 / (2 * beta)) ** 2`; beta is the regularisation strength tau.
    """
    del label_smoothing
    return (h_B - 1 / (2 * beta)) ** 2


@register_loss("hinge")
def hinge_loss(h_B: jax.Array, beta: float, label_smoothing: float) -> jax.Array:
    """SLiC-HF's rank calibration loss, Zhao et al. 2023 (arXiv:2305.10425).

    `relu(1 - beta * h)`
    """
    del label_smoothing
    return jax.nn.relu(1 - beta * h_B)


@register_loss("robust", uses_label_smoothing=True)
def robust_loss(h_B: jax.Array, beta: float, label_smoothing: float) -> jax.Array:
    """rDPO, Chowdhury et al. 2024 (arXiv:2403.00409): unbiased under preference labels
    flipped with probability ls.

    `(-(1 - ls) * logsigmoid(beta * h) + ls * logsigmoid(-beta * h)) / (1 - 2 * ls)`
    """
    ls = label_smoothing
    return (-(1 - ls) * jax.nn.log_sigmoid(beta * h_B) + ls * jax.nn.log_sigmoid(-beta * h_B)) / (
        1 - 2 * ls
    )


# The built-in loss types, in registration order (the config schema's choices).
LOSS_TYPES = tuple(LOSSES)


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """Every setting of the DPO objective and of the step that computes it; static under jit.

    Built once from the config (`from_config`) and passed whole to the train step, the periodic
    eval, `flux-jax eval` and `dpo_loss_for` / `dpo_objective_for`. Checked on construction.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    sft_coef: float = 0.0
    kl_coef: float = 0.0
    # Positions per LM-head chunk (None = unchunked); see flux_jax.logprobs.
    logprob_chunk_size: int | None = DEFAULT_CHUNK_SIZE
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        # Static config values: checked in Python, before anything is traced.
        if self.loss_type not in LOSSES:
            raise ValueError(
                f"unknown loss_type {self.loss_type!r}; valid loss types: {list(LOSSES)}"
            )
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_coef < 0 or self.kl_coef < 0:
            raise ValueError(
                f"sft_coef and kl_coef must be >= 0, got {self.sft_coef} and {self.kl_coef}"
            )

    @property
    def loss(self) -> LossType:
        return LOSSES[self.loss_type]

    @classmethod
    def from_config(cls, config: Any, *, logprob_chunk_size: int | None) -> DPOSettings:
        """The settings of a FluxConfig; `logprob_chunk_size` is the chunk after the memory cap
        (it depends on the mesh and the vocabulary, which the config alone does not know)."""
        a = config.algorithm
        return cls(
            loss_type=a.loss_type,
            beta=a.beta,
            label_smoothing=a.label_smoothing,
            reference_free=a.reference_free,
            sft_coef=a.sft_coef,
            kl_coef=a.kl_coef,
            logprob_chunk_size=logprob_chunk_size,
            grad_accum_steps=config.grad_accum_steps,
        )


def _upcast(x: jax.Array) -> jax.Array:
    # At least fp32 (bf16 log-probs would round away the small differences DPO is made of), but
    # keep float64 so finite-difference tests can run in x64 mode.
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _per_token(logps_B: jax.Array, token_counts_B: jax.Array) -> jax.Array:
    # A pair with no response tokens has logps 0; dividing by 1 keeps it 0 instead of NaN.
    return logps_B / jnp.maximum(token_counts_B, 1).astype(logps_B.dtype)


def dpo_loss_for(
    settings: DPOSettings,
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    chosen_token_counts: jax.Array | None = None,
    rejected_token_counts: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`dpo_loss` with its loss settings taken from `settings` (see `dpo_loss` for the rest)."""
    loss_type, beta = settings.loss, settings.beta
    pi_c = _upcast(policy_chosen_logps)
    pi_r = _upcast(policy_rejected_logps)
    ref_c = _upcast(ref_chosen_logps)
    ref_r = _upcast(ref_rejected_logps)

    if loss_type.length_normalised:
        if chosen_token_counts is None or rejected_token_counts is None:
            raise ValueError(
                f"loss_type={loss_type.name!r} needs chosen_token_counts and rejected_token_counts"
            )
        # TRL normalises both policy and reference log-probs by length for IPO (its
        # concatenated_forward divides all_logps by the mask sum), so we do the same.
        pi_c, ref_c = _per_token(pi_c, chosen_token_counts), _per_token(ref_c, chosen_token_counts)
        pi_r = _per_token(pi_r, rejected_token_counts)
        ref_r = _per_token(ref_r, rejected_token_counts)

    ref_logratio_B = jnp.zeros_like(pi_c) if settings.reference_free else ref_c - ref_r
    h_B = (pi_c - pi_r) - ref_logratio_B
    loss = loss_type.losses(h_B, beta, settings.label_smoothing).mean()

    chosen_rewards_B = jax.lax.stop_gradient(beta * (pi_c - ref_c))
    rejected_rewards_B = jax.lax.stop_gradient(beta * (pi_r - ref_r))
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "chosen_reward": chosen_rewards_B.mean(),
        "rejected_reward": rejected_rewards_B.mean(),
        "reward_margin": (chosen_rewards_B - rejected_rewards_B).mean(),
        "reward_accuracy": (chosen_rewards_B > rejected_rewards_B).astype(jnp.float32).mean(),
        "chosen_logps": jax.lax.stop_gradient(pi_c).mean(),
        "rejected_logps": jax.lax.stop_gradient(pi_r).mean(),
    }
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_token_counts: jax.Array | None = None,
    rejected_token_counts: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO-family loss, averaged over the batch of pairs, and TRL's reward metrics.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B]
        summed response log-probs (`sequence_logprobs`) under the policy and the reference.
      loss_type: one of `LOSS_TYPES` (the functions registered in `LOSSES` give the formulas).
      beta: inverse temperature (DPO/hinge) or regularisation strength tau (IPO). A Python float.
      label_smoothing: assumed probability that a preference label is flipped, in [0, 0.5).
      reference_free: drop the reference from `h` (an implicit uniform reference). As in TRL the
        reward metrics still use the ref log-probs passed in; a caller without a reference model
        passes zeros, which makes the rewards `beta * policy_logps`.
      chosen_token_counts, rejected_token_counts: [B] response token counts. Required for `ipo`:
        following TRL, IPO divides all four log-probs by their response length before the loss
        (and the metrics then report those per-token values). Ignored by the other loss types.

    Returns:
      `(loss, metrics)`: `loss` is a float32 scalar (float64 for float64 inputs). `metrics` holds
      scalars of the same dtype, batch means:
      `loss`, `chosen_reward` (beta * mean(pi_c - ref_c)), `rejected_reward`, `reward_margin`
      (chosen_reward - rejected_reward), `reward_accuracy` (fraction of pairs whose chosen reward
      exceeds the rejected one), `chosen_logps`, `rejected_logps`. Metrics carry no gradient.

    The ref log-probs are not stop-gradient'ed here: the train step simply does not differentiate
    with respect to them (they come from the frozen reference model).
    """
    settings = DPOSettings(
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
    )
    return dpo_loss_for(
        settings,
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_token_counts=chosen_token_counts,
        rejected_token_counts=rejected_token_counts,
    )


def sft_loss(chosen_logps: jax.Array, chosen_token_counts: jax.Array) -> jax.Array:
    """Mean over pairs of the chosen response's per-token NLL (each pair weighs the same)."""
    return -_per_token(_upcast(chosen_logps), chosen_token_counts).mean()


def kl_penalty(
    policy_token_logps_NxT: jax.Array,
    ref_token_logps_NxT: jax.Array,
    loss_mask_NxT: jax.Array,
) -> jax.Array:
    """k3 estimate `exp(ref - pi) - (ref - pi) - 1`, averaged over every response token.

    Args:
      policy_token_logps_NxT, ref_token_logps_NxT: per-token log-probs (`token_logprobs`) of the
        same N sequences; typically N = 2B, the chosen and rejected halves of a DPO batch.
      loss_mask_NxT: the mask those were computed with. Column 0 is ignored, as in `logprobs`.

    Tokens are weighted equally, so long responses weigh more than short ones. The result is >= 0
    and 0 iff pi == ref on every response token; see the module docstring for why it is only a
    regulariser here.
    """
    mask_NxT = loss_mask_NxT.astype(bool).at[:, 0].set(False)
    log_ratio_NxT = _upcast(ref_token_logps_NxT) - _upcast(policy_token_logps_NxT)
    # Zero the ratio off-mask before exp so padding can never overflow into inf * 0 = NaN.
    log_ratio_NxT = jnp.where(mask_NxT, log_ratio_NxT, 0.0)
    k3_NxT = jnp.exp(log_ratio_NxT) - log_ratio_NxT - 1.0
    num_tokens = jnp.maximum(mask_NxT.sum(), 1).astype(log_ratio_NxT.dtype)
    return jnp.where(mask_NxT, k3_NxT, 0.0).sum() / num_tokens


def dpo_objective_for(
    settings: DPOSettings,
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    chosen_token_counts: jax.Array | None = None,
    rejected_token_counts: jax.Array | None = None,
    policy_token_logps: jax.Array | None = None,
    ref_token_logps: jax.Array | None = None,
    token_loss_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`dpo_objective` with its loss settings and coefficients taken from `settings`."""
    loss, dpo_metrics = dpo_loss_for(
        settings,
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_token_counts=chosen_token_counts,
        rejected_token_counts=rejected_token_counts,
    )
    metrics = dict(dpo_metrics, dpo_loss=dpo_metrics["loss"])
    if settings.sft_coef > 0:
        if chosen_token_counts is None:
            raise ValueError("sft_coef > 0 needs chosen_token_counts")
        sft = sft_loss(policy_chosen_logps, chosen_token_counts)
        loss = loss + settings.sft_coef * sft
        metrics["sft_loss"] = jax.lax.stop_gradient(sft)
    if settings.kl_coef > 0:
        if policy_token_logps is None or ref_token_logps is None or token_loss_mask is None:
            raise ValueError(
                "kl_coef > 0 needs policy_token_logps, ref_token_logps and token_loss_mask"
            )
        kl = kl_penalty(policy_token_logps, ref_token_logps, token_loss_mask)
        loss = loss + settings.kl_coef * kl
        metrics["kl"] = jax.lax.stop_gradient(kl)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def dpo_objective(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_token_counts: jax.Array | None = None,
    rejected_token_counts: jax.Array | None = None,
    sft_coef: float = 0.0,
    kl_coef: float = 0.0,
    policy_token_logps: jax.Array | None = None,
    ref_token_logps: jax.Array | None = None,
    token_loss_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`dpo_loss` plus `sft_coef * sft_loss + kl_coef * kl_penalty`: the training objective.

    DPO arguments are passed through to `dpo_loss`. Extra inputs:
      sft_coef: needs `chosen_token_counts`. Uses the raw summed chosen log-probs (never the IPO
        length-normalised ones).
      kl_coef: needs `policy_token_logps`, `ref_token_logps` and `token_loss_mask`, all [N, T]
        (the `token_logprobs` outputs for the chosen and rejected sequences, concatenated).
    A regulariser whose coefficient is 0 is not computed and adds no metric.

    Returns `(loss, metrics)` where `loss` is the total; `metrics` has `dpo_loss`'s entries with
    `loss` replaced by the total and `dpo_loss` added, plus `sft_loss` and/or `kl` when enabled.
    """
    settings = DPOSettings(
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        sft_coef=sft_coef,
        kl_coef=kl_coef,
    )
    return dpo_objective_for(
        settings,
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_token_counts=chosen_token_counts,
        rejected_token_counts=rejected_token_counts,
        policy_token_logps=policy_token_logps,
        ref_token_logps=ref_token_logps,
        token_loss_mask=token_loss_mask,
    )
