"""Whether a run is healthy, judged on the host from each step's metrics as they arrive.

Two checks, both on values the loop fetches anyway (one step late), so neither costs a device sync:

- Non-finite steps. The jitted step never applies an update whose loss or gradient norm is
  NaN/inf (it keeps the previous parameters and optimiser state, see train_step.py) and reports
  `nonfinite` = 1. Here `training.on_nonfinite` decides what follows: `stop` raises
  NonFiniteStepError at the first such step, before anything is saved, so the last good
  checkpoint stays the resume point; `skip_step` counts the step (`skipped_steps`) and raises
  only after `training.max_consecutive_skips` of them in a row.
- Divergence. A loss that stays far above where it started (learning rate too high, say) still
  trains to the end and exits 0; `divergence_message` says so once, loudly, so it is seen in time.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

from flux_jax.errors import UserError

ON_NONFINITE = ("stop", "skip_step")
# The starting loss is the run's first step's (after a resume: the resumed run's first): the only
# loss before any update, as later ones may already have blown up (at learning_rate=10 the second
# step's loss is in the thousands). At the start of DPO it is ln 2 whatever the batch.
BASELINE_STEPS = 1


class NonFiniteStepError(UserError):
    """Training stopped: a step's loss or gradient norm was NaN or infinite."""

    def __init__(self, message: str, *, step: int):
        super().__init__(message)
        self.step = step


def nonfinite_quantities(metrics: dict[str, float]) -> list[str]:
    """Which of the loss and the gradient norm are NaN/inf, e.g. ["loss = nan"]."""
    found = []
    for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            found.append(f"{name} = {value}")
    return found


@dataclasses.dataclass
class NonFiniteGuard:
    """Applies `training.on_nonfinite` to each finished step, in step order."""

    policy: str = "stop"
    max_consecutive_skips: int = 10
    last_good_checkpoint: str | None = None
    skipped_steps: int = 0
    consecutive: int = 0

    def __post_init__(self) -> None:
        if self.policy not in ON_NONFINITE:
            raise ValueError(f"training.on_nonfinite must be one of {ON_NONFINITE}")

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """Adds `skipped_steps` to `metrics`; raises NonFiniteStepError when the run must stop."""
        bad = nonfinite_quantities(metrics)
        if metrics.get("nonfinite", 0.0) > 0 and not bad:
            bad = ["a non-finite value"]
        if not bad:
            self.consecutive = 0
            metrics["skipped_steps"] = float(self.skipped_steps)
            return
        self.skipped_steps += 1
        self.consecutive += 1
        metrics["skipped_steps"] = float(self.skipped_steps)
        what = " and ".join(bad)
        if self.policy == "stop":
            raise NonFiniteStepError(
                f"training stopped at step {step}: {what} (training.on_nonfinite=stop). "
                f"{self._resume_hint()} Lower learning_rate, enable optimizer.max_grad_norm, "
                f"or set training.on_nonfinite=skip_step to skip such steps",
                step=step,
            )
        if self.consecutive >= self.max_consecutive_skips:
            first = step - self.consecutive + 1
            raise NonFiniteStepError(
                f"training stopped at step {step}: {self.consecutive} non-finite steps in a row "
                f"({first}-{step}, last: {what}; training.max_consecutive_skips="
                f"{self.max_consecutive_skips}). {self._resume_hint()} Lower learning_rate or "
                f"enable optimizer.max_grad_norm",
                step=step,
            )

    def _resume_hint(self) -> str:
        if self.last_good_checkpoint:
            where = self.last_good_checkpoint
            return f"Nothing from it was saved: a rerun resumes from the last good one, {where}."
        return "Nothing from it was saved (no checkpoint had been written yet)."


def starting_loss(losses: Sequence[float], baseline_steps: int = BASELINE_STEPS) -> float | None:
    """Mean of the first `baseline_steps` losses; None unless all of them are finite."""
    first = [x for x in losses[:baseline_steps] if math.isfinite(x)]
    return sum(first) / len(first) if len(first) == baseline_steps else None


def is_diverging(
    losses: Sequence[float],
    *,
    factor: float,
    window: int,
    baseline_steps: int = BASELINE_STEPS,
) -> bool:
    """Whether each of the last `window` losses exceeds `factor` x the starting loss.

    `losses` are the run's per-step losses in order. A start at or below 0 (possible with
    label-smoothed robust DPO) gives no scale to compare with, so it never counts as diverging;
    `factor` = 0 switches the check off. The window starts after the baseline steps.
    """
    if factor <= 0 or len(losses) < baseline_steps + window:
        return False
    start = starting_loss(losses, baseline_steps)
    if start is None or start <= 0:
        return False
    return all(x > factor * start for x in losses[-window:])


@dataclasses.dataclass
class DivergenceWatch:
    """Says once per run when `is_diverging` first holds; None otherwise."""

    factor: float = 4.0
    window: int = 10
    learning_rate: float | None = None
    message: str | None = None  # the warning, once given

    @property
    def warned(self) -> bool:
        return self.message is not None

    def __post_init__(self) -> None:
        self._first: list[float] = []  # the baseline steps
        self._first_step = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=self.window)

    def observe(self, step: int, loss: float) -> str | None:
        """The warning text at the step divergence is first seen, else None."""
        if self.warned or self.factor <= 0:
            return None
        if len(self._first) < BASELINE_STEPS:
            self._first_step = self._first_step or step
            self._first.append(loss)
            return None
        self._recent.append(loss)
        losses = self._first + list(self._recent)
        if not is_diverging(losses, factor=self.factor, window=self.window):
            return None
        start = starting_loss(losses)
        lr = f" (now {self.learning_rate:g})" if self.learning_rate is not None else ""
        self.message = (
            f"the loss is diverging: steps {step - self.window + 1}-{step} all exceed "
            f"{self.factor:g} x its starting value {start:.4f} (step {self._first_step}); "
            f"latest {loss:.4g}. Training continues; consider stopping it and lowering "
            f"learning_rate{lr}"
        )
        return self.message
