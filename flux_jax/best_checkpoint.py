"""output_dir/best: the parameters with the lowest eval loss (else windowed train loss) so far.

`save_best` writes the parameters (no optimiser state) and their metadata whole into a staging
directory and swaps it in by two renames, so a reader never sees half a `best`; a crash between
the renames is repaired by the next reader (`checkpoint.recover_best_swap`). `load_params` reads
the parameters of a `best` directory or of a train-state step directory. `BestTracker` decides
when to save; a resumed run reads the kept value back and goes on comparing against it.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from flux_jax.checkpoint import (
    BEST_OLD_SUFFIX,
    BEST_STAGING_SUFFIX,
    DATA,
    METADATA,
    PARAMS,
    STATE,
    barrier,
    check_compatible,
    check_shardings,
    json_copy,
    metadata_handler,
    paths_relative_to,
    read_metadata,
    recover_best_swap,
    wall_time,
)
from flux_jax.checkpoint_errors import CheckpointSaveError

PyTree = Any


def save_best(
    directory_best: str | os.PathLike,
    step: int,
    params: PyTree,
    *,
    metric_name: str,
    metric_value: float,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Replaces `directory_best` with these params and their metadata, atomically for readers.

    Synchronous: it returns when the new best is in place. `metadata` (JSON-able) is expected to
    carry hf_config, model_path and tokenizer_path (what `flux-jax export` needs).
    """
    best = os.path.abspath(os.fspath(directory_best))
    staging, old = best + BEST_STAGING_SUFFIX, best + BEST_OLD_SUFFIX
    main = jax.process_index() == 0
    if main:
        recover_best_swap(best)
        shutil.rmtree(staging, ignore_errors=True)  # an earlier save that crashed midway
    barrier("flux_jax_best_staging_clear")
    meta = json_copy(
        {
            **(metadata or {}),
            "step": int(step),
            "metric_name": metric_name,
            "metric_value": float(metric_value),
            **wall_time(),
        }
    )
    meta = paths_relative_to(best, meta)
    handler = ocp.CompositeCheckpointHandler(
        **{PARAMS: ocp.StandardCheckpointHandler(), METADATA: metadata_handler()}
    )
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(
                staging,
                args=ocp.args.Composite(
                    **{PARAMS: ocp.args.StandardSave(params), METADATA: ocp.args.JsonSave(meta)}
                ),
            )
    except Exception as e:  # the previous best is untouched; the next save_best clears staging
        raise CheckpointSaveError(best, e, advice="the previous best (if any) is unchanged") from e
    if main:
        # os.rename cannot replace a non-empty directory, so: best -> best.old, staging -> best.
        # Readers between the two renames find best.old and put it back (recover_best_swap).
        if os.path.isdir(best):
            os.rename(best, old)
        os.rename(staging, best)
        shutil.rmtree(old, ignore_errors=True)
    barrier("flux_jax_best_swapped")


def load_params(path: str | os.PathLike, abstract_params: PyTree) -> PyTree:
    """The parameters of a `best` directory or of a step directory (`checkpoints/<step>`).

    `abstract_params` is the parameter tree of `jax.ShapeDtypeStruct`s with target shardings;
    a checkpoint of another model shape raises CheckpointMismatchError before reading arrays.
    """
    path = os.path.abspath(os.fspath(path))
    recover_best_swap(path)
    check_shardings(abstract_params)
    if os.path.isdir(os.path.join(path, PARAMS)):  # a best directory
        item, target = PARAMS, abstract_params
    elif os.path.isdir(os.path.join(path, STATE)):  # a step directory: its params subtree only
        item, target = STATE, {PARAMS: abstract_params}
    else:
        raise FileNotFoundError(
            f"{path} is not a flux_jax checkpoint: expected OUTPUT_DIR/best (with {PARAMS}/) or "
            f"a step directory OUTPUT_DIR/checkpoints/<step> (with {STATE}/)"
        )
    # Every item of the directory gets its handler: orbax warns about each one it cannot read.
    handler = ocp.CompositeCheckpointHandler(
        **{
            item: ocp.PyTreeCheckpointHandler(),
            METADATA: metadata_handler(),
            DATA: grain.checkpoint.CheckpointHandler(),
        }
    )
    with ocp.Checkpointer(handler) as checkpointer:
        saved = checkpointer.metadata(path).item_metadata[item].tree
        if item == STATE and PARAMS not in saved:
            raise ValueError(f"{path}/{STATE} holds no '{PARAMS}' subtree")
        check_compatible(path, saved if item == PARAMS else saved[PARAMS], abstract_params)
        restore = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=item == STATE,  # leave the optimiser state on disk
        )
        restored = checkpointer.restore(path, args=ocp.args.Composite(**{item: restore}))[item]
    return restored if item == PARAMS else restored[PARAMS]


class BestTracker:
    """Keeps output_dir/best: the parameters with the lowest eval (else windowed train) loss."""

    def __init__(self, path: str, *, has_eval: bool):
        self.path = path
        self.metric_name = "eval_loss" if has_eval else "train_loss"
        self.value = math.inf
        self.saved = False
        if os.path.isdir(path):  # a resumed run continues the comparison
            meta = read_metadata(path)
            if meta.get("metric_name") == self.metric_name:
                self.value = float(meta.get("metric_value", math.inf))
                self.saved = True

    def offer(self, step: int, value: float, params: Any, metadata: dict[str, Any]) -> None:
        if not value < self.value:
            return
        save_best(
            self.path,
            step,
            params,
            metric_name=self.metric_name,
            metric_value=value,
            metadata=metadata,
        )
        self.value, self.saved = value, True
