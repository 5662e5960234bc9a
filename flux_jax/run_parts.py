"""The parts of one training run built from the config: the rotating checkpointer, the jitted
train step and the metrics log. flux_jax.trainer's loop wires them together; each is built here
so the loop reads as the run, not as the options of every part.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import optax

from flux_jax import checkpoint as ckpt_lib
from flux_jax import train_step as ts
from flux_jax.config import FluxConfig
from flux_jax.dpo import DPOSettings
from flux_jax.metrics_log import MetricsLog
from flux_jax.models.qwen.moe import resolve_router_aux_loss_coef
from flux_jax.policy import Policy
from flux_jax.sharding import state_shardings_of
from flux_jax.trackers import open_trackers, tracker_settings


def train_checkpointer(cfg: FluxConfig, output_dir: str) -> ckpt_lib.TrainCheckpointer:
    """The checkpointer of `output_dir/checkpoints`, by config.checkpoint."""
    return ckpt_lib.TrainCheckpointer(
        os.path.join(output_dir, "checkpoints"),
        max_to_keep=cfg.checkpoint.max_to_keep,
        save_interval_steps=cfg.checkpoint.save_steps,
        async_save=cfg.checkpoint.async_save,
    )


def train_step_fn(
    cfg: FluxConfig,
    policy: Policy,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    settings: DPOSettings,
    state: dict[str, Any],
) -> Callable[..., Any]:
    """The jitted step (flux_jax.train_step) of `policy` under `settings`; its output state keeps
    the shardings of `state`. MoE models add their router loss (algorithm.router_aux_loss_coef)."""
    return ts.make_train_step(
        policy.graphdef,
        tx,
        schedule,
        settings,
        state_shardings=state_shardings_of(state),
        router_aux_loss_coef=resolve_router_aux_loss_coef(
            cfg.algorithm.router_aux_loss_coef, policy.model_config
        ),
        lora=policy.lora,
        dropout_seed=cfg.seed,
    )


def metrics_log(cfg: FluxConfig, output_dir: str, start_step: int, main: bool) -> MetricsLog:
    """The run's metrics log (config.logging) from `start_step` on; it writes, and opens the
    trackers, on the main process only."""
    return MetricsLog(
        output_dir,
        num_steps=cfg.num_steps,
        start_step=start_step,
        every_steps=cfg.logging.every_steps,
        tensorboard=cfg.logging.tensorboard,
        progress_bar=cfg.logging.progress_bar,
        enabled=main,
        trackers=(
            open_trackers(tracker_settings(cfg.logging), cfg.to_dict(), output_dir) if main else ()
        ),
    )
