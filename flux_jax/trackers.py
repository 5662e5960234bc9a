"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and Trackio.

    logging.wandb:   {project, entity, name, mode: online | offline | disabled}
    logging.trackio: {project, name}

A tracker is on when its project is set (and, for W&B, mode is not "disabled"). Each receives what
metrics.jsonl receives, at the same steps: every logged train step's metrics as `train/<name>`,
every evaluation's as `eval/<name>` (the TensorBoard tags), plus the run's whole config at the
start. Only the main process opens trackers (the trainer passes none elsewhere), so a multi-host
run is one tracker run, not one per host.

Both packages are optional extras. `check_tracker_packages` runs when the trainer is built, so a
run configured for W&B on a machine without wandb fails at once with the pip command to run, not
after loading data and compiling. Each fit() is one tracker run; a resumed fit() starts a new one
at the resumed step (W&B refuses steps below a run's last, and a resumed run re-logs the steps
after its checkpoint).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from flux_jax.errors import UserError

TRACKER_EXTRAS = {"wandb": "wandb", "trackio": "trackio"}  # tracker -> its flux_jax extra
WANDB_MODES = ("online", "offline", "disabled")


class TrackerPackageError(UserError, ImportError):
    """A tracker is configured but its package is not installed (the CLI prints the message, with
    the pip command, without a traceback)."""


class Tracker(Protocol):
    """Where the metrics of a run also go."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class TrackerSettings:
    """One configured tracker: `kind` is "wandb" or "trackio"; entity and mode are W&B's."""

    kind: str
    project: str
    name: str = ""
    entity: str = ""
    mode: str = "online"


def tracker_settings(logging_config: Any) -> list[TrackerSettings]:
    """The trackers `config.logging` turns on (see the module docstring)."""
    wandb = logging_config.wandb
    trackio = logging_config.trackio
    settings = []
    if wandb.project and wandb.mode != "disabled":
        settings.append(
            TrackerSettings("wandb", wandb.project, wandb.name, wandb.entity, wandb.mode)
        )
    if trackio.project:
        settings.append(TrackerSettings("trackio", trackio.project, trackio.name))
    return settings


def check_tracker_packages(settings: Sequence[TrackerSettings]) -> None:
    """Raises TrackerPackageError naming the extra to install for each configured tracker whose
    package is missing."""
    missing = [s.kind for s in settings if importlib.util.find_spec(s.kind) is None]
    if missing:
        commands = " and ".join(f"pip install 'flux_jax[{TRACKER_EXTRAS[k]}]'" for k in missing)
        keys = ", ".join(f"logging.{k}" for k in missing)
        raise TrackerPackageError(
            f"{keys} is set but {' and '.join(missing)} is not installed: run {commands}, or "
            f"clear {keys.replace(', ', ' / ')}.project"
        )


def open_trackers(
    settings: Sequence[TrackerSettings], run_config: Mapping[str, Any], output_dir: str
) -> list[Tracker]:
    """Starts one run per configured tracker, each given `run_config` (the whole FluxConfig as a
    dict). W&B writes its local files under $WANDB_DIR, else under output_dir."""
    check_tracker_packages(settings)
    opened: list[Tracker] = []
    try:
        for entry in settings:
            if entry.kind == "wandb":
                opened.append(WandbTracker(entry, run_config, output_dir))
            else:
                opened.append(TrackioTracker(entry, run_config))
    except BaseException:
        for tracker in opened:
            tracker.finish()
        raise
    return opened


def tracker_metrics(split: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """`metrics` as tracker scalars named `<split>/<name>` (the TensorBoard tags); non-numbers
    are left out, non-finite numbers kept (a NaN loss is worth seeing on a dashboard)."""
    return {
        f"{split}/{name}": float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


class WandbTracker:
    """A W&B run (https://docs.wandb.ai): wandb.init with the config, run.log per step."""

    def __init__(self, settings: TrackerSettings, run_config: Mapping[str, Any], output_dir: str):
        import wandb

        directory = os.environ.get("WANDB_DIR") or output_dir
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity or None,
            name=settings.name or None,
            mode=settings.mode,
            dir=directory,
            config=dict(run_config),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A Trackio run (https://huggingface.co/docs/trackio): a local SQLite database under
    $TRACKIO_DIR (default ~/.cache/huggingface/trackio), viewed with `trackio show`."""

    def __init__(self, settings: TrackerSettings, run_config: Mapping[str, Any]):
        import trackio

        self.run = trackio.init(
            project=settings.project,
            name=settings.name or None,
            config=dict(run_config),
            embed=False,
            # The trainer logs what it measures; trackio's own GPU/CPU pollers are not wanted.
            auto_log_gpu=False,
            auto_log_cpu=False,
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        self.run.finish()
