"""Preference losses that need no reference model at all: SimPO, CPO, ORPO.

With only these (and `sft`) selected, `algorithm.reference_free` must be true and flux_jax loads
no reference weights and runs no reference forward. TRL 1.16 has them in separate trainers
(`trl.experimental.cpo.CPOTrainer` for CPO and SimPO, `trl.experimental.orpo.ORPOTrainer`);
here they are losses like the others, so they combine with the rest (`loss_type: [simpo, sft]`).
Notation as flux_jax.losses.pairwise; `a = logp / n` is a per-token (length-normalised)
log-prob.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from flux_jax.losses.pairwise import _smoothed_logistic
from flux_jax.losses.registry import LossInputs, register_loss

if TYPE_CHECKING:
    from flux_jax.losses.settings import DPOSettings


@register_loss(
    "simpo",
    needs_reference=False,
    length_normalised=True,
    uses_label_smoothing=True,
    extra_keys=("simpo_gamma",),
    trl="CPOTrainer(loss_type='simpo')",
)
def simpo_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734, eq. 6): a length-normalised reward with a target
    margin gamma = `simpo_gamma`, no reference.

    `smoothed_logistic(b * (a_c - a_r) - gamma, ls)` (ls = 0 is the paper's loss; ls > 0 as TRL's
    CPOTrainer). The paper's NLL-free form: TRL's CPOTrainer adds `cpo_alpha` x NLL (1.0 by
    default) unless set to 0; here add `sft` to the loss list for that (CPO-SimPO).
    """
    a_c, a_r = x.chosen_logps / x.chosen_counts, x.rejected_logps / x.rejected_counts
    return _smoothed_logistic(s.beta * (a_c - a_r) - s.simpo_gamma, s.label_smoothing)


@register_loss(
    "cpo",
    needs_reference=False,
    uses_label_smoothing=True,
    extra_keys=("cpo_alpha",),
    trl="CPOTrainer(loss_type='sigmoid')",
)
def cpo_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """CPO, Xu et al. 2024 (arXiv:2401.08417, eqs. 3 and 6): DPO with a uniform reference plus a
    behaviour-cloning NLL on the chosen responses weighted by alpha = `cpo_alpha`.

    `smoothed_logistic(b * (logp_c - logp_r), ls) + alpha * NLL_tok(chosen)`

    NLL_tok is the token mean over the batch's chosen tokens, as the authors' code (TRL's
    CPOTrainer: a cross-entropy over the chosen labels); the paper writes it as an expectation of
    the sequence log-likelihood without fixing the normalisation.
    """
    pref = _smoothed_logistic(s.beta * (x.chosen_logps - x.rejected_logps), s.label_smoothing)
    return pref + s.cpo_alpha * x.chosen_token_nll()


def log1mexp(a: jax.Array) -> jax.Array:
    """`log(1 - exp(a))` for a < 0, without cancellation (Maechler 2012: branch at -ln 2)."""
    t = -math.log(2.0)
    # Both branches get safe inputs so the unused one never puts a NaN into the gradient.
    low = jnp.where(a < t, a, t)
    high = jnp.where(a < t, t, a)
    return jnp.where(a < t, jnp.log1p(-jnp.exp(low)), jnp.log(-jnp.expm1(high)))


def orpo_log_odds(x: LossInputs) -> jax.Array:
    """`log(odds(y_c) / odds(y_r))` per pair, `odds(y) = P / (1 - P)` with `P = exp(a)`
    (ORPO eq. 4 with the length-normalised likelihood of eq. 2)."""
    a_c, a_r = x.chosen_logps / x.chosen_counts, x.rejected_logps / x.rejected_counts
    return (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))


@register_loss(
    "orpo",
    needs_reference=False,
    length_normalised=True,
    trl="ORPOTrainer",
)
def orpo_loss(x: LossInputs, s: DPOSettings) -> jax.Array:
    """ORPO, Hong et al. 2024 (arXiv:2403.07691, eqs. 2, 6, 7): the per-token NLL of the chosen
    response plus lambda = `beta` times the odds-ratio loss (TRL's ORPOConfig.beta is lambda too;
    the paper's default 0.1 is `algorithm.beta`'s).

    `-a_c - b * logsig(log_odds)`, `log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))`

    Departs from TRL, whose NLL is a token mean over the batch; the paper's L_SFT (eq. 2) is each
    sequence's per-token NLL, averaged over pairs, as here. With equal response lengths they agree.
    """
    nll = -x.nll_chosen_logps / x.chosen_counts
    return nll - s.beta * jax.nn.log_sigmoid(orpo_log_odds(x))
