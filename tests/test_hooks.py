"""Hooks with an interval (flux_jax.hooks): when each fires, in which order, and what it refuses."""

from __future__ import annotations

import pytest

from flux_jax.hooks import Hooks


def _fired(hooks: Hooks, last_step: int, *, stop_at: int | None = None) -> list[tuple[str, int]]:
    fired = []
    for step in range(1, last_step + 1):
        stopping = step == stop_at
        for hook in hooks.due(step, last_step, stopping=stopping):
            fired.append((hook.fn(step), step))
        if stopping:
            break
    return fired


def test_every_n_steps_and_the_last_step():
    hooks: Hooks[int] = Hooks()
    hooks.add(lambda step: "every3", every=3)
    assert [s for _, s in _fired(hooks, 10)] == [3, 6, 9, 10]
    assert [s for _, s in _fired(hooks, 9)] == [3, 6, 9]  # the last step fires once


def test_every_zero_is_the_last_step_only_and_at_last_can_be_off():
    hooks: Hooks[int] = Hooks()
    hooks.add(lambda step: "last", every=0)
    hooks.add(lambda step: "interval", every=4, at_last=False)
    assert _fired(hooks, 10) == [("interval", 4), ("interval", 8), ("last", 10)]


def test_on_stop_fires_when_the_run_stops_early_in_the_order_added():
    hooks: Hooks[int] = Hooks()
    hooks.add(lambda step: "eval", every=5)
    hooks.add(lambda step: "save", every=5, on_stop=True)
    assert _fired(hooks, 20, stop_at=7) == [("eval", 5), ("save", 5), ("save", 7)]


def test_run_calls_due_hooks_with_the_event():
    hooks: Hooks[str] = Hooks()
    seen = []
    hooks.add(lambda event: seen.append(("a", event)), every=2)
    hooks.add(lambda event: seen.append(("b", event)), every=1)
    hooks.run(2, 5, "x")
    hooks.run(3, 5, "y")
    assert seen == [("a", "x"), ("b", "x"), ("b", "y")]
    assert len(hooks) == 2


@pytest.mark.parametrize("every", [-1, 1.5, True, "2"])
def test_a_bad_interval_is_refused(every):
    with pytest.raises(ValueError, match="every"):
        Hooks().add(lambda event: None, every=every)
