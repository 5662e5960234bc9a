"""Restore targets: a tree's abstract twin (shapes, dtypes, shardings) and the checks that a
checkpoint fits it, run before orbax reads any array.

A restore target is a tree of `jax.ShapeDtypeStruct`s, each with the sharding its array is to be
restored onto (`abstract_of` of a live tree gives one in that tree's layout). `check_compatible`
compares orbax's saved tree metadata with it by path and shape, so a checkpoint of another model
fails with `CheckpointMismatchError` naming the parameters; dtypes may differ (orbax casts).
"""

from __future__ import annotations

from typing import Any

import jax

from flux_jax.checkpoint_errors import CheckpointMismatchError

PyTree = Any


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


def check_shardings(abstract: PyTree) -> None:
    """Raises ValueError unless every leaf of a restore target carries its sharding."""
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
