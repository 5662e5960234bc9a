"""A training step's metrics after the device: one step late to the host, then to every sink.

The loop hands each step's device metrics to `StepMetrics.push`, which finishes the step before:
so fetching a step's metrics never waits for the device to finish the step just launched. A
finished step goes first to the non-finite guard (which may stop the run), then to the history,
the metrics log, the divergence watch and the step hooks (`FluxTrainer.add_step_callback`). The
loop calls `flush` before any hook sees a state, so no state after a bad step is ever saved.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

from flux_jax.hooks import Hooks
from flux_jax.metrics_log import MetricsLog
from flux_jax.sharding import to_host
from flux_jax.training_health import DivergenceWatch, NonFiniteGuard

# A run's messages keep the trainer's logger name (what users filter on), wherever they are made.
log = logging.getLogger("flux_jax.trainer")


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What a step callback receives: the 1-based step number and its metrics as floats."""

    step: int
    metrics: dict[str, float]


class StepMetrics:
    """Brings each step's metrics to the host one step late and hands them on: the non-finite
    guard first, then the history, the metrics log, the divergence watch and the step hooks."""

    def __init__(
        self, cfg: Any, checkpointer: Any, mlog: MetricsLog, hooks: Hooks[StepResult]
    ) -> None:
        training = cfg.training
        latest = checkpointer.latest_step()
        self.guard = NonFiniteGuard(
            policy=training.on_nonfinite,
            max_consecutive_skips=training.max_consecutive_skips,
            last_good_checkpoint=checkpointer.step_dir(latest) if latest is not None else None,
        )
        self.divergence = DivergenceWatch(
            factor=training.divergence_factor,
            window=training.divergence_window,
            learning_rate=cfg.learning_rate,
        )
        self.mlog, self.hooks, self.last_step = mlog, hooks, cfg.num_steps
        self.history: list[dict[str, float]] = []
        self.loss_window: list[float] = []  # finite train losses since the last save
        self.pending: tuple[int, dict[str, Any]] | None = None
        self.last_time = time.perf_counter()

    def push(self, step: int, device_metrics: dict[str, Any]) -> None:
        """Holds `step`'s metrics, finishing the step held before."""
        self.flush()
        self.pending = (step, device_metrics)

    def flush(self) -> None:
        """Finishes the held step, if any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._finish(*pending)

    def _finish(self, step: int, device_metrics: dict[str, Any]) -> None:
        metrics = {k: float(to_host(v)) for k, v in device_metrics.items()}
        now = time.perf_counter()
        metrics["step_time_s"] = now - self.last_time
        metrics["tokens_per_s"] = metrics["tokens"] / max(now - self.last_time, 1e-9)
        self.last_time = now
        try:
            self.guard.observe(step, metrics)
        finally:  # the step that stops the run is logged too
            self.history.append(metrics)
            if math.isfinite(metrics["loss"]):
                self.loss_window.append(metrics["loss"])
            self.mlog.train_step(step, metrics)
        if warning := self.divergence.observe(step, metrics["loss"]):
            log.warning(warning)
        self.hooks.run(step, self.last_step, StepResult(step=step, metrics=metrics))
