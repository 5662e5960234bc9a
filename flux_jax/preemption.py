"""Stopping on SIGTERM: the trainer polls `is_preempted`, saves a final checkpoint and exits.

A preempted job (a spot VM, a scheduler's time limit) gets SIGTERM and a grace period; without a
handler the process dies at once and the work since the last checkpoint is lost.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


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
