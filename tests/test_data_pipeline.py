"""The grain pipeline: resumable iterator, per-epoch shuffling, multi-process shares, and the
data-check report."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np
import pytest

from flux_jax.data import (
    BATCH_KEYS,
    SCORED_POSITION_KEYS,
    data_check_report,
    format_data_check_report,
    make_preference_iterator,
)
from flux_jax.tiny_tokenizer import DEMO_DATA, build_tiny_tokenizer

NUM_RECORDS = 24


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    """24 records whose prompts name them: 'q00' .. 'q23'."""
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    records = [
        {
            "prompt": f"q{i:02d}",
            "chosen": f"Sure, answer {i}." + " more" * (i % 5),
            "rejected": "meh",
        }
        for i in range(NUM_RECORDS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_iterator(path, tokenizer, **options):
    options = {
        "data_format": "preferences",
        "batch_size": 4,
        "max_length": 32,
        "max_prompt_length": 8,
        "seed": 0,
        "bucket_lengths": (16, 32),
    } | options
    return make_preference_iterator(path, tokenizer, **options)


def record_names(batch, tokenizer) -> list[str]:
    """The 'qNN' prompt of each row: the real tokens outside the loss mask."""
    prompt_rows = (batch["chosen_segment_ids"] == 1) & (batch["chosen_loss_mask"] == 0)
    rows = zip(batch["chosen_input_ids"], prompt_rows, strict=True)
    return [tokenizer.decode(ids[keep]) for ids, keep in rows]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batches_follow_the_contract(data_path, tokenizer):
    iterator, stats = make_iterator(data_path, tokenizer, num_epochs=1)
    batches = list(iterator)
    assert len(batches) == NUM_RECORDS // 4
    assert stats.pairs_kept == NUM_RECORDS
    for batch in batches:
        assert set(BATCH_KEYS) <= set(batch) <= set(BATCH_KEYS + SCORED_POSITION_KEYS)
        widths = {batch[key].shape for key in BATCH_KEYS}
        assert len(widths) == 1 and widths.pop()[0] == 4
        assert all(v.dtype == np.int32 and v.shape[0] == 4 for v in batch.values())
        assert batch["chosen_input_ids"].shape[1] in (16, 32)


def test_restored_iterator_yields_the_same_batches(data_path, tokenizer):
    original, _ = make_iterator(data_path, tokenizer, num_threads=2, prefetch=4)
    take(original, 5)
    state = original.get_state()
    json.dumps(state)  # the state is plain data a checkpoint can store
    expected = take(original, 9)  # crosses the epoch boundary at batch 6
    restored, _ = make_iterator(data_path, tokenizer, num_threads=2, prefetch=4)
    restored.set_state(state)
    assert_same_batches(take(restored, 9), expected)


def test_iterator_round_trips_through_an_orbax_checkpoint(data_path, tokenizer, tmp_path):
    import orbax.checkpoint as ocp  # slow import, needed only here

    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", options=options)
    original, _ = make_iterator(data_path, tokenizer)
    take(original, 7)
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(original)))
    manager.wait_until_finished()
    expected = take(original, 3)
    restored, _ = make_iterator(data_path, tokenizer)
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same_batches(take(restored, 3), expected)


def test_shuffle_is_reproducible_from_the_seed_and_differs_per_epoch(data_path, tokenizer):
    def epochs(seed):
        iterator, _ = make_iterator(data_path, tokenizer, seed=seed, num_epochs=2)
        names = [name for batch in iterator for name in record_names(batch, tokenizer)]
        return names[:NUM_RECORDS], names[NUM_RECORDS:]

    first, second = epochs(seed=0)
    every_record = sorted(f"q{i:02d}" for i in range(NUM_RECORDS))
    assert sorted(first) == every_record and sorted(second) == every_record
    assert first != second
    assert first != sorted(first)  # shuffled at all
    assert epochs(seed=0) == (first, second)
    assert epochs(seed=1)[0] != first


def test_two_processes_cover_every_record_once_per_epoch(data_path, tokenizer):
    per_process = []
    for process_index in range(2):
        iterator, stats = make_iterator(
            data_path,
            tokenizer,
            num_epochs=1,
            process_index=process_index,
            process_count=2,
            batch_size=3,
        )
        assert (stats.pairs_valid, stats.pairs_seen) == (NUM_RECORDS, NUM_RECORDS // 2)
        per_process.append([name for batch in iterator for name in record_names(batch, tokenizer)])
    assert len(per_process[0]) == len(per_process[1]) == NUM_RECORDS // 2
    assert sorted(per_process[0] + per_process[1]) == [f"q{i:02d}" for i in range(NUM_RECORDS)]
    assert set(per_process[0]) == {f"q{i:02d}" for i in range(0, NUM_RECORDS, 2)}


def test_finite_epochs_drop_only_the_last_partial_batch(data_path, tokenizer):
    iterator, _ = make_iterator(data_path, tokenizer, num_epochs=2, batch_size=5)
    assert len(list(iterator)) == (2 * NUM_RECORDS) // 5


def test_too_little_data_for_one_batch(data_path, tokenizer, caplog):
    # A finite run cannot fill one batch: an error.
    with pytest.raises(ValueError, match="only 24 pairs for this process, fewer than one batch"):
        make_iterator(data_path, tokenizer, batch_size=25, num_epochs=1)
    # Repeating forever (the trainer counts steps), batches repeat pairs, with a warning: the
    # tutorial trains batch_size 8 on its two example pairs.
    iterator, _ = make_iterator(data_path, tokenizer, batch_size=25)
    assert next(iterator)["chosen_input_ids"].shape[0] == 25
    assert "batches will repeat pairs" in caplog.text


def test_demo_data_loads_without_truncation_at_64(tokenizer):
    iterator, stats = make_iterator(
        DEMO_DATA,
        tokenizer,
        batch_size=16,
        max_length=64,
        max_prompt_length=32,
        bucket_lengths=None,
    )
    assert (stats.pairs_kept, stats.pairs_truncated, stats.bad_records) == (300, 0, 0)
    assert next(iterator)["chosen_input_ids"].shape == (16, 64)


def test_data_check_report(tmp_path):
    byte_tokenizer = build_tiny_tokenizer(texts=["unused"], vocab_size=259)
    lines = [
        json.dumps({"prompt": "a" * n, "chosen": "b" * n, "rejected": "c"}) for n in range(1, 11)
    ]
    lines.insert(3, '{"prompt": "x", "chosen": 1, "rejected": "y"}')  # line 4: bad
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = data_check_report(
        path, byte_tokenizer, data_format="preferences", max_length=12, max_prompt_length=8
    )
    assert (report["records"], report["pairs"], report["bad_records"]) == (11, 10, 1)
    assert report["bad_record_examples"] == [
        f"{path}:4: field 'chosen' has type number, expected a string"
    ]
    # prompts 1..10 tokens; chosen 2..11 (with eos); rejected always 2.
    assert report["tokens"]["prompt"] == {"p50": 5, "p90": 9, "p99": 10, "max": 10}
    assert report["tokens"]["chosen"] == {"p50": 6, "p90": 10, "p99": 11, "max": 11}
    assert report["tokens"]["rejected"] == {"p50": 2, "p90": 2, "p99": 2, "max": 2}
    assert report["tokens"]["longest_sequence"]["max"] == 21
    # Prompts 9 and 10 exceed 8. Sequences over 12: n + n + 1 > 12 from n = 6 (n = 6..10).
    assert report["would_truncate"] == {"pairs": 5, "prompts": 2, "responses": 5}
    text = format_data_check_report(report)
    assert "bad records      1" in text
    assert "5 of 10 pairs would be truncated (2 prompts, 5 responses)" in text
