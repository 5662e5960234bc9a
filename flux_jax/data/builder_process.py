"""The token-store builder process: `build_store` run in a fresh Python (`python -m
flux_jax.data.builder_process REQUEST`) so that the training process never forks after JAX has
started its threads, never re-imports a user's unguarded script, and never holds the texts. Its
log records come back as JSON lines on its stderr and are re-emitted in the parent; its error is
rebuilt in the parent with the same type and message (see flux_jax.data.token_cache)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from flux_jax.data.loading import LoadSettings
from flux_jax.data.records import DataError

log = logging.getLogger("flux_jax.data.token_cache")

LOG_PREFIX = "\x1fflux_jax-log "  # marks the child's forwarded log records on its stderr


def build_in_child(
    directory: Path,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    workers: int,
    settings: LoadSettings,
) -> None:
    """`build_store` in a child process (module docstring); its log records are re-emitted
    here and its error, if any, raised here."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="flux_jax_tokens_") as tmp:
        request, result = Path(tmp) / "request.pkl", Path(tmp) / "result.json"
        job = {"directory": str(directory), "path": str(path), "tokenizer": tokenizer}
        job |= {"workers": workers, "settings": settings, "result": str(result)}
        with request.open("wb") as f:
            pickle.dump(job, f)
        command = [sys.executable, "-m", "flux_jax.data.builder_process", str(request)]
        log.info("%s: tokenising into a new token store with %d worker(s)", path, workers)
        child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        try:
            forward_child_output(child.stderr)
            code = child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        outcome = json.loads(result.read_text()) if result.exists() else None
    if code != 0:
        raise child_error(outcome, code, path)


def forward_child_output(lines: Iterator[str]) -> None:
    """Re-emits the child's log records through this process's loggers; other output (library
    warnings, a crash's traceback) goes to stderr as it is."""
    for line in lines:
        if line.startswith(LOG_PREFIX):
            record = json.loads(line[len(LOG_PREFIX) :])
            logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])
        else:
            sys.stderr.write(line)


def child_error(outcome: dict | None, code: int, path: str | Path) -> Exception:
    """The child's exception, rebuilt with its type and message (its traceback as a note)."""
    if outcome is None:
        return RuntimeError(
            f"{path}: the token-store builder process exited with code {code} before reporting "
            "(killed, or out of memory; its output is above). Run again, lower "
            "data.tokenize_workers, or set data.token_cache: false to tokenise in this process"
        )
    module, _, name = outcome["type"].rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    error: Exception
    if isinstance(cls, type) and issubclass(cls, DataError):
        error = cls(outcome["source"], outcome["line"], outcome["reason"], outcome["field"])
    else:
        try:
            error = cls(outcome["message"])
        except Exception:  # a class that takes other arguments: keep its name and message
            error = RuntimeError(f"{outcome['type']}: {outcome['message']}")
    error.add_note("raised in the token-store builder process:\n" + outcome["traceback"])
    return error


class ForwardingHandler(logging.Handler):
    """The child's log records, one JSON line each on stderr, for forward_child_output."""

    def emit(self, record: logging.LogRecord) -> None:
        line = {"name": record.name, "level": record.levelno, "message": record.getMessage()}
        sys.stderr.write(LOG_PREFIX + json.dumps(line) + "\n")
        sys.stderr.flush()


def child_main(request_path: str) -> int:
    """The child process: builds the store of the pickled request, writes the outcome."""
    root = logging.getLogger()
    root.handlers[:] = [ForwardingHandler()]
    root.setLevel(logging.INFO)
    with open(request_path, "rb") as f:
        job = pickle.load(f)
    from flux_jax.data.token_cache import build_store  # the parent module imports this one

    try:
        build_store(
            Path(job["directory"]),
            job["path"],
            job["tokenizer"],
            job["settings"],
            workers=job["workers"],
        )
    except Exception as err:
        outcome = {
            "type": f"{type(err).__module__}.{type(err).__qualname__}",
            "message": str(err),
            "traceback": traceback.format_exc(),
            **{k: getattr(err, k, None) for k in ("source", "line", "reason", "field")},
        }
        Path(job["result"]).write_text(json.dumps(outcome, default=str), encoding="utf-8")
        return 1
    return 0


if __name__ == "__main__":
    # Through the package's module (not __main__), so pickled classes and the pool's task
    # function have their importable names.
    from flux_jax.data.builder_process import child_main as _child_main

    sys.exit(_child_main(sys.argv[1]))
