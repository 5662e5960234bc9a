"""Checkpoints: the train state and data position under rotation, and the `best` params apart.

On disk (orbax writes every array; each directory is an orbax checkpoint):

    output_dir/checkpoints/<step>/state/              {"step", "params", "opt_state"} (sharded)
                                 /data/               grain iterator state, one JSON per process
                                 /metadata/metadata.json   step, wall time, the caller's metadata
    output_dir/best/params/                           the parameters only
                   /metadata/metadata.json            step, metric, hf_config, model/tokenizer path
    output_dir/model_assets/                          config + tokenizer files (model_assets.py),
                                                      named in each metadata.json by a path
                                                      relative to the checkpoint

Nothing is ever half-visible. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames
it to `<step>` only once every item (and every process) has finished; `latest_step()` lists only
renamed steps and the leftovers of a crash are deleted when the next `TrainCheckpointer` opens the
directory. `best` is written whole into a staging directory and then swapped in by renames; a
crash between the two renames is repaired by the next reader (`_recover_best_swap`).

Damage: `restore_latest` tries the newest step first and, if it cannot be read (a truncated file,
a missing item), warns and falls back to the next older one; the steps it skipped are renamed to
`<step>.damaged` (kept for inspection, out of the way of the next save of that step). A save that
fails (disk full, file-size limit) raises `CheckpointSaveError` naming its step and the OS cause.

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
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flux_jax.checkpoint_errors import (
    CheckpointMismatchError,
    CheckpointRestoreError,
    CheckpointSaveError,
    describe_error,
)

PyTree = Any
log = logging.getLogger(__name__)

STATE, DATA, METADATA, PARAMS = "state", "data", "metadata", "params"
METADATA_FILE = "metadata.json"
_STAGING_SUFFIX = ".staging"  # best: written whole here first
_OLD_SUFFIX = ".old"  # best: the previous one, for the instant between the two renames
_DAMAGED_SUFFIX = ".damaged"  # a step directory that failed to restore, set aside
MODEL_ASSETS_KEY = "model_assets"  # metadata: the run's config/tokenizer dir, relative to the ckpt


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
        self._async = async_save
        self._in_flight: int | None = None  # the step an async save is still writing

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

        Raises CheckpointSaveError if this save fails or if the previous (background) one did:
        the error names the step whose save failed and the OS cause (e.g. disk full).
        """
        if not force and step % self.save_interval_steps:
            return False
        self.wait_until_finished()  # the previous save's error is that save's, not this one's
        if step in self.all_steps():
            return False
        meta = _json_copy({**(metadata or {}), "step": int(step), **_wall_time()})
        meta = _paths_relative_to(self.step_dir(step), meta)
        items: dict[str, Any] = {
            STATE: ocp.args.StandardSave(state),
            METADATA: ocp.args.JsonSave(meta),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self._in_flight = step
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            self._in_flight = None
            raise self._save_error(step, e) from e
        if not self._async:
            self._in_flight = None
        return saved

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
        if not os.path.isdir(os.path.join(step_dir, STATE)):
            raise FileNotFoundError(f"{os.path.join(step_dir, STATE)} does not exist")
        saved = self._manager.metadata(step).item_metadata[STATE]
        check_compatible(step_dir, getattr(saved, "tree", saved), abstract_state)
        items: dict[str, Any] = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not os.path.isdir(os.path.join(step_dir, DATA)):
                raise ValueError(f"{step_dir} holds no data-iterator state to restore")
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE]

    def restore_latest(
        self, abstract_state: PyTree, *, data_iterator: Any = None
    ) -> tuple[int, PyTree] | None:
        """(step, state) of the newest step that restores; None if there is no checkpoint.

        A step that cannot be read (truncated or missing files: a crash or a full disk while it
        was copied, a damaged disk) is logged as a WARNING naming its directory and the cause,
        and the next older step is tried. The skipped steps are then renamed to
        `<step>.damaged`, so the run can save those step numbers again. CheckpointMismatchError
        (a checkpoint of another model) is a configuration error and is raised, not skipped;
        CheckpointRestoreError lists every step's cause when none restores.

        `data_iterator` is moved to the restored step's position. A failed attempt may have
        moved it already (orbax restores the data item before the state); the successful
        restore sets its whole state again, so no trace of a failed attempt remains.
        """
        failures: list[tuple[str, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state = self.restore(
                    step, abstract_state=abstract_state, data_iterator=data_iterator
                )
                error = None
            except CheckpointMismatchError:
                raise
            except Exception as e:  # damage of any kind: orbax, tensorstore, json, missing files
                error = e
            cause = describe_error(error) if error is not None else ""
            if not _all_processes_succeeded(error is None):
                cause = cause or "restored here, but failed on another process"
                log.warning(
                    "checkpoint %s could not be restored (%s); trying the previous one",
                    self.step_dir(step),
                    cause,
                )
                failures.append((self.step_dir(step), cause))
                continue
            if failures:
                self._set_aside([path for path, _ in failures])
            return step, state
        if failures:
            raise CheckpointRestoreError(self.directory, failures)
        return None

    def _set_aside(self, step_dirs: list[str]) -> None:
        """Renames damaged step directories to `<step>.damaged`: kept, but no longer a step."""
        if jax.process_index() == 0:
            for path in step_dirs:
                target, n = path + _DAMAGED_SUFFIX, 1
                while os.path.exists(target):
                    target, n = f"{path}{_DAMAGED_SUFFIX}.{n}", n + 1
                os.rename(path, target)
                log.warning(
                    "moved the damaged checkpoint %s to %s (delete it when done)", path, target
                )
        _barrier("flux_jax_damaged_steps_set_aside")
        self._manager.reload()

    def _save_error(self, step: int | None, cause: BaseException) -> CheckpointSaveError:
        good = [s for s in self.all_steps() if s != step]
        advice = (
            f"the last complete checkpoint is {self.step_dir(good[-1])}: free space and rerun "
            "the same command to resume from it"
            if good
            else "no complete checkpoint exists yet"
        )
        where = self.step_dir(step) if step is not None else f"a checkpoint in {self.directory}"
        return CheckpointSaveError(where, cause, advice=advice)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def wait_until_finished(self) -> None:
        """Blocks until a background save is on disk and committed.

        Raises CheckpointSaveError if that save failed (once: orbax reports a failed save to
        the first wait only); its partial files stay in a temporary directory that the next
        TrainCheckpointer removes.
        """
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(step, e) from e

    def close(self) -> None:
        """Waits for the last save (raising CheckpointSaveError if it failed), then releases
        orbax's threads."""
        try:
            self.wait_until_finished()
        finally:
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
    meta = _paths_relative_to(best, meta)
    handler = ocp.CompositeCheckpointHandler(
        **{PARAMS: ocp.StandardCheckpointHandler(), METADATA: _metadata_handler()}
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
    # Every item of the directory gets its handler: orbax warns about each one it cannot read.
    handler = ocp.CompositeCheckpointHandler(
        **{
            item: ocp.PyTreeCheckpointHandler(),
            METADATA: _metadata_handler(),
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


def _all_processes_succeeded(ok: bool) -> bool:
    """True only if `ok` on every process: all fall back together, or none does."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _paths_relative_to(directory: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The model-assets path stored relative to the checkpoint: a moved output_dir still works."""
    path = meta.get(MODEL_ASSETS_KEY)
    if isinstance(path, str) and os.path.isabs(path):
        meta = {**meta, MODEL_ASSETS_KEY: os.path.relpath(path, directory)}
    return meta


def model_assets_dir(checkpoint: str | os.PathLike, meta: dict[str, Any]) -> str | None:
    """The run's saved config/tokenizer directory a checkpoint refers to, or None.

    None for checkpoints saved before runs kept their assets, and (with a WARNING) when the
    directory is gone, e.g. `best/` was copied away from its output_dir.
    """
    rel = meta.get(MODEL_ASSETS_KEY)
    if not rel:
        return None
    path = os.path.normpath(os.path.join(os.path.abspath(os.fspath(checkpoint)), rel))
    if not os.path.isdir(path):
        log.warning(
            "%s: its model config and tokenizer were saved in %s, which does not exist (copy "
            "the whole output_dir, not only the checkpoint); using model_path %r instead",
            checkpoint,
            path,
            meta.get("model_path"),
        )
        return None
    return path


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
