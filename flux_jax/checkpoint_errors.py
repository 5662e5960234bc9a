"""What goes wrong with checkpoints, in words a user can act on.

CheckpointMismatchError: the arrays do not fit the model (another config). CheckpointRestoreError:
no step of a directory could be read. CheckpointSaveError: a save failed, with the OS cause found
in the library's error (orbax/tensorstore report ENOSPC/EFBIG as text: `os_error_code='27'`).
"""

from __future__ import annotations

import errno as errno_lib
import os
import re
from collections.abc import Sequence

_MAX_LISTED = 25  # per category in a mismatch message
_MAX_CAUSE_CHARS = 300  # of a library's error message, quoted in ours


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


class CheckpointRestoreError(ValueError):
    """No checkpoint of a directory could be restored: each step directory with its cause."""

    def __init__(self, directory: str, failures: Sequence[tuple[str, str]]):
        self.directory = directory
        self.failures = list(failures)  # (step directory, cause)
        rows = "\n".join(f"  {path}: {cause}" for path, cause in self.failures)
        super().__init__(
            f"no checkpoint in {directory} could be restored:\n{rows}\n"
            "Repair or move these step directories away to start over (the run does not "
            "silently start from scratch over existing checkpoints)."
        )


class CheckpointSaveError(OSError):
    """A checkpoint save failed (e.g. disk full): names the directory and the OS cause.

    `errno` is the OS error number when one was found in the cause (ENOSPC, EFBIG, ...);
    `advice` says what is left intact and how to go on.
    """

    def __init__(self, directory: str, cause: BaseException, *, advice: str):
        code = _os_error_code(cause)
        what = (
            f"{os.strerror(code)} ({errno_lib.errorcode.get(code, code)})"
            if code is not None
            else describe_error(cause)
        )
        if code in (errno_lib.ENOSPC, errno_lib.EFBIG, errno_lib.EDQUOT):
            what += " - the disk is full or a file-size limit (ulimit -f) was hit"
        super().__init__(f"saving checkpoint {directory} failed: {what}; {advice}")
        self.errno = code
        self.directory = directory
        self.cause = describe_error(cause)


def _os_error_code(error: BaseException) -> int | None:
    """The OS errno behind an error: an OSError in its chain, or tensorstore's os_error_code."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        match = re.search(r"os_error_code='?(\d+)", str(error))
        if match:
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def describe_error(error: BaseException) -> str:
    """`Type: first line of the message`, shortened: a library's error quoted in ours."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > _MAX_CAUSE_CHARS:
        text = text[:_MAX_CAUSE_CHARS] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
