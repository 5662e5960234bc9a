"""One training run per output_dir: a lock file that a second run refuses to share.

Two runs writing one output_dir overwrite each other's checkpoints, `best/` and config.yaml and
interleave their metrics.jsonl lines, so `fit()` holds `OUTPUT_DIR/.flux_jax.lock` from before it
writes anything until it returns (or raises). The file says who holds it (pid, host, start time,
command line). Two mechanisms, because each alone has a hole:

- `fcntl.flock` on the open file: the kernel drops it when the holder dies, even by SIGKILL, so a
  lock file left by a dead process on this host is recognised (and taken over, with a warning)
  without guessing from a pid that may have been reused.
- `O_CREAT | O_EXCL` creation plus the recorded host: on a file system where flock is missing
  (some network and FUSE mounts) or only local to each host, the file itself is the lock. A file
  written by another host cannot be checked from here, so it is refused: the message names it
  and says to delete it if that run is gone.

On a multi-host run only process 0 takes the lock (it is the one writing config.yaml, metrics
and `best/`); the others learn from it whether it succeeded, so all stop together if not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator

from flux_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".flux_jax.lock"


class RunLockedError(UserError):
    """output_dir is held by another run (or by a lock file this host cannot check)."""


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """What a lock file records about the run holding it."""

    pid: int
    host: str
    started_at: str
    command: str = ""

    @classmethod
    def of_this_process(cls) -> LockHolder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            command=" ".join(sys.argv),
        )

    @classmethod
    def from_text(cls, text: str) -> LockHolder | None:
        """The holder a lock file names; None for an empty or unreadable file."""
        try:
            record = json.loads(text)
            return cls(
                pid=int(record["pid"]),
                host=str(record["host"]),
                started_at=str(record.get("started_at", "?")),
                command=str(record.get("command", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def to_text(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"

    def describe(self) -> str:
        command = f" ({self.command})" if self.command else ""
        return f"pid {self.pid} on host {self.host}, started {self.started_at}{command}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _write(fd: int, text: str) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, text.encode())
    os.fsync(fd)


def _flock(fd: int) -> bool | None:
    """True: we hold the flock; False: a live process holds it; None: no flock on this mount."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _refusal(path: str, holder: LockHolder | None, state: str) -> RunLockedError:
    """The refusal message: `output_dir X <state>: <holder>. What to do, and the file."""
    who = holder.describe() if holder else "the lock file names no run"
    output_dir = os.path.dirname(path)
    return RunLockedError(
        f"output_dir {output_dir} {state}: {who}. "
        f"Two runs in one output_dir overwrite each other's checkpoints. Wait for it to "
        f"finish, or give this run another output_dir; if that run is no longer running, "
        f"delete {path}"
    )


class RunLock:
    """The lock on one output_dir; `acquire()` then `release()`, or use `hold_output_dir`."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(os.path.abspath(output_dir), LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock or raises RunLockedError naming the holder and the file."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = LockHolder.of_this_process()
        for _ in range(10):  # retried only when another process removes the file under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # released between our two opens: try again
                    continue
                created = False
            try:
                if self._take(fd, created, me):
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise RunLockedError(f"could not lock {self.path}: it keeps being replaced")

    def _take(self, fd: int, created: bool, me: LockHolder) -> bool:
        """Whether `fd` is now our lock; False to retry; raises when another run holds it."""
        flocked = _flock(fd)
        if flocked is False:
            holder = LockHolder.from_text(_read(fd))
            raise _refusal(self.path, holder, "is in use by another training run")
        if not _is_still_at(fd, self.path):  # its holder released (and removed) it meanwhile
            return False
        if not created:
            previous = LockHolder.from_text(_read(fd))
            self._check_stale(previous, me, flock_works=flocked is True)
        _write(fd, me.to_text())
        return True

    def _check_stale(self, previous: LockHolder | None, me: LockHolder, flock_works: bool):
        """Takes over a lock file left by a dead run on this host; refuses any other."""
        if previous is None:
            if flock_works:  # an empty file a crashed run left between create and write
                log.warning("taking over the empty lock file %s", self.path)
                return
            raise _refusal(self.path, None, "is locked")
        if previous.host != me.host:
            state = "is locked by a run on another host (which cannot be checked from here)"
            raise _refusal(self.path, previous, state)
        if not flock_works and _pid_alive(previous.pid):
            state = "is in use by another training run (its process is still running)"
            raise _refusal(self.path, previous, state)
        log.warning(
            "taking over a stale lock on %s: its run (%s) is no longer running",
            os.path.dirname(self.path),
            previous.describe(),
        )

    def release(self) -> None:
        """Removes the lock file (if it is still ours) and drops the flock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _is_still_at(fd, self.path):
                os.unlink(self.path)  # before the flock goes, so no one takes a file we remove
        finally:
            os.close(fd)


def _is_still_at(fd: int, path: str) -> bool:
    """Whether the open file `fd` is still the file at `path` (not removed or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextlib.contextmanager
def hold_output_dir(output_dir: str, *, is_main: bool, process_count: int = 1) -> Iterator[None]:
    """Holds the output_dir lock for the `with` block (process 0 only; see the module docs).

    With several processes, every process must enter together: they exchange whether process 0
    got the lock, and all raise RunLockedError if it did not.
    """
    lock = RunLock(output_dir) if is_main else None
    error: RunLockedError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as e:
            error = e
    if process_count > 1:
        _agree_on_lock(error is None, output_dir)
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _agree_on_lock(locked_here: bool, output_dir: str) -> None:
    """All processes learn process 0's outcome; the others raise if it failed."""
    import numpy as np
    from jax.experimental import multihost_utils

    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(locked_here)))
    if not locked and locked_here:  # not process 0: it has (or will) raise its own message
        raise RunLockedError(
            f"process 0 could not lock output_dir {output_dir}: see its error message"
        )
