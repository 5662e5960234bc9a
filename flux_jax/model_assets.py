"""A run's model config and tokenizer in OUTPUT_DIR/model_assets: checkpoints that stand alone.

Checkpoints hold parameters. Export, eval and generate also need the HF `config.json`, the
tokenizer files and `generation_config.json`; the trainer writes them here once per output_dir
(the first run, and again only if they changed), and every checkpoint's metadata points here by a
path relative to the checkpoint (`checkpoint.MODEL_ASSETS_KEY`). So `flux-jax export` and
`flux-jax generate` work from a checkpoint after the original model_path is deleted, and after
the whole output_dir is moved. (eval, and generate --compare-base, also need the base weights:
those are not copied, see commands.py.)
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from typing import Any

from flux_jax.hf_io import copy_tokenizer_files

MODEL_ASSETS_DIR = "model_assets"
GENERATION_CONFIG = "generation_config.json"


def save_model_assets(
    output_dir: str,
    *,
    hf_config: dict[str, Any],
    tokenizer: Any,
    model_path: str,
    tokenizer_path: str = "",
) -> str:
    """Writes OUTPUT_DIR/model_assets (config.json, tokenizer, generation config); its path.

    Call on the main process only. Tokenizer files are copied as they are from the tokenizer's
    directory (a local dir or the hub snapshot the tokenizer was loaded from); a builtin tokenizer
    is saved with `save_pretrained`. `generation_config.json` is copied from the model directory
    when it has one. A directory with the same files is left as it is; otherwise the new one
    replaces it by renames, never half-written.
    """
    target = os.path.join(output_dir, MODEL_ASSETS_DIR)
    staging = f"{target}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    tokenizer_dir = _local_dir(getattr(tokenizer, "name_or_path", ""))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, staging)
    else:
        tokenizer.save_pretrained(staging)
    # A hub model's files are in the snapshot the tokenizer came from when no tokenizer_path
    # was given; a local model_path is its own directory.
    model_dir = _local_dir(model_path) or (None if tokenizer_path else tokenizer_dir)
    if model_dir is not None and os.path.isfile(os.path.join(model_dir, GENERATION_CONFIG)):
        shutil.copyfile(
            os.path.join(model_dir, GENERATION_CONFIG), os.path.join(staging, GENERATION_CONFIG)
        )
    if _same_files(staging, target):
        shutil.rmtree(staging)
        return target
    old = f"{target}.old-{os.getpid()}"
    if os.path.isdir(target):
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _local_dir(path: str) -> str | None:
    return path if path and os.path.isdir(path) else None


def _same_files(a: str, b: str) -> bool:
    if not os.path.isdir(b):
        return False
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors
