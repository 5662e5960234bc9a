"""The up-front reference pass (flux_jax.ref_logps.compute_ref_logps): sequences batched by
length, results back in the pairs' order, every batch the same number of rows."""

from __future__ import annotations

import numpy as np

from flux_jax.data.batching import collate_pairs
from flux_jax.data.tokenization import PreferenceExample
from flux_jax.ref_logps import compute_ref_logps

LADDER = (16, 24, 32, 48, 64, 96, 128)


def _examples(n: int, seed: int) -> list[PreferenceExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c, r = rng.integers(1, 40), rng.integers(1, 40), rng.integers(1, 40)
        ids = lambda k: rng.integers(3, 500, size=k).astype(np.int32)  # noqa: E731
        out.append(PreferenceExample(ids(p), ids(c), ids(r), "mix", i))
    return out


def _scored_sum(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stands in for the reference: a per-row function of the scored tokens and their positions
    only, so padding and batch neighbours cannot change it (but row order can)."""

    def side(name: str) -> np.ndarray:
        ids, mask = batch[f"{name}_input_ids"], batch[f"{name}_loss_mask"]
        weights = np.arange(1, ids.shape[1] + 1)[None, :]
        return (ids * mask * weights).sum(axis=1).astype(np.float32)

    return side("chosen"), side("rejected")


def test_results_come_back_in_the_pairs_order():
    examples = _examples(21, seed=0)  # not a multiple of the batch: the last batch is filled up
    shapes = []

    def fn(batch):
        shapes.append(batch["chosen_input_ids"].shape)
        assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
        return _scored_sum(batch)

    got = compute_ref_logps(examples, fn, batch_size=4, pad_id=0, bucket_lengths=LADDER)
    want = np.stack([np.concatenate(_scored_sum(collate_pairs([e], 0, LADDER))) for e in examples])
    np.testing.assert_array_equal(got, want)  # integers below 2**24: exact in fp32
    assert len(shapes) == -(-2 * len(examples) // 8)  # 2N sequences, 2B rows per batch
    assert {rows for rows, _ in shapes} == {4}


def test_batches_pad_less_than_pairs_in_file_order():
    examples = _examples(64, seed=1)
    computed = []

    def fn(batch):
        computed.append(batch["chosen_input_ids"].size + batch["rejected_input_ids"].size)
        return _scored_sum(batch)

    compute_ref_logps(examples, fn, batch_size=4, pad_id=0, bucket_lengths=LADDER)
    real = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    file_order = sum(
        collate_pairs(examples[s : s + 4], 0, LADDER)["chosen_input_ids"].size * 2
        for s in range(0, len(examples), 4)
    )
    assert 1 - real / sum(computed) < 0.5 * (1 - real / file_order)


def _branch_sums(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`_scored_sum` for shared-prefix rows (one pair a row): each response's scored tokens
    weighted by position + 1, which equals the standard layout's column + 1."""
    ids, mask, branch = batch["input_ids"], batch["loss_mask"], batch["branch_ids"]
    weights = batch["positions"] + 1

    def side(b: int) -> np.ndarray:
        return (ids * mask * (branch == b) * weights).sum(axis=1).astype(np.float32)

    return side(1), side(2)


def test_shared_prefix_pass_matches_the_sequence_pass():
    examples = _examples(21, seed=2)
    rows_seen, computed = [], []

    def fn(batch):
        assert "branch_ids" in batch  # one `prompt | chosen | rejected` row per pair
        rows_seen.append(batch["input_ids"].shape[0])
        computed.append(batch["input_ids"].size)
        return _branch_sums(batch)

    got = compute_ref_logps(
        examples, fn, batch_size=4, pad_id=0, bucket_lengths=LADDER, shared_prefix=True
    )
    want = compute_ref_logps(examples, _scored_sum, batch_size=4, pad_id=0, bucket_lengths=LADDER)
    np.testing.assert_array_equal(got, want)
    assert set(rows_seen) == {8}  # 2B pairs a call: as many rows as the sequence pass
    assert len(rows_seen) == -(-len(examples) // 8)
    # The prompt runs once: fewer tokens computed than in the sequence pass.
    sequence_pass = []

    def count(batch):
        sequence_pass.append(batch["chosen_input_ids"].size + batch["rejected_input_ids"].size)
        return _scored_sum(batch)

    compute_ref_logps(examples, count, batch_size=4, pad_id=0, bucket_lengths=LADDER)
    assert sum(computed) < sum(sequence_pass)
