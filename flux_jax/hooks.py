"""Hooks: what a training run does every N steps, registered with its interval.

    hooks = Hooks()
    hooks.add(evaluate, every=50)                      # steps 50, 100, ... and the last step
    hooks.add(save, every=200, on_stop=True)           # ... and when SIGTERM stops the run
    for hook in hooks.due(step, last_step, stopping=stopping):
        hook.fn(event)

Modelled on levanter's `Trainer.add_hook(fn, every=N)`. The trainer keeps two lists: hooks on a
finished step's metrics (`StepResult`, the step callbacks), and hooks on the fresh state
(`StepState`: eval, checkpoint saves, `best`). A hook runs when its step is a multiple of `every`,
on the run's last step (`at_last`), and when the run stops early (`on_stop`); `every=0` leaves
only the last two. Hooks run in the order they were added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

Event = TypeVar("Event")


@dataclasses.dataclass(frozen=True)
class StepState:
    """What a state hook receives: the 1-based step just taken and the state after it."""

    step: int
    state: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Hook(Generic[Event]):
    """`fn(event)` with when it runs: every `every` steps (0: not by interval), on the last
    step (`at_last`), and when the run stops before its last step (`on_stop`)."""

    fn: Callable[[Event], Any]
    every: int
    at_last: bool = True
    on_stop: bool = False

    def is_due(self, step: int, last_step: int, *, stopping: bool = False) -> bool:
        return (
            (self.every > 0 and step % self.every == 0)
            or (self.at_last and step == last_step)
            or (self.on_stop and stopping)
        )


class Hooks(Generic[Event]):
    """An ordered list of hooks on one kind of event."""

    def __init__(self) -> None:
        self._hooks: list[Hook[Event]] = []

    def add(
        self,
        fn: Callable[[Event], Any],
        *,
        every: int,
        at_last: bool = True,
        on_stop: bool = False,
    ) -> Callable[[Event], Any]:
        """Registers `fn` to run every `every` steps (see `Hook`); returns `fn`, so it can be
        used as a decorator."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"a hook's `every` is a step count >= 0, got {every!r}")
        self._hooks.append(Hook(fn, every, at_last=at_last, on_stop=on_stop))
        return fn

    def due(self, step: int, last_step: int, *, stopping: bool = False) -> list[Hook[Event]]:
        """The hooks to run after `step` of a run whose last step is `last_step`, in order."""
        return [h for h in self._hooks if h.is_due(step, last_step, stopping=stopping)]

    def run(self, step: int, last_step: int, event: Event, *, stopping: bool = False) -> None:
        """Calls every due hook with `event`, in order."""
        for hook in self.due(step, last_step, stopping=stopping):
            hook.fn(event)

    def __len__(self) -> int:
        return len(self._hooks)
