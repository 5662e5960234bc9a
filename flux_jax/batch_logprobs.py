"""Per-token log-probs of a DPO batch in each layout, and their per-pair sums.

The standard layout scores chosen and rejected rows in one forward pass (concatenated along the
batch, [2B, T]); the shared-prefix / packed layout of flux_jax.data.packing (recognised by its
`branch_ids`) holds S pairs in each of R rows, and its per-pair values come out flattened to
[B = R * S] in `pair_order`'s slot order. Optional extras of the same pass: LoRA adapters on top
of the weights, the MoE router's load-balancing loss, and LM-head statistics (WPO, logits/*).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax import logprobs
from flux_jax.lora import ActiveAdapters
from flux_jax.models.qwen import moe

PyTree = Any
SEQUENCE_FIELDS = ("input_ids", "loss_mask", "segment_ids", "positions")


def paired_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Chosen rows then rejected rows, [2B, T], for one forward pass."""
    return {
        name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)
        for name in SEQUENCE_FIELDS
    }


def router_aux_loss(model: Any, out: Any, segment_ids_NxT: jax.Array) -> tuple[Any, jax.Array]:
    """(hidden states, load-balancing loss over the real tokens) of a forward that returned its
    router logits."""
    hidden, router_logits = out
    aux = moe.load_balancing_loss(router_logits, model.moe_spec.top_k, segment_ids_NxT > 0)
    return hidden, aux


def is_shared_prefix(batch: dict[str, jax.Array]) -> bool:
    """Whether `batch` is in the shared-prefix / packed layout (flux_jax.data.packing)."""
    return "branch_ids" in batch


def _layout_rows(
    batch: dict[str, jax.Array],
) -> tuple[dict[str, jax.Array], dict[str, jax.Array | None]]:
    """The rows one forward pass scores ([2B, T] chosen then rejected, or the packed [R, T] as
    they are) and the layout's extra inputs to `_score_rows`.

    Shared-prefix rows hold `prompt | chosen | rejected` under a branch mask; every scored token
    is predicted from the hidden state at its `source_index` (the last prompt token for the first
    rejected token), so each log-prob equals the standard layout's.
    """
    if is_shared_prefix(batch):
        return batch, {
            "branch_ids_BxT": batch["branch_ids"],
            "source_index_BxT": batch["source_index"],
            "scored_positions_BxW": batch.get("scored_positions"),
        }
    scored_NxW = None
    if "chosen_scored_positions" in batch:
        scored_NxW = jnp.concatenate(
            [batch["chosen_scored_positions"], batch["rejected_scored_positions"]], axis=0
        )
    return paired_inputs(batch), {"scored_positions_BxW": scored_NxW}


def _score_rows(
    graphdef: nnx.GraphDef,
    params: PyTree,
    rows: dict[str, jax.Array],
    chunk_size: int | None,
    lora: ActiveAdapters | None,
    router_aux: bool,
    stats: tuple[str, ...],
    branch_ids_BxT: jax.Array | None = None,
    source_index_BxT: jax.Array | None = None,
    scored_positions_BxW: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, dict[str, jax.Array]]:
    """One forward pass over `rows` (input_ids, positions, segment_ids, loss_mask, [N, T]):
    (token log-probs [N, T], the router load-balancing loss when `router_aux` else None, the
    LM-head `stats`). Both layouts score through this (their extras from `_layout_rows`)."""
    model = nnx.merge(graphdef, params)
    hidden_NxTxD = model(
        rows["input_ids"],
        rows["positions"],
        segment_ids_BxT=rows["segment_ids"],
        branch_ids_BxT=branch_ids_BxT,
        return_hidden=True,
        lora=lora,
        return_router_logits=router_aux,
    )
    aux = None
    if router_aux:
        hidden_NxTxD, aux = router_aux_loss(model, hidden_NxTxD, rows["segment_ids"])
    token_logps_NxT, stats_NxT = logprobs.token_logprobs_and_stats(
        hidden_NxTxD,
        model.lm_head_weight(),  # fp32 master copy: chunk gradients accumulate in its dtype
        rows["input_ids"],
        rows["loss_mask"],
        chunk_size=chunk_size,
        compute_dtype=model.compute_dtype,
        source_index_BxT=source_index_BxT,
        scored_positions_BxW=scored_positions_BxW,
        stats=stats,
    )
    return token_logps_NxT, aux, stats_NxT


def token_logprobs(
    graphdef: nnx.GraphDef,
    params: PyTree,
    batch: dict[str, jax.Array],
    chunk_size: int | None,
    lora: ActiveAdapters | None = None,
    router_aux: bool = False,
    stats: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array, jax.Array | None, dict[str, jax.Array]]:
    """Per-token log-probs and their loss mask, [2B, T] (chosen rows first) or [R, T] (packed)
    depending on the layout, the router load-balancing loss when `router_aux` (MoE models; else
    None), and the LM-head `stats` (logprobs.HEAD_STATS, {name: [N, T]}; {} when none are asked
    for), all from one forward pass. `lora`: the adapters applied on top of `params` (None: the
    plain model)."""
    rows, layout = _layout_rows(batch)
    token_logps_NxT, aux, stats_NxT = _score_rows(
        graphdef, params, rows, chunk_size, lora, router_aux, stats, **layout
    )
    return token_logps_NxT, rows["loss_mask"], aux, stats_NxT


def paired_token_logprobs(
    graphdef: nnx.GraphDef,
    params: PyTree,
    batch: dict[str, jax.Array],
    chunk_size: int | None,
    lora: ActiveAdapters | None = None,
    *,
    router_aux: bool = False,
    stats: tuple[str, ...] = (),
) -> tuple[Any, ...]:
    """`token_logprobs` of a standard-layout batch as (log-probs [2B, T], loss mask), then the
    router loss when `router_aux`, then the `stats` dict when any are asked for."""
    if is_shared_prefix(batch):
        raise ValueError(
            "paired_token_logprobs: this batch is in the shared-prefix / packed layout (it has "
            "`branch_ids`); call batch_logprobs.token_logprobs, which handles both layouts"
        )
    token_logps_NxT, mask_NxT, aux, stats_NxT = token_logprobs(
        graphdef, params, batch, chunk_size, lora, router_aux, stats
    )
    out = (token_logps_NxT, mask_NxT, *((aux,) if router_aux else ()))
    return (*out, stats_NxT) if stats else out


def pair_sums(values_NxT: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-pair sums [B] of a per-token value over the chosen and over the rejected response.

    Packed rows are reduced per row into their S pair slots (segment id - 1), then flattened to
    [R * S] in `pair_order`'s slot order. A masked sum, not a one-hot matmul: TPUs would run an fp32
    matmul at bf16 precision by default.
    """
    if not is_shared_prefix(batch):
        half = values_NxT.shape[0] // 2
        sums_N = values_NxT.sum(axis=-1)
        return sums_N[:half], sums_N[half:]
    slots = batch["pair_order"].shape[1]
    slot_ids_1x1xS = jnp.arange(1, slots + 1, dtype=jnp.int32)[None, None, :]
    in_slot_RxTxS = batch["segment_ids"][:, :, None] == slot_ids_1x1xS
    scored_RxT = batch["loss_mask"].astype(bool)
    zero = jnp.zeros((), values_NxT.dtype)

    def side(branch: int) -> jax.Array:
        keep_RxTxS = in_slot_RxTxS & (scored_RxT & (batch["branch_ids"] == branch))[:, :, None]
        values_RxTxS = jnp.broadcast_to(values_NxT[:, :, None], keep_RxTxS.shape)
        return jnp.where(keep_RxTxS, values_RxTxS, zero).sum(axis=1).reshape(-1)

    return side(1), side(2)


def pair_counts(mask_NxT: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Scored response tokens per pair [B], chosen and rejected."""
    if not is_shared_prefix(batch):
        mask_NxT = mask_NxT.at[:, 0].set(0)  # column 0 is never scored in the standard layout
    return pair_sums(mask_NxT.astype(jnp.int32), batch)


def precomputed_ref(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    # [B], or [R, S] in the packed layout: flattened in the same slot order as pair_sums.
    return batch["ref_chosen_logps"].reshape(-1), batch["ref_rejected_logps"].reshape(-1)
