"""A file's tensors against the ones a model expects: what is missing, extra or the wrong shape.

Both weight files flux_jax reads, a Hugging Face checkpoint (hf_io.py) and a PEFT adapter
(peft_io.py), are checked whole before anything is loaded, and every problem goes into one error:
a user fixing a mismatched file should not have to rerun once per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Names shown per kind of problem; the rest are counted.
SHOWN_NAMES = 20


def inventory_problems(
    found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]]
) -> list[str]:
    """One line per kind of problem of the tensors `found` (name -> shape, as the file holds them)
    against `expected` (name -> shape): missing tensors, unexpected tensors, shape mismatches,
    each counted and naming its first `SHOWN_NAMES`. Empty when they match."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    mismatched = [
        f"{name}: checkpoint {tuple(found[name])}, expected {tuple(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_first(missing, ', ')}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_first(unexpected, ', ')}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_first(mismatched, '; ')}")
    return problems


def _first(items: list[str], separator: str) -> str:
    shown = separator.join(items[:SHOWN_NAMES])
    hidden = len(items) - SHOWN_NAMES
    return shown + (f"{separator}... (+{hidden} more)" if hidden > 0 else "")
