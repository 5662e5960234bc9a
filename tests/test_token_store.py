"""The token store (flux_jax.data.token_store / token_cache): the same examples and stats as the
in-memory path, reuse without tokenising, a key that changes with every setting, no half store
after a crash, and the same training run and resume."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux_jax.data import DataError, load_preference_examples, preference_batches
from flux_jax.data import token_cache as tc
from flux_jax.data import token_store as ts
from flux_jax.data.loading import LoadSettings
from flux_jax.data.records import DEFAULT_MAX_RECORD_BYTES
from flux_jax.tiny_tokenizer import DEMO_DATA, build_tiny_tokenizer

LENGTHS = {"max_length": 48, "max_prompt_length": 16}  # truncates about a third of the demo


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def demo_rows() -> list[dict]:
    with DEMO_DATA.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f][:120]


def as_chat(row: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def write_jsonl(path: Path, rows: list[dict], bad_lines: bool = True) -> Path:
    lines = [json.dumps(r) for r in rows]
    if bad_lines:  # a bad record, a broken line and a duplicate pair: skipped or counted
        lines[5:5] = [json.dumps({**rows[0], "chosen": ""}), "{not json", lines[3]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir()
    half = len(rows) // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), directory / f"train-{k}.parquet")
    return directory


def assert_same_examples(store, examples) -> None:
    assert len(store) == len(examples)
    for got, want in zip(store, examples, strict=True):
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype == np.int32 and np.array_equal(a, b), name
        assert (got.source, got.line, got.ref_logps) == (want.source, want.line, want.ref_logps)


DATA_CASES = {
    "jsonl-preferences": ("preferences", {}),
    "jsonl-conversational": ("conversational", {}),
    "parquet-preferences": ("preferences", {}),
    "jsonl-joint-drop": ("preferences", {"tokenization": "joint", "drop_truncated": True}),
    "jsonl-process-1-of-2": ("preferences", {"process_index": 1, "process_count": 2}),
}


def make_data(case: str, tmp_path: Path) -> Path:
    rows = demo_rows()
    if case.startswith("parquet"):
        return write_parquet(tmp_path / "parquet", rows)
    if "conversational" in case:
        rows = [as_chat(r) for r in rows]
    return write_jsonl(tmp_path / "pairs.jsonl", rows, bad_lines=True)


@pytest.mark.parametrize("case", DATA_CASES)
def test_store_gives_the_in_memory_examples_and_stats(tmp_path, tokenizer, case):
    data_format, extra = DATA_CASES[case]
    path = make_data(case, tmp_path)
    skip = {} if case.startswith("parquet") else {"on_bad_record": "skip"}
    options = {"data_format": data_format, **LENGTHS, **skip, **extra}
    examples, stats = load_preference_examples(path, tokenizer, **options)
    assert stats.pairs_truncated and (case.startswith("parquet") or stats.bad_records)
    store, store_stats = tc.load_cached_examples(path, tokenizer, cache_dir=tmp_path, **options)
    assert store_stats == stats
    assert_same_examples(store, examples)
    expected = [(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
    assert store.token_counts.tolist() == [list(c) for c in expected]


def test_child_process_build_with_workers(tmp_path, tokenizer, caplog):
    """Large data is built in a child process with a pool: same examples and stats, its log
    records re-emitted here, its errors raised here with their type and message."""
    path = write_jsonl(tmp_path / "chat.jsonl", [as_chat(r) for r in demo_rows()])
    options = {"data_format": "conversational", "on_bad_record": "skip", **LENGTHS}
    examples, stats = load_preference_examples(path, tokenizer, **options)
    with caplog.at_level(logging.INFO):
        store, store_stats = tc.load_cached_examples(
            path, tokenizer, cache_dir=tmp_path / "c", workers=2, in_process_max_bytes=0, **options
        )
    assert store_stats == stats
    assert_same_examples(store, examples)
    assert "with 2 worker(s)" in caplog.text
    assert "skipped 2 bad records" in caplog.text  # the child's warning, logged here

    with pytest.raises(DataError) as raised:
        load_preference_examples(path, tokenizer, **{**options, "on_bad_record": "error"})
    with pytest.raises(DataError) as from_child:
        tc.load_cached_examples(
            path,
            tokenizer,
            cache_dir=tmp_path / "c",
            in_process_max_bytes=0,
            **{**options, "on_bad_record": "error"},
        )
    assert str(from_child.value) == str(raised.value)
    assert not list((tmp_path / "c").glob("*of1*"))[1:]  # only the first store was written


def test_reuse_maps_the_store_without_tokenising(tmp_path, tokenizer, monkeypatch, caplog):
    path = write_jsonl(tmp_path / "pairs.jsonl", demo_rows())
    options = {"data_format": "preferences", "on_bad_record": "skip", **LENGTHS}
    first, first_stats = tc.load_cached_examples(path, tokenizer, cache_dir=tmp_path, **options)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the tokenizer was called on reuse")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenizing)
    monkeypatch.setattr(tc, "load_share", no_tokenizing)
    with caplog.at_level(logging.INFO):
        again, stats = tc.load_cached_examples(path, tokenizer, cache_dir=tmp_path, **options)
    assert stats == first_stats and stats.bad_records == 2
    assert_same_examples(again, list(first))
    # The stored stats are reported again: the skipped records and the truncation.
    assert "skipped 2 bad records" in caplog.text and "pairs truncated" in caplog.text


def test_a_load_settings_object_loads_what_its_keywords_load(tmp_path, tokenizer):
    """A LoadSettings passed whole gives the keyword form's examples and the same store (its
    key dict is the keyword form's, so stores built before LoadSettings still hit)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", demo_rows()[:40], bad_lines=False)
    options = {"data_format": "preferences", **LENGTHS}
    settings = LoadSettings(**options)
    assert settings.to_dict() == {
        **options,
        "drop_truncated": False,
        "on_bad_record": "error",
        "max_record_bytes": DEFAULT_MAX_RECORD_BYTES,
        "process_index": 0,
        "process_count": 1,
        "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
        "tokenization": "separate",
    }
    examples, stats = load_preference_examples(path, tokenizer, settings)
    store, store_stats = tc.load_cached_examples(path, tokenizer, settings, cache_dir=tmp_path)
    again, _ = tc.load_cached_examples(path, tokenizer, cache_dir=tmp_path, **options)
    assert store_stats == stats
    assert_same_examples(store, examples)
    assert_same_examples(again, examples)
    assert len(list(tmp_path.glob("*-p0of1"))) == 1  # the keywords mapped the same store
    with pytest.raises(TypeError, match="not both"):
        load_preference_examples(path, tokenizer, settings, max_length=64)


def test_key_changes_with_every_setting(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", demo_rows(), bad_lines=False)
    settings = {
        "data_format": "preferences",
        "max_length": 48,
        "max_prompt_length": 16,
        "drop_truncated": False,
        "on_bad_record": "error",
        "max_record_bytes": 1 << 20,
        "process_index": 0,
        "process_count": 1,
        "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
        "tokenization": "separate",
    }
    base = ts.store_key(path, tokenizer, settings)
    assert ts.store_key(path, build_tiny_tokenizer(), settings) == base  # deterministic
    changed = {
        "max_length": 64,
        "max_prompt_length": 8,
        "drop_truncated": True,
        "tokenization": "joint",
        "columns": {"prompt": "question", "chosen": "chosen", "rejected": "rejected"},
        "process_count": 2,
        "max_record_bytes": 1 << 10,
    }
    keys = {base}
    for name, value in changed.items():
        keys.add(ts.store_key(path, tokenizer, {**settings, name: value}))
    keys.add(ts.store_key(path, build_tiny_tokenizer(vocab_size=300), settings))
    other_template = build_tiny_tokenizer()
    other_template.chat_template = "{{ messages[0]['content'] }}"
    keys.add(ts.store_key(path, other_template, settings))
    with path.open("a", encoding="utf-8") as f:  # the data's bytes
        f.write(json.dumps(demo_rows()[0]) + "\n")
    keys.add(ts.store_key(path, tokenizer, settings))
    assert len(keys) == len(changed) + 4


def test_a_crash_mid_write_leaves_no_store(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "pairs.jsonl", demo_rows(), bad_lines=False)
    options = {"data_format": "preferences", **LENGTHS}
    monkeypatch.setattr(tc, "TOKENIZE_CHUNK", 16)  # several chunks
    appended = []
    real_append = ts.StoreWriter.append

    def crash_after_two(self, chunk):
        if len(appended) == 2:
            raise KeyboardInterrupt  # as a ^C or a dying process would leave it
        appended.append(chunk)
        real_append(self, chunk)

    monkeypatch.setattr(ts.StoreWriter, "append", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        tc.load_cached_examples(path, tokenizer, cache_dir=tmp_path / "c", **options)
    assert list((tmp_path / "c").iterdir()) == []  # neither a store nor its partial copy
    monkeypatch.setattr(ts.StoreWriter, "append", real_append)

    # A writer killed outright (SIGKILL) leaves its partial directory: never opened as a store,
    # removed by the next build on this host.
    examples, _ = load_preference_examples(path, tokenizer, **options)
    store, _ = tc.load_cached_examples(path, tokenizer, cache_dir=tmp_path / "c", **options)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    partial = store.directory.with_name(f"{store.directory.name}{ts.PARTIAL}{os.uname()[1]}-{dead}")
    shutil.copytree(store.directory, partial)
    (partial / ts.META_FILE).unlink()
    shutil.rmtree(store.directory)
    rebuilt, _ = tc.load_cached_examples(path, tokenizer, cache_dir=tmp_path / "c", **options)
    assert not partial.exists()
    assert_same_examples(rebuilt, examples)

    # A store altered after it was written (a truncated token file) is rebuilt, with a warning.
    with open(rebuilt.directory / ts.TOKENS_FILE, "r+b") as f:
        f.truncate(12)
    again, _ = tc.load_cached_examples(path, tokenizer, cache_dir=tmp_path / "c", **options)
    assert_same_examples(again, examples)


def test_batches_and_iterator_state_are_the_same(tmp_path, tokenizer):
    """Grain batches over the store equal those over the list, and a restored iterator state
    continues exactly (resume)."""
    import grain

    path = write_jsonl(tmp_path / "pairs.jsonl", demo_rows(), bad_lines=False)
    options = {"data_format": "preferences", **LENGTHS}
    examples, _ = load_preference_examples(path, tokenizer, **options)
    store, _ = tc.load_cached_examples(path, tokenizer, cache_dir=tmp_path, **options)
    batch_options = {"batch_size": 8, "seed": 3, "num_epochs": None, "pad_id": 0}
    batch_options["bucket_lengths"] = (16, 32, 48)

    def iterator(pairs, lengths):
        dataset = preference_batches(pairs, group_lengths=lengths, **batch_options)
        return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1)))

    lengths = store.token_counts.sum(axis=1)
    from_list, from_store = iterator(examples, lengths), iterator(store, lengths)
    for _ in range(5):
        a, b = next(from_list), next(from_store)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    state = from_store.get_state()
    expected = next(from_store)
    resumed = iterator(store, lengths)
    resumed.set_state(state)
    got = next(resumed)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow  # two fits (~25 s quiet); the default run checks the batches are equal
def test_training_from_the_store_equals_the_in_memory_run(tmp_path, monkeypatch):
    from flux_jax import FluxTrainer
    from flux_jax.demo import demo_config

    monkeypatch.setenv("FLUX_JAX_CACHE", str(tmp_path / "cache"))
    data = str(tmp_path / "pairs.jsonl")
    shutil.copyfile(DEMO_DATA, data)

    def run(name: str, token_cache: bool):
        config = demo_config()
        config.output_dir = str(tmp_path / name)
        config.num_steps = 3
        config.logging.progress_bar = False
        config.logging.every_steps = 1
        config.data.max_length = 64
        config.data.max_prompt_length = 32
        config.data.token_cache = token_cache
        return FluxTrainer(config.validate()).fit(prompts=data)

    in_memory = run("memory", False)
    assert not (tmp_path / "cache" / "tokens").exists()
    from_store = run("store", True)  # a warm store is the same TokenStore, mapped again
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1
    assert [h["loss"] for h in from_store.history] == [h["loss"] for h in in_memory.history]


def test_config_keys_reach_the_store(monkeypatch):
    from flux_jax import train_data
    from flux_jax.config import ConfigError, FluxConfig

    config = FluxConfig()
    assert config.data.token_cache is True and config.data.tokenize_workers == 0
    with pytest.raises(ConfigError, match="data.tokenize_workers must be >= 0"):
        FluxConfig({"data": {"tokenize_workers": -1}})
    config.data.token_cache_dir, config.data.tokenize_workers = "/somewhere", 3
    seen = {}

    def fake(name):
        def load(path, tokenizer, settings, **options):
            seen[name] = {**settings.to_dict(), **options}
            return [], None

        return load

    monkeypatch.setattr(train_data, "load_cached_examples", fake("cached"))
    monkeypatch.setattr(train_data, "load_preference_examples", fake("memory"))
    train_data.load_examples(config, None, "p.jsonl", "preferences")
    assert seen["cached"]["cache_dir"] == "/somewhere" and seen["cached"]["workers"] == 3
    config.data.token_cache = False
    train_data.load_examples(config, None, "p.jsonl", "preferences")
    assert "cache_dir" not in seen["memory"]
