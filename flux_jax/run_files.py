"""What a run writes beside its checkpoints and records in each one, and the check that a
checkpoint in output_dir belongs to this kind of run before resuming from it."""

from __future__ import annotations

import os
from typing import Any

from flux_jax import checkpoint as ckpt_lib
from flux_jax import ref_sync
from flux_jax.adapter_checkpoint import BaseModel, adapter_metadata, check_matches
from flux_jax.config import FluxConfig
from flux_jax.lora import LoraSettings
from flux_jax.model_assets import MODEL_ASSETS_DIR, save_model_assets
from flux_jax.policy import Policy


def write_run_files(cfg: FluxConfig, output_dir: str, policy: Policy) -> None:
    """config.yaml and model_assets/ (the config and tokenizer checkpoints are read with).
    Process 0 only."""
    os.makedirs(output_dir, exist_ok=True)
    cfg.to_yaml(os.path.join(output_dir, "config.yaml"))
    save_model_assets(
        output_dir,
        hf_config=policy.model_config.to_hf_config(),
        tokenizer=policy.tokenizer,
        model_path=cfg.model_path,
        tokenizer_path=cfg.tokenizer_path,
    )


def checkpoint_metadata(
    cfg: FluxConfig, output_dir: str, policy: Policy, base_model: BaseModel | None
) -> dict[str, Any]:
    """The metadata every checkpoint of the run carries."""
    return {
        "model_path": cfg.model_path,
        "tokenizer_path": cfg.tokenizer_path or cfg.model_path,
        "hf_config": policy.model_config.to_hf_config(),
        "flux_config": cfg.to_dict(),
        # Stored relative to each checkpoint (checkpoint.py): a moved output_dir still works.
        ckpt_lib.MODEL_ASSETS_KEY: os.path.join(output_dir, MODEL_ASSETS_DIR),
        # LoRA: the settings and the base the adapters belong to (checked on resume / load).
        **adapter_metadata(policy.lora, base_model),
    }


def check_resumable(
    checkpointer: ckpt_lib.TrainCheckpointer,
    lora: LoraSettings | None,
    base_model: BaseModel | None,
    syncs_reference: bool,
) -> None:
    """Refuses to resume from a checkpoint of another kind of run: full fine-tuning vs LoRA,
    other LoRA settings, adapters of other base weights (adapter_checkpoint.py), or with vs
    without TR-DPO's reference in the state (ref_sync)."""
    latest = checkpointer.latest_step()
    if latest is None:
        return
    where = checkpointer.step_dir(latest)
    try:
        meta = ckpt_lib.read_metadata(where)
    except (OSError, ValueError):  # damaged: restore_latest sets it aside and falls back
        return
    check_matches(meta, where, settings=lora, base=base_model)
    ref_sync.check_resume_matches(meta, where, syncs=syncs_reference)
