"""Which exceptions are the user's to fix, and how the `flux-jax` command reports them.

A user error is something the person running flux_jax can fix without reading our code: a bad
config, a missing or malformed data file, a model directory or checkpoint that is not what it
should be, an output_dir another run holds, a run that stopped because training went non-finite.
The command prints its message as one `flux-jax: error: ...` line (more lines only when the message
itself has them) and exits non-zero, without a traceback. Everything else (AssertionError, a
TypeError from our code, an XLA error) is a bug or a crash, and keeps its traceback.

The error classes raised across the package keep their historical bases (ConfigError and
CheckpointMismatchError are ValueErrors), so this module classifies by base class rather than
asking every raiser to derive from UserError.
"""

from __future__ import annotations

# Exit codes of the `flux-jax` command.
EXIT_OK = 0
EXIT_RUN_FAILED = 1  # the run could not start or stopped: data, model, checkpoint, lock, NaN
EXIT_USAGE = 2  # the command line or the config is wrong (argparse uses 2 too)
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


class UserError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback."""


class UsageError(UserError):
    """A command line the `flux-jax` command cannot run (exit code 2)."""


def is_usage_error(error: BaseException) -> bool:
    """A config or command-line mistake (exit code 2)."""
    from flux_jax.config import ConfigError

    return isinstance(error, ConfigError | UsageError)


def is_user_error(error: BaseException) -> bool:
    """Whether the CLI should print `error` as one message instead of a traceback.

    ValueError: every input check in flux_jax raises one with a message naming the file and the
    field (config, data records, model dirs, checkpoint mismatches, JSON decoding). OSError: the
    file system said no (missing file, permission, disk full).
    """
    return isinstance(error, UserError | ValueError | OSError)


def exit_code_of(error: BaseException) -> int:
    """The `flux-jax` exit code for a user error."""
    return EXIT_USAGE if is_usage_error(error) else EXIT_RUN_FAILED


def error_message(error: BaseException) -> str:
    """`flux-jax: error: <message>`; the exception's type when it has no message."""
    text = str(error).strip() or type(error).__name__
    return f"flux-jax: error: {text}"
