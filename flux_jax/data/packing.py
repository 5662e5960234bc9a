"""Shared-prefix and packed batches: each pair's prompt runs once, several pairs share a row.

The batch contract (the train step recognises it by `branch_ids`), for B pairs in R rows of T
tokens, S = B / R pairs per row:

    input_ids     int32 [R, T]  per pair `prompt | chosen | rejected` (share_prefix) or
                                `prompt | chosen | prompt | rejected`; pairs back to back, then pad
    segment_ids   int32 [R, T]  the pair's slot in its row + 1 (1 .. S); 0 on padding
    branch_ids    int32 [R, T]  0 = shared prompt, 1 = chosen, 2 = rejected (an unshared prompt copy
                                takes its response's branch); 0 on padding
    positions     int32 [R, T]  restart at 0 for every pair; the rejected branch restarts at the
                                prompt length P (it continues the prompt, like the chosen one)
    source_index  int32 [R, T]  the row index whose hidden state predicts token t: t - 1, except
                                the first rejected token of a shared prompt, predicted by the last
                                prompt token (index start + P - 1)
    loss_mask     int32 [R, T]  1 on scored response tokens (chosen and rejected)
    scored_positions int32 [R, W]  the columns where loss_mask is 1, then -1, when W = T / 4 or
                                T / 2 holds them (flux_jax.data.batching.score_window)
    pair_order    int32 [R, S]  which of the collated examples sits in each slot
    ref_chosen_logps, ref_rejected_logps  float32 [R, S]  when every pair carries ref_logps

Attention (flux_jax.models.qwen.layers.branch_segment_mask): causal, within a segment, and a
token of branch b sees keys of branch 0 or b. A pair's scored tokens, their positions and what
they attend to are exactly those of the standard layout (flux_jax.data.batching), so the
log-probs agree; only the prompt is computed once instead of twice, and with S > 1 the padding
of short pairs is filled with other pairs.

Static shapes: S is fixed for a run, so R = B / S is too, and T is the smallest bucket length
that holds the longest row (past the largest bucket: the next multiple of it). Every row holds
exactly S pairs, which keeps everything row-local: per-pair values are reduced per row into
[R, S], gradient accumulation splits rows into micro-batches of equally many pairs, a data-
parallel shard never needs another shard's rows, and hosts can collate independently.
Pairs are dealt to rows longest first, each to the shortest row that still has a free slot,
which keeps the longest row (and so T) short.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from flux_jax.data.batching import add_scored_positions, bucket_length
from flux_jax.data.tokenization import PreferenceExample

PROMPT, CHOSEN, REJECTED = 0, 1, 2
PACKED_KEYS = ("input_ids", "segment_ids", "branch_ids", "positions", "source_index", "loss_mask")


def pair_length(example: PreferenceExample, *, share_prefix: bool) -> int:
    """Tokens one pair takes in a row."""
    prompt = len(example.prompt_ids) * (1 if share_prefix else 2)
    return prompt + len(example.chosen_ids) + len(example.rejected_ids)


def assign_rows(lengths: Sequence[int], pairs_per_row: int) -> list[list[int]]:
    """Indices of `lengths` dealt into len / pairs_per_row rows of exactly pairs_per_row each,
    longest first to the currently shortest row with a free slot."""
    if pairs_per_row < 1 or len(lengths) % pairs_per_row:
        raise ValueError(f"{len(lengths)} pairs do not fill rows of {pairs_per_row} pairs")
    num_rows = len(lengths) // pairs_per_row
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    heap = [(0, row) for row in range(num_rows)]  # (tokens so far, row); full rows leave it
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, row = heapq.heappop(heap)
        rows[row].append(index)
        if len(rows[row]) < pairs_per_row:
            heapq.heappush(heap, (load + lengths[index], row))
    return rows


def row_width(length: int, bucket_lengths: Sequence[int]) -> int:
    """The smallest bucket >= length; past the largest bucket, the next multiple of it."""
    if length <= bucket_lengths[-1]:
        return bucket_length(length, bucket_lengths)
    return -(-length // bucket_lengths[-1]) * bucket_lengths[-1]


def max_pairs_per_row(
    local_batch: int, global_batch: int, row_multiple: int, limit: int | None = None
) -> int:
    """The most pairs per row (at most `limit`) such that the rows still divide as the step needs.

    `local_batch` pairs (this process's share) must fill whole rows, and the global row count
    must be a multiple of `row_multiple` (e.g. grad_accum_steps x data-parallel devices).
    """
    for pairs in range(min(local_batch, limit or local_batch), 0, -1):
        if local_batch % pairs == 0 and (global_batch // pairs) % row_multiple == 0:
            return pairs
    raise ValueError(
        f"{global_batch} pairs cannot make a multiple of {row_multiple} rows, even one per row"
    )


def collate_shared_prefix(
    examples: Sequence[PreferenceExample],
    pad_id: int,
    bucket_lengths: Sequence[int],
    *,
    pairs_per_row: int = 1,
    share_prefix: bool = True,
    score_windows: bool = True,
) -> dict[str, np.ndarray]:
    """One batch in the layout of the module docstring.

    `pairs_per_row` = 1 gives one pair per row (prefix sharing alone); more packs pairs. With
    `share_prefix=False` each response keeps its own copy of the prompt (packing alone).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of pairs")
    lengths = [pair_length(e, share_prefix=share_prefix) for e in examples]
    rows = assign_rows(lengths, pairs_per_row)
    width = row_width(max(sum(lengths[i] for i in row) for row in rows), bucket_lengths)
    shape = (len(rows), width)
    batch = {key: np.zeros(shape, np.int32) for key in PACKED_KEYS}
    batch["input_ids"][:] = pad_id
    batch["source_index"][:] = np.maximum(np.arange(width, dtype=np.int32) - 1, 0)
    batch["pair_order"] = np.asarray(rows, np.int32).reshape(len(rows), pairs_per_row)
    for r, row in enumerate(rows):
        start = 0
        for slot, index in enumerate(row, start=1):
            start = _write_pair(batch, r, start, slot, examples[index], share_prefix)
    if score_windows:
        add_scored_positions(batch, ("loss_mask",))
    if all(e.ref_logps is not None for e in examples):
        ref_Bx2 = np.asarray([e.ref_logps for e in examples], np.float32)
        order_RxS = batch["pair_order"]
        batch["ref_chosen_logps"] = ref_Bx2[order_RxS, 0]
        batch["ref_rejected_logps"] = ref_Bx2[order_RxS, 1]
    return batch


def _write_pair(
    batch: dict[str, np.ndarray],
    row: int,
    start: int,
    slot: int,
    example: PreferenceExample,
    share_prefix: bool,
) -> int:
    """Writes one pair into `row` from column `start`; returns the column after it."""
    prompt, p = example.prompt_ids, len(example.prompt_ids)
    # (ids, branch, position of the first token, scored)
    if share_prefix:
        parts = [(prompt, PROMPT, 0, False), (example.chosen_ids, CHOSEN, p, True)]
        parts.append((example.rejected_ids, REJECTED, p, True))
    else:
        parts = [(prompt, CHOSEN, 0, False), (example.chosen_ids, CHOSEN, p, True)]
        parts += [(prompt, REJECTED, 0, False), (example.rejected_ids, REJECTED, p, True)]
    last_prompt = start + p - 1  # the (shared) prompt's last token
    for ids, branch, first_position, scored in parts:
        end = start + len(ids)
        batch["input_ids"][row, start:end] = ids
        batch["segment_ids"][row, start:end] = slot
        batch["branch_ids"][row, start:end] = branch
        batch["positions"][row, start:end] = np.arange(len(ids)) + first_position
        if scored and len(ids):
            batch["loss_mask"][row, start:end] = 1
            if p == 0:
                # An empty prompt: nothing predicts the first response token (the standard
                # layout's column 0), so it is not scored.
                batch["loss_mask"][row, start] = 0
            elif share_prefix and branch == REJECTED:
                batch["source_index"][row, start] = last_prompt
        start = end
    return start
