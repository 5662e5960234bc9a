"""The preference-optimisation loss family, as pure functions of log-probabilities.

  registry.py        LossType, LOSSES, register_loss, LossInputs: every loss by name, with what
                     it needs (reference? length-normalised? label smoothing? extra keys?)
  pairwise.py        TRL 1.16 DPOTrainer's losses: sigmoid, hinge, ipo, exo_pair, nca_pair,
                     robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
                     discopop, sft, sigmoid_norm
  reference_free.py  losses with no reference model at all: simpo, cpo, orpo
  unpaired.py        losses on unpaired (labelled) completions: kto, apo_zero_unpaired
  reweighting.py     f-DPO scores, LD-DPO token weights, WPO pair weights
  regularisers.py    sft_coef's NLL and kl_coef's k3 penalty
  state.py           BCO's running reward mean (carried in the train state)
  settings.py        DPOSettings: every setting, checked against the registry
  objective.py       PairLogps and the objective: weighted losses + regularisers + metrics

Nothing here touches a model; `flux_jax.dpo` is the public face (`dpo_loss`, `dpo_objective`).
"""

from flux_jax.losses import pairwise, reference_free, unpaired  # noqa: F401  (registers)
from flux_jax.losses.objective import PairLogps, preference_loss, training_objective
from flux_jax.losses.registry import LOSSES, LossInputs, LossType, loss_names, register_loss
from flux_jax.losses.regularisers import kl_penalty, sft_loss
from flux_jax.losses.settings import F_DIVERGENCES, DPOSettings, settings_problems
from flux_jax.losses.state import initial_loss_state, next_loss_state
from flux_jax.losses.unpaired import kto_loss

__all__ = [
    "F_DIVERGENCES",
    "LOSSES",
    "DPOSettings",
    "LossInputs",
    "LossType",
    "PairLogps",
    "initial_loss_state",
    "kl_penalty",
    "kto_loss",
    "loss_names",
    "next_loss_state",
    "preference_loss",
    "register_loss",
    "settings_problems",
    "sft_loss",
    "training_objective",
]
