"""Scanning a stack of decoder layers that mixes dense-MLP and mixture-of-experts layers.

Parameters are stacked per kind: attention and norms over all L layers (`layers/self_attn/...`),
the dense MLPs over the dense layers only (`layers/mlp/...`, [L_dense, ...]) and the sparse blocks
over the sparse layers only (`layers/moe/...`, [L_sparse, ...]). A `jax.lax.scan` needs one kind
per body, so the layers are cut into runs of consecutive same-kind layers and each run is one scan.
A dense model and an all-sparse one (every released Qwen3-MoE) are a single run: one scan over
unsliced parameters, exactly as before MoE existed. A mixed stack costs one compiled body per run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]
MLP_KEYS = ("mlp", "moe")  # the per-kind parts of a layer: dense MLP or sparse block


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """Layers [start, stop) all of one kind; `kind_start` is `start`'s index in its kind's stack."""

    sparse: bool
    start: int
    stop: int
    kind_start: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def mlp_key(self) -> str:
        return "moe" if self.sparse else "mlp"


def layer_runs(sparse_layers: Sequence[bool]) -> tuple[LayerRun, ...]:
    """The maximal runs of consecutive same-kind layers, in layer order."""
    runs: list[LayerRun] = []
    seen = {False: 0, True: 0}
    for i, sparse in enumerate(sparse_layers):
        if runs and runs[-1].sparse == sparse:
            runs[-1] = dataclasses.replace(runs[-1], stop=i + 1)
        else:
            runs.append(LayerRun(sparse, i, i + 1, seen[sparse]))
        seen[sparse] += 1
    return tuple(runs)


def _slice_leading(tree: Any, start: int, stop: int, full: int) -> Any:
    if start == 0 and stop == full:  # a single run: the stacked arrays as they are
        return tree
    return jax.tree.map(lambda x: x[start:stop], tree)


def run_params(stacked: Params, run: LayerRun, num_layers: int) -> Params:
    """One run's layer parameters: the shared parts sliced to [start, stop), the run kind's MLP
    stack sliced to its own positions, the other kind left out."""
    shared = {k: v for k, v in stacked.items() if k not in MLP_KEYS}
    params = _slice_leading(shared, run.start, run.stop, num_layers)
    kind = stacked[run.mlp_key]
    kind_layers = jax.tree.leaves(kind)[0].shape[0]
    params[run.mlp_key] = _slice_leading(
        kind, run.kind_start, run.kind_start + run.size, kind_layers
    )
    return params


def scan_runs(
    step: Callable[[Any, Params, Any, LayerRun], tuple[Any, Any]],
    carry: Any,
    stacked: Params,
    runs: Sequence[LayerRun],
    per_layer: Any = None,
) -> tuple[Any, list[Any]]:
    """`jax.lax.scan` of `step(carry, layer_params, layer_xs, run)` over each run in turn.

    `per_layer` is a tree of arrays with a leading [L] axis (a KV cache) sliced to each run and
    handed to `step` layer by layer. Returns the final carry and each run's stacked outputs.
    """
    num_layers = runs[-1].stop
    outputs = []
    for run in runs:
        xs = (
            run_params(stacked, run, num_layers),
            _slice_leading(per_layer, run.start, run.stop, num_layers),
        )
        carry, ys = jax.lax.scan(lambda c, x, run=run: step(c, x[0], x[1], run), carry, xs)
        outputs.append(ys)
    return carry, outputs


def concat_runs(outputs: Sequence[Any], runs: Sequence[LayerRun], *, sparse_only: bool) -> Any:
    """Each run's stacked outputs joined along the layer axis, in layer order (only the sparse
    runs' when `sparse_only`, e.g. router logits)."""
    chosen = [ys for ys, run in zip(outputs, runs, strict=True) if run.sparse or not sparse_only]
    if len(chosen) == 1:
        return chosen[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *chosen)
