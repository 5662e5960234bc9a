"""Unpaired (KTO) batches: each example's row, its KL row, and its label, in the paired layout.

KTO's reference point z0 is estimated on mismatched pairs: example i's prompt with another
example's completion. As TRL 1.16 (`add_kl_completion_ids`: completions "rotated by +1"), the
KL row of example i holds prompt_i + completion_{i-1}, the last example's completion going to
the first: (x_1, y_m), (x_2, y_1), ..., (x_m, y_{m-1}). The rotation runs within each
micro-batch, so the KL rows of a micro-batch reuse that micro-batch's own completions (TRL's
advice: "the mismatched outputs y' ... should be the same set as the matched outputs y").
flux_jax.grad_accum splits a batch into K micro-batches with a stride (micro-batch k = rows k,
k + K, ...), so the rotation is over rows of one residue mod K; with K = 1 it is TRL's.

A KL row is truncated to max_length keeping its start (TRL's collator), so a long completion
next to a long prompt still fits.

The batch is the standard layout of flux_jax.data.batching for B "pairs": chosen_* = the
examples' own rows, rejected_* = their KL rows, plus

    label   int32 [B]   1 = desirable, 0 = undesirable

so the train step's one paired forward pass scores both (flux_jax.losses.unpaired).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flux_jax.data.batching import collate_pairs
from flux_jax.data.tokenization import PreferenceExample
from flux_jax.data.unpaired import UnpairedExample


def kl_partner_indices(batch_size: int, num_microbatches: int = 1) -> np.ndarray:
    """[B] int: the example whose completion fills row i's KL row (see the module docstring).
    ValueError unless every micro-batch holds at least 2 examples (with one, the KL row would be
    the example itself; TRL refuses a batch of 1 too)."""
    k = num_microbatches
    if k < 1 or batch_size % k:
        raise ValueError(f"batch of {batch_size} examples does not split into {k} micro-batches")
    per_micro = batch_size // k
    if per_micro < 2:
        raise ValueError(
            f"KTO's KL estimate needs at least 2 examples per micro-batch per process, got "
            f"{per_micro} ({batch_size} examples / {k} micro-batches): raise batch_size or lower "
            "grad_accum_steps"
        )
    rows = np.arange(batch_size)
    residue, place = rows % k, rows // k
    return ((place - 1) % per_micro) * k + residue


def collate_unpaired(
    examples: Sequence[UnpairedExample],
    pad_id: int,
    bucket_lengths: Sequence[int],
    *,
    max_length: int,
    num_microbatches: int = 1,
    score_windows: bool = True,
) -> dict[str, np.ndarray]:
    """One padded unpaired batch (module docstring) of `examples`, whose micro-batches follow
    flux_jax.grad_accum's strided split into `num_microbatches`."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    partners = kl_partner_indices(len(examples), num_microbatches)
    rows = []
    for example, partner in zip(examples, partners, strict=True):
        budget = max_length - len(example.prompt_ids)
        rows.append(
            PreferenceExample(
                prompt_ids=example.prompt_ids,
                chosen_ids=example.completion_ids,
                rejected_ids=examples[partner].completion_ids[:budget],
                source=example.source,
                line=example.line,
            )
        )
    batch = collate_pairs(rows, pad_id, bucket_lengths, score_windows=score_windows)
    batch["label"] = np.asarray([e.label for e in examples], dtype=np.int32)
    return batch
