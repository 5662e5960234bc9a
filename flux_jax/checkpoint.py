"""Checkpoints: the train state and data position under rotation, and the on-disk layout.

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
directory. `best` (written by best_checkpoint.py) is swapped in by two renames; a crash between
them is repaired by the next reader (`recover_best_swap`, here because every reader needs it).

Damage: `restore_latest` tries the newest step first and, if it cannot be read (a truncated file,
a missing item), warns and falls back to the next older one; the steps it skipped are renamed to
`<step>.damaged` (kept for inspection, out of the way of the next save of that step). A save that
fails (disk full, file-size limit) raises `CheckpointSaveError` naming its step and the OS cause.

Restores read orbax's tree metadata first and compare it with the caller's abstract target
(restore_targets.py), so a checkpoint of another model shape fails with `CheckpointMismatchError`
naming the parameters, before any array is read. Arrays restore onto the shardings of the
abstract target, which may be a different mesh (e.g. saved over 8 devices, restored over 4).

Multi-host: every process calls every function here; orbax writes collectively, only process 0
writes the JSON files and swaps `best` in, and a barrier keeps the others from running ahead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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
from flux_jax.restore_targets import (
    abstract_of,  # noqa: F401  (imported from here too)
    check_compatible,
    check_shardings,
)

PyTree = Any
log = logging.getLogger(__name__)

STATE, DATA, METADATA, PARAMS = "state", "data", "metadata", "params"
METADATA_FILE = "metadata.json"
BEST_STAGING_SUFFIX = ".staging"  # best: written whole here first
BEST_OLD_SUFFIX = ".old"  # best: the previous one, for the instant between the two renames
_DAMAGED_SUFFIX = ".damaged"  # a step directory that failed to restore, set aside
MODEL_ASSETS_KEY = "model_assets"  # metadata: the run's config/tokenizer dir, relative to the ckpt


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
                METADATA: metadata_handler(),
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
        meta = json_copy({**(metadata or {}), "step": int(step), **wall_time()})
        meta = paths_relative_to(self.step_dir(step), meta)
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
        check_shardings(abstract_state)
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
        barrier("flux_jax_damaged_steps_set_aside")
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


# -- reading any checkpoint's metadata ---------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata JSON of a `best` directory or a step directory."""
    path = os.path.abspath(os.fspath(path))
    recover_best_swap(path)
    file = os.path.join(path, METADATA, METADATA_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a flux_jax checkpoint: {file} does not exist")
    with open(file) as f:
        return json.load(f)


def recover_best_swap(best: str) -> None:
    """Finishes a `best` swap that a crash interrupted between its two renames."""
    old = best + BEST_OLD_SUFFIX
    if jax.process_index() != 0 or not os.path.isdir(old):
        return
    if os.path.isdir(best):  # the new best is in place; only the cleanup was missed
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(old, best)


def metadata_handler() -> ocp.JsonCheckpointHandler:
    """Orbax's handler for the metadata item (train steps and `best` alike)."""
    # Writes on the primary process only; a fixed name lets read_metadata find it without orbax.
    return ocp.JsonCheckpointHandler(filename=METADATA_FILE)


def json_copy(data: dict[str, Any]) -> dict[str, Any]:
    """`data` through JSON and back: a TypeError naming the value that is not JSON-able."""
    # Serialising now reports a non-JSON value here, not later in orbax's background thread.
    try:
        return json.loads(json.dumps(data))
    except TypeError as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None


def wall_time() -> dict[str, Any]:
    """The metadata's save-time fields: epoch seconds and a local ISO timestamp."""
    now = time.time()
    return {"wall_time": now, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))}


def barrier(name: str) -> None:
    """Waits for every process (a no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _all_processes_succeeded(ok: bool) -> bool:
    """True only if `ok` on every process: all fall back together, or none does."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def paths_relative_to(directory: str, meta: dict[str, Any]) -> dict[str, Any]:
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
