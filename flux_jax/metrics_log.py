"""Where training metrics go: metrics.jsonl, TensorBoard event files, a progress bar, a summary.

Only the main process writes (the trainer passes enabled=False elsewhere). One line of
metrics.jsonl per logged step: {"step": ..., "split": "train" | "eval", metric: value, ...}.
Trackers (W&B, Trackio: flux_jax.trackers) get each line too, as `train/<name>`, `eval/<name>`.

A run that starts at step S (a resume, or a restart after a crash before the first checkpoint)
first drops the lines past S that an interrupted run left, so each step appears once; TensorBoard
is told the same (`purge_step`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from flux_jax.trackers import Tracker, tracker_metrics

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Writes metrics of train and eval steps to every configured sink."""

    def __init__(
        self,
        output_dir: str,
        *,
        num_steps: int,
        start_step: int = 0,
        every_steps: int = 1,
        tensorboard: bool = True,
        progress_bar: bool = True,
        enabled: bool = True,
        stream: TextIO | None = None,
        trackers: Sequence[Tracker] = (),
    ):
        self.enabled = enabled
        self.every_steps = max(1, every_steps)
        self.num_steps = num_steps
        self.stream = stream or sys.stderr
        self._jsonl = None
        self._tb = None
        self._bar = None
        # Opened by the caller (flux_jax.trackers.open_trackers), finished by close().
        self._trackers = list(trackers) if enabled else []
        self._t0 = time.perf_counter()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, METRICS_FILE)
        dropped = drop_lines_after(path, start_step)
        if dropped:
            log.info(
                "%s: dropped %d lines past step %d (a run interrupted there)",
                path,
                dropped,
                start_step,
            )
        self._jsonl = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # Events at or after purge_step from an earlier, interrupted run are hidden.
            self._tb = SummaryWriter(
                os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1
            )
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=num_steps, initial=start_step, desc="dpo", unit="step", file=self.stream
            )

    def train_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                margin=f"{metrics.get('reward_margin', 0.0):.3f}",
                tok_s=f"{metrics.get('tokens_per_s', 0.0):.0f}",
                refresh=False,
            )
        if step % self.every_steps and step != self.num_steps:
            return
        self._write(step, "train", metrics)
        self.message(f"step {step}/{self.num_steps}: {format_metrics(metrics)}")

    def eval_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write(step, "eval", metrics)
        line = f"eval @ step {step}: {format_metrics(metrics)}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")

    def _write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        record = {"step": step, "split": split, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{name}", value, step)
        for tracker in self._trackers:
            tracker.log(tracker_metrics(split, metrics), step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []


def drop_lines_after(path: str, step: int) -> int:
    """Rewrites metrics.jsonl without its lines past `step`; returns how many it dropped.

    Atomic (a temporary file renamed over the old one), so a crash leaves either file whole.
    A line that does not parse (cut short by a kill) is dropped too: appending after it would
    glue the next record onto it.
    """
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                keep = line.endswith("\n") and int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


SUMMARY_KEYS = ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")


def format_metrics(metrics: dict[str, Any], keys: tuple[str, ...] = SUMMARY_KEYS) -> str:
    shown = [f"{k}={metrics[k]:.4f}" for k in keys if k in metrics]
    if "tokens_per_s" in metrics:
        shown.append(f"tokens/s={metrics['tokens_per_s']:.0f}")
    return " ".join(shown)


def summarise(history: list[dict[str, float]], wall_s: float) -> str:
    """A few lines for the end of a run: first and last loss, margin, accuracy, throughput."""
    if not history:
        return "no steps were run"
    first, last = history[0], history[-1]
    tokens = sum(h.get("tokens", 0.0) for h in history)
    rate = tokens / max(wall_s, 1e-9)
    lines = [
        f"trained {len(history)} steps in {wall_s:.1f} s ({rate:.0f} tokens/s)",
        f"loss {first['loss']:.4f} -> {last['loss']:.4f}",
        f"reward_margin {first.get('reward_margin', 0.0):.4f} -> "
        f"{last.get('reward_margin', 0.0):.4f}, "
        f"reward_accuracy {first.get('reward_accuracy', 0.0):.3f} -> "
        f"{last.get('reward_accuracy', 0.0):.3f}",
    ]
    return "\n".join(lines)
