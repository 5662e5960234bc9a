"""The loss registry: every preference loss by name, with what it needs from the inputs.

A loss is one function `fn(x: LossInputs, s: DPOSettings) -> per-pair losses [B]`, registered by
name with `register_loss`; `algorithm.loss_type` chooses among the registry's names (one, or a
weighted list: TRL's MPO). `LossInputs` is everything a loss may read, computed once per batch by
`flux_jax.losses.objective`; the registry entry says which of those a loss needs, so the
objective, the config checks and the docs ask the registry instead of naming losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from flux_jax.losses.settings import DPOSettings


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """Everything a registered loss may read, per pair [B], in fp32 or wider.

    `chosen_logps` / `rejected_logps` are the policy's summed response log-probs (LD-DPO weighted
    when `ld_alpha < 1`); `ref_*` the reference's, zeros when `reference_free`. The scores are the
    f-divergence transforms of the log-ratios (the log-ratios themselves for reverse KL, the
    default). `nll_chosen_logps` are the raw summed chosen log-probs (never LD-weighted), for the
    NLL terms. `reward_shift` is BCO's running reward mean (0 unless `bco_pair` is selected).
    """

    chosen_logps: jax.Array
    rejected_logps: jax.Array
    ref_chosen_logps: jax.Array
    ref_rejected_logps: jax.Array
    chosen_counts: jax.Array  # response tokens per pair, float, >= 1 (clamped: never divides by 0)
    rejected_counts: jax.Array
    chosen_token_total: jax.Array  # scalar: the batch's chosen response tokens (unclamped, >= 1)
    chosen_scores: jax.Array
    rejected_scores: jax.Array
    nll_chosen_logps: jax.Array
    reward_shift: jax.Array
    # Unpaired losses (flux_jax.losses.unpaired): chosen_* are the examples' completions,
    # rejected_* their KL rows; labels [B] bool (true = desirable), kl_baseline KTO's z0 [].
    labels: jax.Array | None = None
    kl_baseline: jax.Array | None = None

    @property
    def chosen_logratios(self) -> jax.Array:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> jax.Array:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta_score(self) -> jax.Array:
        """`h`: the chosen score minus the rejected score (the DPO implicit-reward difference)."""
        return self.chosen_scores - self.rejected_scores

    @property
    def delta_score_per_token(self) -> jax.Array:
        """`h` with each side's score divided by its response length (IPO, sigmoid_norm)."""
        return self.chosen_scores / self.chosen_counts - self.rejected_scores / self.rejected_counts

    def chosen_token_nll(self) -> jax.Array:
        """The NLL of the chosen responses averaged over all their tokens in the batch (TRL's
        `sft` and CPO's NLL: a token mean, so long responses weigh more), broadcast to [B]."""
        nll = -self.nll_chosen_logps.sum() / self.chosen_token_total
        return jnp.broadcast_to(nll, self.nll_chosen_logps.shape)


PairLosses = Callable[[LossInputs, "DPOSettings"], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossType:
    """One registered loss: its per-pair function and what it needs.

    needs_reference: the formula reads the reference log-probs. False for the reference-free
      methods (SimPO, CPO, ORPO, sft): with only such losses no reference model is loaded.
    length_normalised: the loss works on per-token (length-normalised) log-probs; its reward
      metrics are then per-token too.
    uses_label_smoothing: `label_smoothing` enters the formula (else it must be 0).
    needs_label_smoothing: `label_smoothing` must be > 0 (EXO: log eps).
    supports_f_divergence: built on the chosen-minus-rejected score difference, so the f-DPO
      scores apply (TRL's list); the others take the reverse-KL log-ratios only.
    supports_weighting: WPO's per-pair weights may multiply it (not the sorting AOT losses, whose
      per-pair order is lost).
    extra_keys: the `algorithm.*` keys that only this loss reads.
    unpaired: trains on unpaired data (`data.format: unpaired`: one completion with a
      desirable / undesirable label per example; flux_jax.losses.unpaired), never on pairs.
    trl: where TRL 1.16 has it ("DPOTrainer", "CPOTrainer", "ORPOTrainer") for the docs.
    """

    name: str
    losses: PairLosses
    needs_reference: bool = True
    length_normalised: bool = False
    uses_label_smoothing: bool = False
    needs_label_smoothing: bool = False
    supports_f_divergence: bool = False
    supports_weighting: bool = True
    extra_keys: tuple[str, ...] = ()
    trl: str = "DPOTrainer"
    unpaired: bool = False


LOSSES: dict[str, LossType] = {}


def register_loss(name: str, **needs: object) -> Callable[[PairLosses], PairLosses]:
    """Registers `fn(x: LossInputs, s: DPOSettings) -> losses_B` as loss type `name` (a decorator);
    `needs` are `LossType`'s flags (needs_reference=..., length_normalised=..., ...)."""

    def register(fn: PairLosses) -> PairLosses:
        if name in LOSSES:
            raise ValueError(f"loss type {name!r} is already registered ({LOSSES[name].losses})")
        LOSSES[name] = LossType(name, fn, **needs)  # type: ignore[arg-type]
        return fn

    return register


def loss_names() -> tuple[str, ...]:
    """The registered loss names, in registration order (the config schema's choices)."""
    return tuple(LOSSES)
