"""The preference losses of TRL 1.16's `DPOTrainer` (`loss_type`), one function each.

Each reads `LossInputs` (see flux_jax.losses.registry) and returns per-pair losses [B]; the
objective averages them. Notation: `r_c = logp_c - ref_c`, `r_r = logp_r - ref_r` (the log-ratios;
ref = 0 when reference-free), `h = s_c - s_r` (the f-divergence scores' difference; `= r_c - r_r`
for reverse KL, the default), `b = beta`, `ls = label_smoothing`, `sig` = sigmoid,
`logsig` = log-sigmoid. Semantics and defaults are TRL 1.16's (trl/trainer/dpo_trainer.py,
`_compute_loss`) except where a docstring says "departs": there the paper is followed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from flux_jax.losses.registry import LossInputs, register_loss

if TYPE_CHECKING:
    from flux_jax.losses.settings import DPOSettings

logsig = jax.nn.log_sigmoid


def _smoothed_logistic(z: jax.Array, ls: float) -> jax.Array:
    # -(1 - ls) * logsig(z) - ls * logsig(-z): the logistic loss against labels flipped w.p. ls.
    return -(1 - ls) * logsig(z) - ls * logsig(-z)


@register_loss("sigmoid", uses_label_smoothing=True, supports_f_divergence=True)
def sigmoid_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290, eq. 7); cDPO (Mitchell 2023, "A note on DPO
    with noisy preferences") when ls > 0.

    `-(1 - ls) * logsig(b * h) - ls * logsig(-b * h)`

    Departs from TRL 1.16, whose `sigmoid` ignores label_smoothing: with ls > 0 this is cDPO (as
    TRL < 0.20 did). At ls = 0 (the default) the two are identical.
    """
    return _smoothed_logistic(s.beta * x.delta_score, s.label_smoothing)


@register_loss("ipo", length_normalised=True, supports_f_divergence=True)
def ipo_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """IPO, Azar et al. 2023 (arXiv:2310.12036, eq. 17), on per-token scores (TRL: the IPO
    authors confirmed the length-normalised form is the one their results use).

    `(h_tok - 1 / (2 * b)) ** 2`, `h_tok = s_c / n_c - s_r / n_r`; b is the regulariser tau.
    """
    return (x.delta_score_per_token - 1 / (2 * s.beta)) ** 2


@register_loss("hinge", supports_f_divergence=True)
def hinge_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """SLiC-HF's rank calibration loss, Zhao et al. 2023 (arXiv:2305.10425, eq. 2), on the DPO
    log-ratio difference with margin 1 / b.

    `relu(1 - b * h)`
    """
    return jax.nn.relu(1 - s.beta * x.delta_score)


@register_loss("robust", uses_label_smoothing=True, supports_f_divergence=True)
def robust_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """rDPO, Chowdhury et al. 2024 (arXiv:2403.00409, eq. 9): unbiased under preference labels
    flipped with probability ls.

    `(-(1 - ls) * logsig(b h) + ls * logsig(-b h)) / (1 - 2 ls)`
    """
    z, ls = s.beta * x.delta_score, s.label_smoothing
    return (-(1 - ls) * logsig(z) + ls * logsig(-z)) / (1 - 2 * ls)


@register_loss(
    "exo_pair",
    uses_label_smoothing=True,
    needs_label_smoothing=True,
    supports_f_divergence=True,
)
def exo_pair_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """EXO-pref, Ji et al. 2024 (arXiv:2402.00856, eq. 16): KL(p_f || p_rh) over {chosen, rejected}
    with `p_f = softmax(b * [s_c, s_r])` and the smoothed labels `p_rh = [1 - eps, eps]`, eps = ls
    (the paper recommends 1e-3; it must be > 0).

    `sig(b h) * (logsig(b h) - log(1 - eps)) + sig(-b h) * (logsig(-b h) - log(eps))`
    """
    z, eps = s.beta * x.delta_score, s.label_smoothing
    return jax.nn.sigmoid(z) * (logsig(z) - math.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        logsig(-z) - math.log(eps)
    )


@register_loss("nca_pair")
def nca_pair_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """NCA, Chen et al. 2024 (arXiv:2402.05369, eq. 11 with K = 2): absolute rewards, not their
    difference.

    `-logsig(b r_c) - 0.5 * logsig(-b r_c) - 0.5 * logsig(-b r_r)`
    """
    rc, rr = s.beta * x.chosen_logratios, s.beta * x.rejected_logratios
    return -logsig(rc) - 0.5 * logsig(-rc) - 0.5 * logsig(-rr)


@register_loss("bco_pair")
def bco_pair_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """BCO, Jung et al. 2024 (arXiv:2404.04656, eq. 8): a binary classifier on the rewards,
    shifted by delta, the running mean of the rewards seen so far (flux_jax.losses.state).

    `-logsig(b r_c - delta) - logsig(-(b r_r - delta))`

    Departs from TRL 1.16, which dropped the shift (delta = 0); TRL < 0.20 and the paper use the
    running mean: one update per batch with the batch's mean reward (chosen and rejected
    together), before the loss.
    """
    rc, rr = s.beta * x.chosen_logratios, s.beta * x.rejected_logratios
    return -logsig(rc - x.reward_shift) - logsig(-(rr - x.reward_shift))


@register_loss("sppo_hard")
def sppo_hard_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """SPPO with hard win probabilities, Wu et al. 2024 (arXiv:2405.00675, eq. 4.7 with
    P(chosen wins) = 1, P(rejected wins) = 0, eta = 1 / b).

    `(r_c - 1 / (2 b)) ** 2 + (r_r + 1 / (2 b)) ** 2`
    """
    return (x.chosen_logratios - 0.5 / s.beta) ** 2 + (x.rejected_logratios + 0.5 / s.beta) ** 2


@register_loss("aot", uses_label_smoothing=True, supports_weighting=False)
def aot_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """AOT (paired), Melnyk et al. 2024 (arXiv:2406.05882, sec. 3): first-order stochastic
    dominance of the policy's over the reference's log-ratio distribution, by sorting over the
    batch (a one-dimensional optimal-transport plan).

    `smoothed_logistic(b * (sort(logp_c - logp_r) - sort(ref_c - ref_r)), ls)`
    """
    u = jnp.sort(x.chosen_logps - x.rejected_logps)
    v = jnp.sort(x.ref_chosen_logps - x.ref_rejected_logps)
    return _smoothed_logistic(s.beta * (u - v), s.label_smoothing)


@register_loss("aot_unpaired", uses_label_smoothing=True, supports_weighting=False)
def aot_unpaired_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """AOT (unpaired), Melnyk et al. 2024 (arXiv:2406.05882, sec. 3): the chosen log-ratios'
    distribution dominates the rejected ones', by sorting each over the batch.

    `smoothed_logistic(b * (sort(r_c) - sort(r_r)), ls)`
    """
    delta = jnp.sort(x.chosen_logratios) - jnp.sort(x.rejected_logratios)
    return _smoothed_logistic(s.beta * delta, s.label_smoothing)


@register_loss("apo_zero")
def apo_zero_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266, eq. 7): push chosen up and rejected
    down (chosen outputs better than the model's).

    `1 - sig(b r_c) + sig(b r_r)`

    As TRL: the paper writes it without the constant 1, which has no gradient; with it the loss
    is >= 0, which the divergence watch (a ratio to the first loss) needs.
    """
    return (
        1
        - jax.nn.sigmoid(s.beta * x.chosen_logratios)
        + jax.nn.sigmoid(s.beta * x.rejected_logratios)
    )


@register_loss("apo_down")
def apo_down_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266, eq. 8): push both down, rejected
    more (chosen outputs worse than the model's).

    `sig(b r_c) + 1 - sig(b (r_c - r_r))` (the constant 1 as in `apo_zero`).
    """
    rc, rr = x.chosen_logratios, x.rejected_logratios
    return jax.nn.sigmoid(s.beta * rc) + 1 - jax.nn.sigmoid(s.beta * (rc - rr))


@register_loss("discopop", supports_f_divergence=True, extra_keys=("discopop_tau",))
def discopop_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """DiscoPOP / log-ratio modulated loss, Chris Lu et al. 2024 (arXiv:2406.08414, eq. 5), tau =
    `discopop_tau` (the paper's 0.05 by default).

    `rho = b h; (1 - sig(rho / tau)) * -logsig(rho) + sig(rho / tau) * exp(-rho)`

    The second term is computed as `exp(logsig(rho / tau) - rho)`: the same value, but finite in
    fp32 where TRL's `sig(rho / tau) * exp(-rho)` gives 0 * inf = NaN (rho < -88).
    """
    rho, tau = s.beta * x.delta_score, s.discopop_tau
    # sig(rho / tau) * exp(-rho) in log space: exp(-rho) alone overflows for rho < -88 (fp32),
    # where its weight is ~0 and 0 * inf would be NaN (TRL's form does that).
    exp_part = jnp.exp(logsig(rho / tau) - rho)
    return jax.nn.sigmoid(-rho / tau) * -logsig(rho) + exp_part


@register_loss("sft", needs_reference=False, supports_f_divergence=True)
def sft_nll_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """NLL of the chosen responses, the SFT term of MPO (Wang et al. 2024, arXiv:2411.10442) and
    of RPO (Pang et al. 2024, arXiv:2404.19733) when combined with `sigmoid`.

    `-sum(logp_c) / sum(n_c)`: a token mean over the batch, as TRL (so long responses weigh
    more; `algorithm.sft_coef` instead averages each pair's per-token NLL).
    """
    del s
    return x.chosen_token_nll()


@register_loss("sigmoid_norm", length_normalised=True, supports_f_divergence=True)
def sigmoid_norm_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """Length-normalised DPO, Tülu 3 (Lambert et al. 2024, arXiv:2411.15124, sec. 5.1.2): DPO on
    per-token scores.

    `-logsig(b * (s_c / n_c - s_r / n_r))`
    """
    return -logsig(s.beta * x.delta_score_per_token)
