"""Checkpoints: the train state and data position under rotation, and the `best` params apart.

On disk (orbax writes every array; each directory is an orbax checkpoint):

    output_dir/checkpoints/<step>/state/              {"step", "params", "opt_state"} (sharded)
                                 /data/               grain iterator state, one JSON per process
                                 /metadata/metadata.json   step, wall time, the caller's metadata
    output_dir/best/params/                           the parameters only
                   /metadata/metadata.json            step, metric, hf_config, model/tokenizer path

Nothing is ever half-visible. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames
it to `<step>` only once every item (and every process) has finished; `latest_step()` lists only
renamed steps and the leftovers of a crash are deleted when the next `TrainCheckpointer` opens the
directory. `best` is written whole into a staging directory and then swapped in by renames; a
crash between the two renames is repaired by the next reader (`_recover_best_swap`).

Restores read orbax's tree metadata first and compare it with the caller's abstract target, so a
checkpoint of another model shape fails with `CheckpointMismatchError` naming the parameters,
before any array is read. Arrays restore onto the shardings of the abstract target, which may be
a different mesh (e.g. saved over 8 devices, restored over 4).

Multi-host: every process calls every function here; orbax writes collectively, only process 0
writes the JSON files and swaps `best` in, and a barrier keeps the others from running ahead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any
log = logging.getLogger(__name__)

STATE, DATA, METADATA, PARAMS = "state", "data", "metadata", "params"
METADATA_FILE = "metadata.json"
_STAGING_SUFFIX = ".staging"  # best: written whole here first
_OLD_SUFFIX = ".old"  # best: the previous one, for the instant between the two renames
_MAX_LISTED = 25  # per category in a mismatch message


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the target tree: other shapes, or missing/extra paths."""

    def __init__(
        self,
        path: str,
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
        missing: Sequence[str],
        extra: Sequence[str],
    ):
        self.path = path
        self.mismatched = list(mismatched)  # (path, saved shape, expected shape)
        self.missing = list(missing)  # expected by the target, absent from the checkpoint
        self.extra = list(extra)  # in the checkpoint, absent from the target
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [
            f"checkpoint {self.path} does not match the model it is loaded into: "
            f"{len(self.mismatched)} shape mismatches, {len(self.missing)} missing, "
            f"{len(self.extra)} extra (is the model config the one the checkpoint was saved with?)"
        ]

        def section(title: str, rows: list[str]) -> None:
            if rows:
                lines.append(f"  {title}:")
                lines.extend(f"    {row}" for row in rows[:_MAX_LISTED])
                if len(rows) > _MAX_LISTED:
                    lines.append(f"    ... and {len(rows) - _MAX_LISTED} more")

        section(
            "shape mismatches (path: saved shape -> expected shape)",
            [f"{p}: {s} -> {e}" for p, s, e in self.mismatched],
        )
        section("missing from the checkpoint", self.missing)
        section("in the checkpoint but not in the model", self.extra)
        return "\n".join(lines)


# -- tree comparison ----------------------------------------------------------------------------


def _key_name(entry: Any) -> str:
    # Orbax stores namedtuples as dicts and tuples as lists: compare by name/index only.
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat}


def check_compatible(path: str, saved_tree: PyTree, target_tree: PyTree) -> None:
    """Raises CheckpointMismatchError unless both trees hold the same paths with the same shapes.

    `saved_tree` is orbax's metadata tree (leaves with `.shape`); dtypes may differ (orbax casts
    to the target's dtype on restore).
    """
    saved, target = _flat_shapes(saved_tree), _flat_shapes(target_tree)
    mismatched = [(p, saved[p], target[p]) for p in target if p in saved and saved[p] != target[p]]
    missing = [f"{p} {target[p]}" for p in target if p not in saved]
    extra = [f"{p} {saved[p]}" for p in saved if p not in target]
    if mismatched or missing or extra:
        raise CheckpointMismatchError(path, mismatched, missing, extra)


def abstract_of(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs with the shardings of a concrete tree: a restore target in its layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _check_shardings(abstract: PyTree) -> None:
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    missing = [
        jax.tree_util.keystr(p) for p, leaf in flat if getattr(leaf, "sharding", None) is None
    ]
    if missing:
        raise ValueError(
            "restore targets need a sharding on every leaf (jax.ShapeDtypeStruct(shape, dtype, "
            f"sharding=...); see abstract_of); none on: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )


# -- rotating train-state checkpoints ----------------------------------------------------------


class TrainCheckpointer:
    """The train state, the data iterator position and a metadata JSON, every N steps, last K kept.

    All processes call `save` and `restore`. With `async_save`, `save` returns once the arrays are
    copied off the devices (so the caller may donate or overwrite the state right away) and the
    files are written in the background; `wait_until_finished()` (or `close()`) before exiting.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 200,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # a crashed save's leftovers go when we reopen
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
                METADATA: _metadata_handler(),
            },
        )

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_iterator: Any = None,
        metadata: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves when `step` is a multiple of save_interval_steps, or `force`; True if it did.

        A step that is already saved is not saved again (returns False). `metadata` (JSON-able,
        e.g. model_path, hf_config, flux_config) is stored beside the step and wall time and
        comes back from `read_metadata(step_dir)`.
        """
        if not force and step % self.save_interval_steps:
            return False
        if step in self.all_steps():
            return False
        meta = _json_copy({**(metadata or {}), "step": int(step), **_wall_time()})
        items: dict[str, Any] = {
            STATE: ocp.args.StandardSave(state),
            METADATA: ocp.args.JsonSave(meta),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int | None = None, *, abstract_state: PyTree, data_iterator: Any = None
    ) -> PyTree:
        """The state of `step` (default: the latest), laid out as `abstract_state` says.

        `abstract_state` is the state's tree of `jax.ShapeDtypeStruct`s, each with its target
        sharding. `data_iterator`, if given, is moved to the saved position in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        _check_shardings(abstract_state)
        step_dir = self.step_dir(step)
        saved = self._manager.metadata(step).item_metadata[STATE]
        check_compatible(step_dir, getattr(saved, "tree", saved), abstract_state)
        items: dict[str, Any] = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not os.path.isdir(os.path.join(step_dir, DATA)):
                raise ValueError(f"{step_dir} holds no data-iterator state to restore")
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE]

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def wait_until_finished(self) -> None:
        """Blocks until a background save is on disk and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save, then releases orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- the best parameters, and loading parameters from any checkpoint ----------------------------


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
    staging, old = best + _STAGING_SUFFIX, best + _OLD_SUFFIX
    main = jax.process_index() == 0
    if main:
        _recover_best_swap(best)
        shutil.rmtree(staging, ignore_errors=True)  # an earlier save that crashed midway
    _barrier("flux_jax_best_staging_clear")
    meta = _json_copy(
        {
            **(metadata or {}),
            "step": int(step),
            "metric_name": metric_name,
            "metric_value": float(metric_value),
            **_wall_time(),
        }
    )
    handler = ocp.CompositeCheckpointHandler(
        **{PARAMS: ocp.StandardCheckpointHandler(), METADATA: _metadata_handler()}
    )
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(
            staging,
            args=ocp.args.Composite(
                **{PARAMS: ocp.args.StandardSave(params), METADATA: ocp.args.JsonSave(meta)}
            ),
        )
    if main:
        # os.rename cannot replace a non-empty directory, so: best -> best.old, staging -> best.
        # Readers between the two renames find best.old and put it back (_recover_best_swap).
        if os.path.isdir(best):
            os.rename(best, old)
        os.rename(staging, best)
        shutil.rmtree(old, ignore_errors=True)
    _barrier("flux_jax_best_swapped")


def load_params(path: str | os.PathLike, abstract_params: PyTree) -> PyTree:
    """The parameters of a `best` directory or of a step directory (`checkpoints/<step>`).

    `abstract_params` is the parameter tree of `jax.ShapeDtypeStruct`s with target shardings;
    a checkpoint of another model shape raises CheckpointMismatchError before reading arrays.
    """
    path = os.path.abspath(os.fspath(path))
    _recover_best_swap(path)
    _check_shardings(abstract_params)
    if os.path.isdir(os.path.join(path, PARAMS)):  # a best directory
        item, target = PARAMS, abstract_params
    elif os.path.isdir(os.path.join(path, STATE)):  # a step directory: its params subtree only
        item, target = STATE, {PARAMS: abstract_params}
    else:
        raise FileNotFoundError(
            f"{path} is not a flux_jax checkpoint: expected OUTPUT_DIR/best (with {PARAMS}/) or "
            f"a step directory OUTPUT_DIR/checkpoints/<step> (with {STATE}/)"
        )
    handler = ocp.CompositeCheckpointHandler(**{item: ocp.PyTreeCheckpointHandler()})
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


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata JSON of a `best` directory or a step directory."""
    path = os.path.abspath(os.fspath(path))
    _recover_best_swap(path)
    file = os.path.join(path, METADATA, METADATA_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a flux_jax checkpoint: {file} does not exist")
    with open(file) as f:
        return json.load(f)


def _recover_best_swap(best: str) -> None:
    """Finishes a `best` swap that a crash interrupted between its two renames."""
    old = best + _OLD_SUFFIX
    if jax.process_index() != 0 or not os.path.isdir(old):
        return
    if os.path.isdir(best):  # the new best is in place; only the cleanup was missed
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(old, best)


def _metadata_handler() -> ocp.JsonCheckpointHandler:
    # Writes on the primary process only; a fixed name lets read_metadata find it without orbax.
    return ocp.JsonCheckpointHandler(filename=METADATA_FILE)


def _json_copy(data: dict[str, Any]) -> dict[str, Any]:
    # Serialising now reports a non-JSON value here, not later in orbax's background thread.
    try:
        return json.loads(json.dumps(data))
    except TypeError as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None


def _wall_time() -> dict[str, Any]:
    now = time.time()
    return {"wall_time": now, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# -- preemption -----------------------------------------------------------------------------------


class PreemptionWatcher:
    """`is_preempted(step)`: True once the job has been asked to stop (SIGTERM).

    Single process: a SIGTERM handler sets a flag (instead of killing the process); the trainer
    polls it, saves a final checkpoint and exits. `uninstall()` puts the previous handler back.

    Multi-process (`jax.process_count() > 1`): JAX's preemption service (started by
    `jax.distributed.initialize`) already owns SIGTERM and makes every process agree on one step
    to stop at, so no handler is installed and the call must be given the step and made by every
    process every step: it returns `multihost_utils.reached_preemption_sync_point(step)`. (That
    function is always False without `jax.distributed`, so it is useless on one process.)
    """

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._previous: Any = None
        self._installed = False
        self._multiprocess = jax.process_count() > 1
        if self._multiprocess:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM will not be caught (no final checkpoint)")
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._flag.set()

    def __call__(self, step: int | None = None) -> bool:
        if not self._multiprocess:
            return self._flag.is_set()
        if step is None:
            raise TypeError("is_preempted(step): multi-process runs must pass the current step")
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is disabled
            return False

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def install_preemption_handler() -> PreemptionWatcher:
    """Starts watching for SIGTERM; returns the `is_preempted` callable (see PreemptionWatcher)."""
    return PreemptionWatcher()
