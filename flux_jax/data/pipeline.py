"""The grain pipeline: tokenised pairs -> shuffled, repeated, padded batches with a resumable
iterator.

    MapDataset.source(this process's examples)
      .shuffle(seed)                          a fresh permutation per epoch (reseed_each_epoch)
      .repeat(num_epochs)                     None repeats forever; the caller counts steps
      .batch(batch_size, drop_remainder)      collate_pairs pads each batch to its bucket
      .to_iter_dataset(ReadOptions(...))      threaded prefetch

Batches run across epoch boundaries (repeat comes before batch), so no pair is lost at the end
of an epoch; only the final partial batch of a finite run is dropped. batch_size is per process.

The iterator is grain's own `DatasetIterator`: `get_state()` / `set_state()` resume exactly, and
`grain.checkpoint.CheckpointSave(iterator)` stores it inside an orbax checkpoint.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import grain
import numpy as np
from transformers import PreTrainedTokenizerBase

from flux_jax.data.batching import check_bucket_lengths, collate_pairs, default_bucket_lengths
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
    num_threads: int = 2,
    prefetch: int = 8,
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
) -> grain.MapDataset:
    """The batch dataset of the module docstring, before the iterator stage.

    `collate(examples, pad_id=..., bucket_lengths=...)` makes each batch: `collate_pairs` (the
    standard layout) or a partial of `flux_jax.data.packing.collate_shared_prefix`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not examples:
        raise ValueError("no preference pairs to batch (every record was dropped or skipped)")
    if len(examples) < batch_size:
        if num_epochs is not None:
            raise ValueError(
                f"only {len(examples)} pairs for this process, fewer than one batch of {batch_size}"
            )
        # Repetition runs before batching, so a batch then holds some pairs more than once.
        log.warning(
            "only %d pairs for this process, fewer than one batch of %d: batches will repeat pairs",
            len(examples),
            batch_size,
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    batch_fn = functools.partial(collate, pad_id=pad_id, bucket_lengths=tuple(bucket_lengths))
    return (
        grain.MapDataset.source(list(examples))
        .shuffle(seed=seed)
        .repeat(num_epochs, reseed_each_epoch=True)
        .batch(batch_size, drop_remainder=True, batch_fn=batch_fn)
    )


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id; eos when the tokenizer has no pad token (padding is found by segment ids, so
    any id works)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad_token_id nor an eos_token_id")
