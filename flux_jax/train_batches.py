"""A run's training batches: the layout, the bucket ladder, the batch order, and one batch shape on
every process.

    plan = batch_plan(config, batch_multiple=..., counts=gather_token_counts(token_counts(ex)))
    dataset = training_batches(examples, plan, pad_id=..., counts=...)   # a grain MapDataset

Layouts (flux_jax.data.batching, flux_jax.data.packing): standard rows; with model.prefix_sharing
one [prompt | chosen | rejected] row per pair; with model.packing as many pairs per row as fill
about max_length tokens on average (`pairs_per_row`), as many as keep the rows splitting into
grad_accum_steps micro-batches over the data x fsdp devices. Longer rows would cost more than they
save: the attention mask is dense, so its work grows with the row length.

Order: shuffled, or length-grouped (data.group_by_length; flux_jax.data.length_grouping) by the
length a pair takes in its layout (standard: its longer sequence; shared-prefix / packed: the
pair's tokens in a row).

Several processes: each collates its own share, and a step's global batch needs one shape on all
of them. Every process gathers every process's token counts once (`gather_token_counts`, a tiny
allgather at start-up), so each can compute any process's batch k (the order is a pure function
of seed, k and that process's lengths) and pads batch k to the widest row any process needs for
it (`AgreedWidths`). The pairs per row come from the global mean pair length, so they agree too.
Scored-position windows stay off across processes (each process's rows would pick their own).
Everything is a pure function of the data, the config and k: resume stays exact.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from flux_jax.data import packing
from flux_jax.data.batching import (
    bucket_length,
    check_bucket_lengths,
    collate_pairs,
    geometric_bucket_lengths,
)
from flux_jax.data.pipeline import batch_index_dataset, preference_batches
from flux_jax.data.token_store import TokenStore
from flux_jax.data.tokenization import PreferenceExample
from flux_jax.data.unpaired import is_unpaired
from flux_jax.data.unpaired_batching import collate_unpaired

log = logging.getLogger(__name__)

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # columns of a token-count array


def shares_prefix(config: Any, *, unpaired: bool | None = None) -> bool:
    """model.prefix_sharing resolved: true / false as set; "auto" = true where the run allows it.

    One row per pair runs each prompt once, so it computes fewer tokens and pads less (chosen and
    rejected no longer share one width): on the long-tailed mix of tools/make_length_mix.py,
    7.9% padding instead of 20.3% and 1.3x the step speed; on the fixed-length mix ~1.05x. Auto
    keeps standard rows where they are needed or where another kernel is the better choice:
    LD-DPO (`algorithm.ld_alpha < 1`) and unpaired (KTO) data read standard rows, and with
    attention "cudnn", "splash" or "auto" the flash kernels run standard rows, which the branch
    mask would forgo. `unpaired`: the data's kind when known (fit(data_format=...)), else
    config.data.format's.
    """
    setting = config.model.prefix_sharing
    if isinstance(setting, bool):
        return setting
    if unpaired is None:
        unpaired = config.data.format == "unpaired"
    return config.model.attention == "xla" and config.algorithm.ld_alpha >= 1 and not unpaired


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How this process turns its pairs into training batches."""

    local_batch: int  # pairs per process per step
    bucket_lengths: tuple[int, ...]
    layout: str  # "standard", or "rows": flux_jax.data.packing (prefix sharing and/or packing)
    share_prefix: bool
    pairs_per_row: int
    group_by_length: bool
    window_batches: int
    seed: int
    process_index: int = 0
    process_count: int = 1
    # Unpaired (KTO) batches build their KL rows per micro-batch, truncated to max_length.
    grad_accum_steps: int = 1
    max_length: int = 0


def token_counts(examples: Sequence[PreferenceExample]) -> np.ndarray:
    """[N, 3] int32: prompt, chosen and rejected tokens of each pair (eos included); a token
    store's come from its index, without reading a token."""
    if isinstance(examples, TokenStore):
        return examples.token_counts
    if is_unpaired(examples):  # the KL row's length is only known per batch
        lengths = [(len(e.prompt_ids), len(e.completion_ids)) for e in examples]
        return np.asarray([(p, c, c) for p, c in lengths], dtype=np.int32).reshape(-1, 3)
    counts = [(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
    return np.asarray(counts, dtype=np.int32).reshape(-1, 3)


def gather_token_counts(local: np.ndarray) -> list[np.ndarray]:
    """Every process's `token_counts`, in process order (one allgather; shares may differ in
    size when data.drop_truncated drops pairs)."""
    import jax

    if jax.process_count() == 1:
        return [local]
    from jax.experimental import multihost_utils

    sizes = multihost_utils.process_allgather(np.asarray([len(local)], np.int32))
    sizes = np.asarray(sizes).reshape(-1)
    padded = np.full((int(sizes.max()), 3), -1, np.int32)
    padded[: len(local)] = local
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [gathered[p, : int(n)] for p, n in enumerate(sizes)]


def layout_lengths(counts: np.ndarray, plan: BatchPlan) -> np.ndarray:
    """[N] the tokens each pair needs in the plan's layout: its longer sequence (standard) or
    its share of a row (flux_jax.data.packing.pair_length)."""
    prompt, chosen, rejected = counts[:, PROMPT], counts[:, CHOSEN], counts[:, REJECTED]
    if plan.layout == "standard":
        return prompt + np.maximum(chosen, rejected)
    return prompt * (1 if plan.share_prefix else 2) + chosen + rejected


def bucket_ladder(data, *, rows: bool = False) -> tuple[int, ...]:
    """The bucket lengths of a FluxConfig's `data` section: data.bucket_lengths, else the
    geometric ladder of data.bucket_ratio / data.bucket_multiple from 64 to max_length, or to
    2 x max_length for `rows` (a [prompt | chosen | rejected] row holds up to that many tokens;
    past the last bucket a row pads to a multiple of it)."""
    if data.bucket_lengths:
        return check_bucket_lengths(data.bucket_lengths, data.max_length)
    return geometric_bucket_lengths(
        data.max_length * (2 if rows else 1),
        ratio=data.bucket_ratio,
        multiple=data.bucket_multiple,
        min_length=min(64, data.max_length),
    )


def batch_plan(
    config,
    *,
    batch_multiple: int,
    counts: Sequence[np.ndarray],
    process_index: int = 0,
    unpaired: bool | None = None,
) -> BatchPlan:
    """The plan of a FluxConfig's run; `counts` = every process's token counts; `unpaired` as
    for `shares_prefix`."""
    cfg, model, data = config, config.model, config.data
    process_count = len(counts)
    share_prefix = shares_prefix(config, unpaired=unpaired)
    rows = share_prefix or model.packing
    plan = BatchPlan(
        local_batch=cfg.batch_size // process_count,
        bucket_lengths=bucket_ladder(data, rows=rows),
        layout="rows" if rows else "standard",
        share_prefix=share_prefix,
        pairs_per_row=1,
        group_by_length=data.group_by_length,
        window_batches=data.length_group_batches,
        seed=cfg.seed if data.shuffle_seed < 0 else data.shuffle_seed,
        process_index=process_index,
        process_count=process_count,
        grad_accum_steps=cfg.grad_accum_steps,
        max_length=data.max_length,
    )
    if model.packing:
        # Every process computes the same mean, from every process's counts.
        mean_pair = float(np.mean(np.concatenate([layout_lengths(c, plan) for c in counts])))
        per_row = packing.max_pairs_per_row(
            plan.local_batch,
            cfg.batch_size,
            cfg.grad_accum_steps * batch_multiple,
            limit=max(1, int(data.max_length // mean_pair)),
        )
        log.info("packing %d pairs per row", per_row)
        plan = dataclasses.replace(plan, pairs_per_row=per_row)
    return plan


def training_batches(
    examples: Sequence[PreferenceExample],
    plan: BatchPlan,
    *,
    pad_id: int,
    counts: Sequence[np.ndarray],
) -> grain.MapDataset:
    """This process's batches (flux_jax.data.pipeline.preference_batches) under `plan`;
    `counts` = every process's token counts (this process's at plan.process_index)."""
    score_windows = plan.process_count == 1
    if is_unpaired(examples):
        if plan.layout != "standard" or plan.process_count > 1:
            raise ValueError(
                "data.format unpaired (KTO) needs the standard layout on one process for now: "
                "model.prefix_sharing and model.packing false, a single-host run"
            )
        collate: Callable[..., dict[str, np.ndarray]] = functools.partial(
            collate_unpaired,
            max_length=plan.max_length,
            num_microbatches=plan.grad_accum_steps,
            score_windows=score_windows,
        )
    elif plan.layout == "standard":
        collate = functools.partial(collate_pairs, score_windows=score_windows)
    else:
        collate = functools.partial(
            packing.collate_shared_prefix,
            pairs_per_row=plan.pairs_per_row,
            share_prefix=plan.share_prefix,
            score_windows=score_windows,
        )
    local = layout_lengths(counts[plan.process_index], plan)
    if len(local) != len(examples):
        raise ValueError(f"{len(local)} token counts for {len(examples)} pairs")
    return preference_batches(
        examples,
        batch_size=plan.local_batch,
        seed=plan.seed,
        num_epochs=None,
        pad_id=pad_id,
        bucket_lengths=plan.bucket_lengths,
        collate=collate,
        group_lengths=local if plan.group_by_length else None,
        window_batches=plan.window_batches,
        batch_width=None if plan.process_count == 1 else AgreedWidths(plan, counts),
    )


def one_process_batches(
    config: Any, examples: Sequence[PreferenceExample], *, pad_id: int, batch_multiple: int = 1
) -> tuple[BatchPlan, grain.MapDataset]:
    """The plan and batches of a one-process run over `examples` (data x fsdp = batch_multiple
    devices): the trainer's batches rebuilt on the side, for tools that count tokens and shapes."""
    counts = [token_counts(examples)]
    plan = batch_plan(config, batch_multiple=batch_multiple, counts=counts)
    return plan, training_batches(examples, plan, pad_id=pad_id, counts=counts)


class AgreedWidths:
    """batch_width(k): the row length of batch k on every process, the most any process's batch k
    needs (smallest fitting bucket of its longest row; past the largest bucket, a multiple of it,
    as flux_jax.data.packing.row_width)."""

    def __init__(self, plan: BatchPlan, counts: Sequence[np.ndarray]):
        self.plan = plan
        self.lengths = [layout_lengths(c, plan) for c in counts]
        self.indices = [
            batch_index_dataset(
                len(lengths),
                batch_size=plan.local_batch,
                seed=plan.seed,
                num_epochs=None,
                group_lengths=lengths if plan.group_by_length else None,
                window_batches=plan.window_batches,
            )
            for lengths in self.lengths
        ]

    def __call__(self, k: int) -> int:
        return max(self.needed(p, k) for p in range(len(self.lengths)))

    def needed(self, process: int, k: int) -> int:
        """The row length process `process`'s batch k needs on its own."""
        lengths = self.lengths[process][self.indices[process][k]]
        if self.plan.layout == "standard":
            return bucket_length(int(lengths.max()), self.plan.bucket_lengths)
        rows = packing.assign_rows(lengths.tolist(), self.plan.pairs_per_row)
        longest = max(int(lengths[row].sum()) for row in rows)
        return packing.row_width(longest, self.plan.bucket_lengths)
