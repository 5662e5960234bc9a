"""The grain pipeline: tokenised pairs -> shuffled, repeated, padded batches with a resumable
iterator.

    batch_index_dataset(...)                  the pair indices of batch k, k = 0, 1, ...:
      shuffled:        MapDataset.range(N).shuffle(seed).repeat(num_epochs).batch(batch_size)
                       a fresh permutation per epoch; batches run across epoch boundaries, so
                       no pair is lost at the end of an epoch (only a finite run's last partial
                       batch is dropped)
      length-grouped:  flux_jax.data.length_grouping (sort by length within windows of batches,
                       shuffle the batches); N % batch_size pairs sit out each epoch
      .map_with_index(collate)                collate_pairs pads batch k to its bucket (or to the
                                              width all processes agreed on for batch k)
      .to_iter_dataset(ReadOptions(...))      threaded prefetch

batch_size is per process. Batch k is a pure function of (seed, k), so the iterator is grain's own
`DatasetIterator` over k: `get_state()` / `set_state()` resume exactly, and
`grain.checkpoint.CheckpointSave(iterator)` stores it inside an orbax checkpoint.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grain
import numpy as np
from transformers import PreTrainedTokenizerBase

from flux_jax.config_schema import LEAVES
from flux_jax.data.batching import check_bucket_lengths, collate_pairs, default_bucket_lengths
from flux_jax.data.length_grouping import length_grouped_order
from flux_jax.data.loading import load_preference_examples
from flux_jax.data.stats import DataStats
from flux_jax.data.tokenization import PreferenceExample

log = logging.getLogger(__name__)


def make_preference_iterator(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_format: str,
    batch_size: int,
    max_length: int,
    max_prompt_length: int,
    seed: int,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    bucket_lengths: Sequence[int] | None = None,
    drop_truncated: bool = False,
    on_bad_record: str = "error",
    num_threads: int = LEAVES["data.num_threads"].default,
    prefetch: int = LEAVES["data.prefetch"].default,
    columns: Mapping[str, str] | None = None,
    tokenization: str = "separate",
) -> tuple[grain.DatasetIterator, DataStats]:
    """An iterator of padded batch dicts (see `flux_jax.data.batching`) over this process's share
    of the data at `path`, and the loading stats."""
    buckets = (
        default_bucket_lengths(max_length)
        if bucket_lengths is None
        else check_bucket_lengths(bucket_lengths, max_length)
    )
    examples, stats = load_preference_examples(
        path,
        tokenizer,
        data_format=data_format,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        drop_truncated=drop_truncated,
        on_bad_record=on_bad_record,
        process_index=process_index,
        process_count=process_count,
        columns=columns,
        tokenization=tokenization,
    )
    dataset = preference_batches(
        examples,
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        pad_id=pad_token_id(tokenizer),
        bucket_lengths=buckets,
    )
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(read_options)), stats


def preference_batches(
    examples: Sequence[PreferenceExample],
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None,
    pad_id: int,
    bucket_lengths: Sequence[int],
    collate: Callable[..., dict[str, np.ndarray]] = collate_pairs,
    group_lengths: Sequence[int] | None = None,
    window_batches: int = 1,
    batch_width: Callable[[int], int] | None = None,
) -> grain.MapDataset:
    """The batch dataset of the module docstring, before the iterator stage.

    `collate(examples, pad_id=..., bucket_lengths=...)` makes each batch: `collate_pairs` (the
    standard layout) or a partial of `flux_jax.data.packing.collate_shared_prefix`.
    `group_lengths` (one length per example) switches on length-grouped batches, sorted within
    windows of `window_batches` batches. `batch_width(k)`, when given, is the one row length
    batch k is padded to (every process of a multi-process run must build the same shape).
    """
    if not examples:
        raise ValueError("no preference pairs to batch (every record was dropped or skipped)")
    if group_lengths is not None and len(group_lengths) != len(examples):
        raise ValueError(f"{len(group_lengths)} group lengths for {len(examples)} pairs")
    indices = batch_index_dataset(
        len(examples),
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        group_lengths=group_lengths,
        window_batches=window_batches,
    )
    buckets = tuple(bucket_lengths)

    def make_batch(k: int, pair_indices: np.ndarray) -> dict[str, np.ndarray]:
        widths = buckets if batch_width is None else (batch_width(k),)
        pairs = [examples[i] for i in pair_indices]
        return collate(pairs, pad_id=pad_id, bucket_lengths=widths)

    return indices.map_with_index(make_batch)


def batch_index_dataset(
    num_examples: int,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None,
    group_lengths: Sequence[int] | None = None,
    window_batches: int = 1,
) -> grain.MapDataset:
    """Element k: the int array of the example indices in batch k (module docstring). A pure
    function of its arguments, so any process can compute another process's batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_examples < 1:
        raise ValueError("no preference pairs to batch (every record was dropped or skipped)")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if num_examples < batch_size:
        if num_epochs is not None:
            raise ValueError(
                f"only {num_examples} pairs for this process, fewer than one batch of {batch_size}"
            )
        # Repetition runs before batching, so a batch then holds some pairs more than once.
        log.warning(
            "only %d pairs for this process, fewer than one batch of %d: batches will repeat pairs",
            num_examples,
            batch_size,
        )
    if group_lengths is None:
        return (
            grain.MapDataset.range(num_examples)
            .shuffle(seed=seed)
            .repeat(num_epochs, reseed_each_epoch=True)
            .batch(batch_size, drop_remainder=True)
        )
    order = length_grouped_order(
        group_lengths, batch_size=batch_size, window_batches=window_batches, seed=seed
    )
    total = sys.maxsize if num_epochs is None else num_epochs * order.batches_per_epoch
    return grain.MapDataset.range(total).map(order.batch_pairs)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id; eos when the tokenizer has no pad token (padding is found by segment ids, so
    any id works)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad_token_id nor an eos_token_id")
