"""Padding pairs into fixed-shape batches: bucket lengths and the batch dict.

The batch contract, for B pairs padded on the right to one bucket length T:

    chosen_input_ids     int32 [B, T]  prompt ids + chosen completion ids, then pad_id
    chosen_loss_mask     int32 [B, T]  1 on completion tokens (eos included), 0 elsewhere;
                                       in input coordinates, so position 0 is always 0
    chosen_segment_ids   int32 [B, T]  1 on real tokens, 0 on padding
    chosen_positions     int32 [B, T]  0 .. len - 1 on real tokens, 0 on padding
    rejected_*           the same four for the rejected completion
    ref_chosen_logps     float32 [B]   only when every pair carries precomputed reference
    ref_rejected_logps   float32 [B]   log-probs (PreferenceExample.ref_logps)

    chosen_scored_positions   int32 [B, W]  the columns where loss_mask is 1, left-aligned, then
    rejected_scored_positions int32 [B, W]  -1; only when every row's responses fit in W = T / 4
                                            or T / 2 (`score_window`); the LM head then runs on
                                            W positions per row instead of T (flux_jax.logprobs)

Chosen and rejected share T: the smallest bucket length >= the longest sequence of the batch, on
either side. Only a few bucket lengths exist, so jit compiles only a few shapes: the trainer's
default ladder (`geometric_bucket_lengths`) pads at most ~12% past a batch's longest row with 22
lengths up to 1024 tokens; `default_bucket_lengths` (powers of two) is the coarse ladder of the
standalone iterator and eval helpers. The pad id is
never used to find padding: segment_ids says what is real.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flux_jax.config_schema import LEAVES
from flux_jax.data.tokenization import PreferenceExample

BATCH_KEYS = tuple(
    f"{side}_{name}"
    for side in ("chosen", "rejected")
    for name in ("input_ids", "loss_mask", "segment_ids", "positions")
)


def default_bucket_lengths(max_length: int, min_length: int = 64) -> tuple[int, ...]:
    """Powers of two from min_length up to below max_length, then max_length itself."""
    if max_length < 1 or min_length < 1:
        raise ValueError(f"need positive lengths, got {max_length=}, {min_length=}")
    lengths = []
    length = 1 << (min_length - 1).bit_length()  # the first power of two >= min_length
    while length < max_length:
        lengths.append(length)
        length *= 2
    return (*lengths, max_length)


# The trainer's default ladder (the config's data.bucket_ratio and data.bucket_multiple, defined
# in config_schema): each bucket at most 12.5% longer than the one before, so a batch pads at
# most ~12% past its longest row, in steps of 32 tokens. From 64 to max_length that is 22
# lengths for 1024, 28 for 2048, 34 for 4096 (each compiles into at most
# len(SCORE_WINDOW_FRACTIONS) + 1 step shapes).
DEFAULT_BUCKET_RATIO = LEAVES["data.bucket_ratio"].default
DEFAULT_BUCKET_MULTIPLE = LEAVES["data.bucket_multiple"].default


def geometric_bucket_lengths(
    max_length: int,
    *,
    ratio: float = DEFAULT_BUCKET_RATIO,
    multiple: int = DEFAULT_BUCKET_MULTIPLE,
    min_length: int = 64,
) -> tuple[int, ...]:
    """min_length, then each length the one before x `ratio` rounded down to a multiple of
    `multiple` (but at least `multiple` more), ending with max_length itself.

    Below multiple / (ratio - 1) tokens the steps are `multiple` tokens (ratio > 1 + step);
    above it, ratio at most. ratio 2 with multiple 64 gives the powers of two from 64.
    """
    if max_length < 1 or min_length < 1 or multiple < 1 or not ratio >= 1:
        raise ValueError(
            f"need positive lengths, multiple >= 1 and ratio >= 1, got {max_length=}, "
            f"{min_length=}, {multiple=}, {ratio=}"
        )
    lengths = [min(min_length, max_length)]
    while lengths[-1] < max_length:
        grown = int(lengths[-1] * ratio) // multiple * multiple
        lengths.append(min(max(grown, lengths[-1] + multiple), max_length))
    return tuple(lengths)


def check_bucket_lengths(bucket_lengths: Sequence[int], max_length: int) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in bucket_lengths)
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"bucket_lengths must be positive and strictly increasing, got {buckets}")
    if buckets[-1] < max_length:
        raise ValueError(
            f"the largest bucket ({buckets[-1]}) is below max_length ({max_length}); sequences of "
            "max_length would not fit"
        )
    return buckets


def bucket_length(length: int, bucket_lengths: Sequence[int]) -> int:
    """The smallest bucket length >= length."""
    for bucket in bucket_lengths:
        if bucket >= length:
            return bucket
    raise ValueError(
        f"a sequence of {length} tokens exceeds the largest bucket {bucket_lengths[-1]}"
    )


SCORED_POSITION_KEYS = ("chosen_scored_positions", "rejected_scored_positions")
# The head windows tried, as fractions of the row length: each bucket length compiles into at most
# len(SCORE_WINDOW_FRACTIONS) + 1 step shapes.
SCORE_WINDOW_FRACTIONS = (4, 2)


def score_window(scored_per_row: int, row_length: int) -> int | None:
    """The width W of the scored-position window for rows of `row_length` whose longest scored
    span has `scored_per_row` tokens: a quarter or half of the row, or None (score every
    position: a window that saves less than half of the head is not worth another shape)."""
    for fraction in SCORE_WINDOW_FRACTIONS:
        width = -(-row_length // fraction)
        if scored_per_row <= width:
            return width
    return None


def scored_positions(loss_mask_BxT: np.ndarray, width: int) -> np.ndarray:
    """[B, width] int32: each row's columns with loss_mask 1, in order, then -1."""
    positions_BxW = np.full((loss_mask_BxT.shape[0], width), -1, dtype=np.int32)
    for row, mask in enumerate(loss_mask_BxT):
        columns = np.flatnonzero(mask)
        if len(columns) > width:
            raise ValueError(f"row {row} has {len(columns)} scored tokens, more than {width}")
        positions_BxW[row, : len(columns)] = columns
    return positions_BxW


def add_scored_positions(batch: dict[str, np.ndarray], mask_keys: Sequence[str]) -> None:
    """Adds `<side>_scored_positions` for each `<side>_loss_mask` in `mask_keys` (one W for all)
    when a `score_window` fits; leaves the batch alone otherwise."""
    masks = [batch[key] for key in mask_keys]
    most = max(int(mask.astype(bool).sum(axis=1).max()) for mask in masks)
    width = score_window(most, masks[0].shape[1])
    if width is None:
        return
    for key, mask in zip(mask_keys, masks, strict=True):
        batch[key.replace("loss_mask", "scored_positions")] = scored_positions(mask, width)


def collate_pairs(
    examples: Sequence[PreferenceExample],
    pad_id: int,
    bucket_lengths: Sequence[int],
    *,
    score_windows: bool = True,
) -> dict[str, np.ndarray]:
    """One padded batch (see the module docstring) of the given pairs.

    `score_windows=False` never adds scored positions: a multi-process run needs one batch shape
    on every process, and each process's rows would pick their own window.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of pairs")
    width = bucket_length(max(e.longest_sequence for e in examples), bucket_lengths)
    batch = {}
    for side in ("chosen", "rejected"):
        completions = [getattr(e, f"{side}_ids") for e in examples]
        arrays = pad_side([e.prompt_ids for e in examples], completions, pad_id, width)
        batch.update({f"{side}_{name}": array for name, array in arrays.items()})
    if score_windows:
        add_scored_positions(batch, ("chosen_loss_mask", "rejected_loss_mask"))
    if all(e.ref_logps is not None for e in examples):
        ref_Bx2 = np.asarray([e.ref_logps for e in examples], dtype=np.float32)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_Bx2[:, 0], ref_Bx2[:, 1]
    return batch


def pad_side(
    prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray], pad_id: int, width: int
) -> dict[str, np.ndarray]:
    batch_size = len(prompts)
    input_ids_BxT = np.full((batch_size, width), pad_id, dtype=np.int32)
    loss_mask_BxT = np.zeros((batch_size, width), dtype=np.int32)
    segment_ids_BxT = np.zeros((batch_size, width), dtype=np.int32)
    positions_BxT = np.zeros((batch_size, width), dtype=np.int32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        prompt_len, length = len(prompt), len(prompt) + len(completion)
        input_ids_BxT[row, :prompt_len] = prompt
        input_ids_BxT[row, prompt_len:length] = completion
        loss_mask_BxT[row, prompt_len:length] = 1
        segment_ids_BxT[row, :length] = 1
        positions_BxT[row, :length] = np.arange(length, dtype=np.int32)
    # Token 0 is predicted by no logits, so it can never be scored (matters for empty prompts).
    loss_mask_BxT[:, 0] = 0
    return {
        "input_ids": input_ids_BxT,
        "loss_mask": loss_mask_BxT,
        "segment_ids": segment_ids_BxT,
        "positions": positions_BxT,
    }


def real_and_computed_tokens(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """(real tokens, computed tokens) of a batch in any layout: the non-zero entries and the size
    of its segment-id arrays. 1 - real / computed is the batch's padded-token fraction."""
    segments = [value for key, value in batch.items() if key.endswith("segment_ids")]
    if not segments:
        raise ValueError(f"not a batch: no *segment_ids among {sorted(batch)}")
    return sum(int(np.count_nonzero(s)) for s in segments), sum(int(s.size) for s in segments)
