"""`DPOSettings`: every setting of the preference objective and of the step computing it.

Built once from the config (`from_config`) and passed whole to the train step, the periodic eval,
`flux-jax eval` and `flux_jax.losses.objective`; frozen and hashable, so static under jit. Checked
on construction against the loss registry (what each selected loss needs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from flux_jax.logprobs import DEFAULT_CHUNK_SIZE  # the one home of the 512 default
from flux_jax.losses.registry import LOSSES, LossType

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _as_names(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def _shown(names: tuple[str, ...]) -> str:
    # 'hinge' for one loss (as the config wrote it), ['sigmoid', 'sft'] for several.
    return repr(names[0]) if len(names) == 1 else repr(list(names))


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """The objective's settings. `loss_type` is one registered name or several (MPO), normalised
    to a tuple; `loss_weights` defaults to 1 each. See flux_jax/config_schema.py for each key."""

    loss_type: str | tuple[str, ...] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    sft_coef: float = 0.0
    kl_coef: float = 0.0
    loss_weights: tuple[float, ...] | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    use_weighting: bool = False
    ld_alpha: float = 1.0  # 1 = no LD-DPO weighting
    # KTO / apo_zero_unpaired (flux_jax.losses.unpaired): weights of the two labels' losses.
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # Report TRL's logits/chosen, logits/rejected (config logging.logits_metrics).
    logits_metrics: bool = False
    # Positions per LM-head chunk (None = unchunked); see flux_jax.logprobs.
    logprob_chunk_size: int | None = DEFAULT_CHUNK_SIZE
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        # Static config values: checked in Python, before anything is traced.
        names = _as_names(self.loss_type)
        object.__setattr__(self, "loss_type", names)
        weights = (1.0,) * len(names) if self.loss_weights is None else self.loss_weights
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in weights))
        for problem in settings_problems(self):
            raise ValueError(problem)

    @property
    def losses(self) -> tuple[LossType, ...]:
        """The selected losses' registry entries, in `loss_type` order."""
        return tuple(LOSSES[name] for name in self.loss_type)

    @property
    def loss(self) -> LossType:
        """The registry entry of the only selected loss (ValueError with several: use `losses`)."""
        if len(self.loss_type) != 1:
            raise ValueError(f"{len(self.loss_type)} loss types are selected; use .losses")
        return LOSSES[self.loss_type[0]]

    @property
    def needs_reference(self) -> bool:
        """Whether a reference model (or precomputed reference log-probs) is needed."""
        uses_ref = any(loss.needs_reference for loss in self.losses) or self.kl_coef > 0
        return uses_ref and not self.reference_free

    @property
    def unpaired(self) -> bool:
        """Whether the losses train on unpaired data (`data.format: unpaired`)."""
        return any(loss.unpaired for loss in self.losses)

    @property
    def needs_kl_rows(self) -> bool:
        """Whether KTO's KL baseline is computed (from the batch's KL rows)."""
        return "kto" in self.loss_type

    @property
    def lm_head_stats(self) -> tuple[str, ...]:
        """The LM-head statistics (flux_jax.logprobs.HEAD_STATS) the policy forward must return:
        WPO's log sum_v p_v^2, the mean logits of the logits/* metrics; () = none, no cost."""
        stats = []
        if self.use_weighting:
            stats.append("log_sum_sq_probs")
        if self.logits_metrics:
            stats.append("mean_logits")
        return tuple(stats)

    @property
    def length_normalised(self) -> bool:
        """Whether the reward metrics are per-token: every selected loss is length-normalised."""
        return all(loss.length_normalised for loss in self.losses)

    @classmethod
    def from_config(cls, config: Any, *, logprob_chunk_size: int | None) -> DPOSettings:
        """The settings of a FluxConfig; `logprob_chunk_size` is the chunk after the memory cap
        (it depends on the mesh and the vocabulary, which the config alone does not know)."""
        a = config.algorithm
        weights = tuple(getattr(a, "loss_weights", ()) or ()) or None
        optional = {  # keys added with the loss family; absent in configs built before it
            key: getattr(a, key)
            for key in (
                "f_divergence_type",
                "f_alpha_divergence_coef",
                "discopop_tau",
                "simpo_gamma",
                "cpo_alpha",
                "use_weighting",
                "ld_alpha",
                "desirable_weight",
                "undesirable_weight",
            )
            if hasattr(a, key)
        }
        logging = getattr(config, "logging", None)
        if logging is not None and hasattr(logging, "logits_metrics"):
            optional["logits_metrics"] = logging.logits_metrics
        return cls(
            loss_type=a.loss_type,
            beta=a.beta,
            label_smoothing=a.label_smoothing,
            reference_free=a.reference_free,
            sft_coef=a.sft_coef,
            kl_coef=a.kl_coef,
            loss_weights=weights,
            logprob_chunk_size=logprob_chunk_size,
            grad_accum_steps=config.grad_accum_steps,
            **optional,
        )


def settings_problems(s: DPOSettings, prefix: str = "") -> list[str]:
    """What is wrong with these settings, one message per problem ([] when valid).

    `prefix` ("algorithm.") makes the messages name config keys; config_rules uses this too, so
    the config check and the settings check can never disagree.
    """
    p = prefix
    names = _as_names(s.loss_type)
    unknown = [n for n in names if n not in LOSSES]
    if not names or unknown:
        return [
            f"{p}loss_type: unknown loss type {unknown or list(names)}; valid loss types: "
            f"{', '.join(LOSSES)}"
        ]
    problems = []
    losses = [LOSSES[n] for n in names]
    if len(set(names)) != len(names):
        problems.append(f"{p}loss_type lists a loss twice: {list(names)}; weight it instead")
    weights = s.loss_weights if s.loss_weights is not None else (1.0,) * len(names)
    if len(weights) != len(names):
        problems.append(
            f"{p}loss_weights has {len(weights)} weights for the {len(names)} names of "
            f"{p}loss_type {list(names)}; give one weight per loss type (or none: 1 each)"
        )
    if any(not w >= 0 for w in weights):
        problems.append(f"{p}loss_weights must be >= 0, got {list(weights)}")
    if not s.beta > 0:
        problems.append(f"{p}beta must be > 0, got {s.beta}")
    if not 0.0 <= s.label_smoothing < 0.5:
        problems.append(f"{p}label_smoothing must be in [0, 0.5), got {s.label_smoothing}")
    if s.label_smoothing > 0 and not any(loss.uses_label_smoothing for loss in losses):
        users = [n for n, loss in LOSSES.items() if loss.uses_label_smoothing]
        problems.append(
            f"{p}label_smoothing={s.label_smoothing} has no effect with loss_type={_shown(names)} "
            f"(only {', '.join(users)} use it); set it to 0"
        )
    for loss in losses:
        if loss.needs_label_smoothing and not s.label_smoothing > 0:
            problems.append(
                f"{p}loss_type {loss.name!r} needs label_smoothing > 0 (its epsilon; the paper "
                "recommends 1e-3)"
            )
    if s.sft_coef < 0 or s.kl_coef < 0:
        problems.append(f"{p}sft_coef and kl_coef must be >= 0, got {s.sft_coef} and {s.kl_coef}")
    if s.f_divergence_type not in F_DIVERGENCES:
        problems.append(
            f"{p}f_divergence_type {s.f_divergence_type!r} is not one of {list(F_DIVERGENCES)}"
        )
    elif s.f_divergence_type != "reverse_kl":
        without = [loss.name for loss in losses if not loss.supports_f_divergence]
        if without:
            problems.append(
                f"{p}f_divergence_type={s.f_divergence_type!r} does not apply to {without}: the "
                "f-DPO reparameterisation only cancels in the chosen-minus-rejected difference; "
                "use reverse_kl with these"
            )
    if not 0 < s.f_alpha_divergence_coef < 1:
        problems.append(
            f"{p}f_alpha_divergence_coef must be in (0, 1) (f-DPO's alpha), got "
            f"{s.f_alpha_divergence_coef}"
        )
    if not s.discopop_tau > 0:
        problems.append(f"{p}discopop_tau must be > 0, got {s.discopop_tau}")
    if s.cpo_alpha < 0:
        problems.append(f"{p}cpo_alpha must be >= 0, got {s.cpo_alpha}")
    if not 0.0 <= s.ld_alpha <= 1.0:
        problems.append(f"{p}ld_alpha must be in [0, 1] (1 = off), got {s.ld_alpha}")
    if s.use_weighting:
        sorted_ = [loss.name for loss in losses if not loss.supports_weighting]
        if sorted_:
            problems.append(
                f"{p}use_weighting does not apply to {sorted_}: they sort pairs over the batch, "
                "so per-pair WPO weights would land on the wrong pairs"
            )
    problems.extend(_unpaired_problems(s, losses, p))
    if s.reference_free and s.kl_coef > 0:
        problems.append(f"{p}kl_coef > 0 needs the reference model; reference_free is true")
    if not s.reference_free and not any(loss.needs_reference for loss in losses) and not s.kl_coef:
        problems.append(
            f"{p}loss_type={_shown(names)} needs no reference model: set {p}reference_free=true "
            "(then no reference weights are loaded and no reference forward runs)"
        )
    return problems


def _unpaired_problems(s: Any, losses: list[LossType], p: str) -> list[str]:
    """Unpaired losses (KTO) alone, with their weights, and none of the pairwise options."""
    unpaired = [loss.name for loss in losses if loss.unpaired]
    problems = []
    if not s.desirable_weight >= 0 or not s.undesirable_weight >= 0:
        problems.append(
            f"{p}desirable_weight and {p}undesirable_weight must be >= 0, got "
            f"{s.desirable_weight} and {s.undesirable_weight}"
        )
    if not unpaired:
        return problems
    if len(unpaired) != len(losses):
        pairwise = [loss.name for loss in losses if not loss.unpaired]
        problems.append(
            f"{p}loss_type mixes unpaired losses {unpaired} (data.format: unpaired) with "
            f"pairwise ones {pairwise} (paired data): choose one kind"
        )
    options = {
        "sft_coef": s.sft_coef > 0,
        "kl_coef": s.kl_coef > 0,
        "ld_alpha": s.ld_alpha < 1,
        "use_weighting": s.use_weighting,
        "reference_free": s.reference_free,
    }
    for key, is_set in options.items():
        if is_set:
            problems.append(
                f"{p}{key} does not apply to loss_type {unpaired} (unpaired data); set it to "
                "its default"
            )
    return problems


def algorithm_problems(algorithm: Any) -> list[str]:
    """`settings_problems` of a config's `algorithm` section, messages naming `algorithm.*` keys
    (flux_jax/config_rules.py); keys the section lacks take DPOSettings' defaults."""
    fields = {f.name: f.default for f in dataclasses.fields(DPOSettings)}
    values = {name: getattr(algorithm, name, default) for name, default in fields.items()}
    values["loss_weights"] = tuple(values["loss_weights"] or ()) or None
    if any(name not in LOSSES for name in _as_names(values["loss_type"])):
        return []  # the schema's choices check names the valid ones
    return settings_problems(_View(**values), prefix="algorithm.")


@dataclasses.dataclass(frozen=True)
class _View:
    """DPOSettings' fields without its checks: what `settings_problems` reads from a config."""

    loss_type: Any
    beta: float
    label_smoothing: float
    reference_free: bool
    sft_coef: float
    kl_coef: float
    loss_weights: tuple[float, ...] | None
    f_divergence_type: str
    f_alpha_divergence_coef: float
    discopop_tau: float
    simpo_gamma: float
    cpo_alpha: float
    use_weighting: bool
    ld_alpha: float
    desirable_weight: float
    undesirable_weight: float
    logits_metrics: bool
    logprob_chunk_size: int | None
    grad_accum_steps: int
