"""Parquet, save_to_disk Arrow and hub data sources: the same records, errors naming file:row and
the dataset's column, the same bad-record policy, exact resume, and `flux-jax data check`."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux_jax.data import (
    DataError,
    data_check_report,
    load_preference_examples,
)
from flux_jax.data.loading import load_text_pairs
from flux_jax.data.records import ShardReadError
from flux_jax.data.sources import read_source_records, resolve_source
from flux_jax.data.tables import row_string_bytes
from flux_jax.tiny_tokenizer import build_tiny_tokenizer
from tests.test_checkpoint import make_iterator  # the resume tests' iterator settings

NUM_ROWS = 24

# Column names of a dataset whose fields have other names than prompt/chosen/rejected.
RENAMED = {"prompt": "question", "chosen": "answer_good", "rejected": "answer_bad"}


def rows(n: int = NUM_ROWS) -> list[dict[str, str]]:
    """Prompts name their row: 'q00' .. 'q23'."""
    return [
        {
            "prompt": f"q{i:02d}",
            "chosen": f"Sure, answer {i}." + " more" * (i % 5),
            "rejected": "meh",
        }
        for i in range(n)
    ]


def renamed(records: list[dict], names: dict[str, str] = RENAMED) -> list[dict]:
    return [{names.get(k, k): v for k, v in r.items()} for r in records]


def write_parquet_shards(directory: Path, records: list[dict], shards: int = 2) -> Path:
    """`records` split over `shards` Parquet files, each with row groups of 5 rows."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(records) // shards)
    for k in range(shards):
        table = pa.Table.from_pylist(records[k * per : (k + 1) * per])
        pq.write_table(
            table, directory / f"train-{k:05d}-of-{shards:05d}.parquet", row_group_size=5
        )
    return directory


def write_saved_dataset(directory: Path, records: list[dict], shards: int = 2) -> Path:
    datasets.Dataset.from_list(records).save_to_disk(str(directory), num_shards=shards)
    return directory


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same 24 pairs as JSONL, a Parquet dir (2 shards, 5-row row groups) and a save_to_disk
    dir (2 shards)."""
    tmp = tmp_path_factory.mktemp("sources")
    jsonl = tmp / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return {
        "jsonl": jsonl,
        "parquet": write_parquet_shards(tmp / "parquet", rows()),
        "arrow": write_saved_dataset(tmp / "arrow", rows()),
    }


# --- what a path names ---------------------------------------------------------------------------


def test_resolve_source_kinds_and_order(sources, tmp_path):
    parquet = resolve_source(sources["parquet"])
    assert parquet.kind == "parquet"
    assert [Path(f).name for f in parquet.files] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    assert resolve_source(f"{sources['parquet']}/*-00001-*.parquet").files == parquet.files[1:]
    arrow = resolve_source(sources["arrow"])
    assert arrow.kind == "arrow" and len(arrow.files) == 2
    assert resolve_source(sources["jsonl"]).kind == "jsonl"
    assert resolve_source("hf:org/name:test").kind == "hub"
    mixed = tmp_path / "mixed"
    write_parquet_shards(mixed, rows(4), shards=1)
    (mixed / "more.jsonl").write_text(json.dumps(rows(1)[0]) + "\n")
    with pytest.raises(DataError, match=r"more than one kind of data \(jsonl, parquet\)"):
        resolve_source(mixed)


def test_a_dataset_dict_dir_asks_for_one_split(tmp_path):
    splits = {
        "train": datasets.Dataset.from_list(rows(4)),
        "test": datasets.Dataset.from_list(rows(2)),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits train, test; .*dd/train"):
        resolve_source(tmp_path / "dd")
    assert resolve_source(tmp_path / "dd" / "train").kind == "arrow"


@pytest.mark.parametrize("spec", ["hf:", "hf:a/b/c", "hf:/name", "hf:a/b:x:y"])
def test_bad_hub_ids_are_refused(spec):
    with pytest.raises(DataError, match="write hf:org/name or hf:org/name:split"):
        resolve_source(spec)


# --- reading rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_table_rows_are_records_named_file_and_row(sources, kind):
    records = list(
        read_source_records(sources[kind], data_format="preferences", max_record_bytes=10**6)
    )
    assert [r.data for r in records] == rows()
    files = resolve_source(sources[kind]).files
    assert [(r.source, r.line) for r in records[:2]] == [(files[0], 0), (files[0], 1)]
    assert (records[12].source, records[12].line) == (files[1], 0)  # rows count per file, from 0


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    """The reader asks pyarrow for batches (row groups), never the whole table."""
    path = write_parquet_shards(tmp_path / "p", rows(), shards=1)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole file"))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read the whole table"))
    records = list(read_source_records(path, data_format="preferences", max_record_bytes=10**6))
    assert len(records) == NUM_ROWS


def test_only_the_format_columns_are_read(tmp_path):
    extra = [{**r, "score": 1.5, "meta": {"x": [1, 2]}} for r in rows(3)]
    path = write_parquet_shards(tmp_path / "p", extra, shards=1)
    records = list(read_source_records(path, data_format="preferences", max_record_bytes=10**6))
    assert [sorted(r.data) for r in records] == [["chosen", "prompt", "rejected"]] * 3


def test_missing_column_names_the_file_and_the_mapping(tmp_path):
    path = write_parquet_shards(tmp_path / "p", renamed(rows(3)), shards=1)
    read = lambda **kw: list(read_source_records(path, max_record_bytes=10**6, **kw))  # noqa: E731
    with pytest.raises(DataError, match=r"has no column 'prompt' .*columns: question, answer_good"):
        read(data_format="preferences")
    with pytest.raises(DataError, match=r"map one with data.columns.prompt=NAME"):
        read(data_format="preferences")
    with pytest.raises(DataError, match=r"has no column 'answer_gud'.*fix data.columns.chosen"):
        read(data_format="preferences", columns={**RENAMED, "chosen": "answer_gud"})
    records = read(data_format="preferences", columns=RENAMED)
    assert records[0].data == {
        "question": "q00",
        "answer_good": "Sure, answer 0.",
        "answer_bad": "meh",
    }


def test_column_of_a_wrong_type_and_implicit_prompt_with_a_prompt_column(tmp_path):
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "chosen": [1], "rejected": ["b"]}), numbers)
    with pytest.raises(DataError, match=r"column 'chosen' has Arrow type int64; expected strings"):
        list(read_source_records(numbers, data_format="preferences", max_record_bytes=10**6))
    path = write_parquet_shards(tmp_path / "p", rows(2), shards=1)
    with pytest.raises(DataError, match=r"column 'prompt' .*'implicit_prompt' is for data without"):
        list(read_source_records(path, data_format="implicit_prompt", max_record_bytes=10**6))


def test_unknown_or_clashing_column_mapping():
    with pytest.raises(ValueError, match=r"data.columns: unknown field\(s\) answer"):
        list(
            read_source_records(
                "hf:a/b", data_format="preferences", columns={"answer": "x"}, max_record_bytes=1
            )
        )
    with pytest.raises(ValueError, match="two fields read the same column"):
        list(
            read_source_records(
                "hf:a/b",
                data_format="preferences",
                columns={"prompt": "chosen"},
                max_record_bytes=1,
            )
        )


def test_row_string_bytes_counts_nested_strings():
    messages = [[{"role": "user", "content": "héllo"}], None, []]
    batch = pa.RecordBatch.from_pylist(
        [{"p": "ab", "m": m} for m in messages]
        + [{"p": None, "m": [{"role": "x", "content": None}]}]
    )
    assert row_string_bytes(batch.slice(0)).tolist() == [2 + 4 + 6, 2, 2, 1]
    assert row_string_bytes(batch.slice(1, 2)).tolist() == [2, 2]  # sliced arrays keep offsets


def test_over_long_rows_are_bad_records(tmp_path):
    records = rows(3)
    records[1]["chosen"] = "x" * 5000
    path = write_parquet_shards(tmp_path / "p", records, shards=1)
    read = list(read_source_records(path, data_format="preferences", max_record_bytes=1000))
    assert isinstance(read[1], DataError) and not isinstance(read[0], DataError)
    assert str(read[1]).startswith(f"{path}/train-00000-of-00001.parquet:1: row holds 5,006 bytes")


def test_a_damaged_parquet_file_is_a_shard_read_error(tmp_path):
    path = write_parquet_shards(tmp_path / "p", rows(), shards=2)
    first = sorted(path.iterdir())[0]
    first.write_bytes(first.read_bytes()[:100])
    read = list(read_source_records(path, data_format="preferences", max_record_bytes=10**6))
    assert isinstance(read[0], ShardReadError)
    assert str(read[0]).startswith(f"{first}: cannot be opened as Parquet data")
    assert [r.data["prompt"] for r in read[1:]] == [f"q{i:02d}" for i in range(12, NUM_ROWS)]


# --- hub ids -----------------------------------------------------------------------------------


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    with pytest.raises(DataError, match=r"HF_HUB_OFFLINE is set and it is not in the local cache"):
        list(
            read_source_records(
                "hf:someone/prefs:train", data_format="preferences", max_record_bytes=10**6
            )
        )


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried the hub"))
    with pytest.raises(
        DataError, match=r"cannot be downloaded: there is no network\. .*save_to_disk"
    ):
        list(
            read_source_records(
                "hf:someone/prefs", data_format="preferences", max_record_bytes=10**6
            )
        )


def test_hub_rows_are_named_by_id_split_and_index(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(renamed(rows(5)))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # skips the network check
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records = list(
        read_source_records(
            "hf:org/prefs:test_prefs",
            data_format="preferences",
            columns=RENAMED,
            max_record_bytes=10**6,
        )
    )
    assert calls == [("org/prefs", "test_prefs")]
    assert [(r.source, r.line) for r in records] == [
        ("hf:org/prefs:test_prefs", i) for i in range(5)
    ]
    assert records[3].data["question"] == "q03"


# --- through loading: formats, column mapping, bad-record policy, data check --------------------


def test_every_source_loads_the_same_pairs(sources, tokenizer):
    options = dict(data_format="preferences", max_length=32, max_prompt_length=8)
    expected, _ = load_preference_examples(sources["jsonl"], tokenizer, **options)
    for kind in ("parquet", "arrow"):
        examples, stats = load_preference_examples(sources[kind], tokenizer, **options)
        assert stats.pairs_kept == NUM_ROWS
        for a, b in zip(examples, expected, strict=True):
            assert a.prompt_ids.tolist() == b.prompt_ids.tolist()
            assert a.chosen_ids.tolist() == b.chosen_ids.tolist()
            assert a.rejected_ids.tolist() == b.rejected_ids.tolist()


def chat_rows(n: int) -> list[dict]:
    return [
        {
            "question": [{"role": "user", "content": f"q{i}"}],
            "answer_good": [{"role": "assistant", "content": f"good {i}"}],
            "answer_bad": [{"role": "assistant", "content": f"bad {i}"}],
        }
        for i in range(n)
    ]


def test_mapped_chat_columns_and_errors_naming_the_column(tmp_path, tokenizer):
    records = chat_rows(4)
    records[2]["answer_good"] = [{"role": "assistant", "content": " "}]
    path = write_saved_dataset(tmp_path / "ds", records, shards=1)
    (arrow_file,) = resolve_source(path).files
    options = dict(data_format="conversational", columns=RENAMED)
    with pytest.raises(DataError) as caught:
        load_text_pairs(path, tokenizer, **options)
    assert str(caught.value) == f"{arrow_file}:2: field 'answer_good[-1].content' is empty"
    pairs, stats = load_text_pairs(path, tokenizer, on_bad_record="skip", **options)
    assert [p.line for p in pairs] == [0, 1, 3] and stats.bad_records == 1
    assert "good 3" in pairs[2].chosen and "q3" in pairs[2].prompt


def test_columns_map_jsonl_records_too(tmp_path, tokenizer):
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in renamed(rows(3))))
    pairs, _ = load_text_pairs(path, tokenizer, data_format="preferences", columns=RENAMED)
    assert [p.prompt for p in pairs] == ["q00", "q01", "q02"]
    with pytest.raises(DataError, match=r":1: field 'prompt' is missing \(record has keys: "):
        load_text_pairs(path, tokenizer, data_format="preferences")


def test_data_check_reports_on_a_parquet_dir(sources, tokenizer, tmp_path):
    report = data_check_report(
        sources["parquet"], tokenizer, data_format="preferences", max_length=32, max_prompt_length=8
    )
    assert report["ok"] and report["files"] == 2 and report["pairs"] == NUM_ROWS
    records = rows(6)
    records[4]["rejected"] = None
    path = write_parquet_shards(tmp_path / "bad", records, shards=1)
    report = data_check_report(
        path, tokenizer, data_format="preferences", max_length=32, max_prompt_length=8
    )
    assert not report["ok"] and report["pairs"] == 5
    assert report["bad_record_examples"] == [
        f"{path}/train-00000-of-00001.parquet:4: field 'rejected' has type null, expected a string"
    ]


def test_data_check_command_on_a_save_to_disk_dir(tmp_path):
    """The CLI, end to end, with --columns."""
    import subprocess
    import sys

    path = write_saved_dataset(tmp_path / "ds", renamed(rows(6)), shards=1)
    command = [sys.executable, "-m", "flux_jax.cli", "data", "check", str(path)]
    command += ["--tokenizer", "builtin:tiny-qwen3", "--max-length", "32"]
    command += ["--max-prompt-length", "8"]
    mapped = subprocess.run(
        [*command, "--columns", "prompt=question,chosen=answer_good,rejected=answer_bad"],
        capture_output=True,
        text=True,
    )
    assert mapped.returncode == 0, mapped.stderr
    assert "valid pairs      6" in mapped.stdout and "data check: OK" in mapped.stdout


# --- exact resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_table_iterator_resumes_exactly_and_matches_jsonl(sources, tokenizer, kind):
    jsonl = make_iterator(sources["jsonl"], tokenizer)
    table = make_iterator(sources[kind], tokenizer)
    for _ in range(5):
        next(table)
    state = table.get_state()
    json.dumps(state)
    expected = [next(table) for _ in range(9)]  # crosses the epoch boundary at batch 6
    restored = make_iterator(sources[kind], tokenizer)
    restored.set_state(state)
    for _ in range(5):
        next(jsonl)
    for a, b, c in zip(
        [next(restored) for _ in range(9)], expected, [next(jsonl) for _ in range(9)], strict=True
    ):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], c[key])


def train_config(output_dir: Path, data: Path, num_steps: int):
    from flux_jax.demo import demo_config

    config = demo_config()
    config.output_dir = str(output_dir)
    config.num_steps = num_steps
    config.batch_size = 8  # one pair per fake CPU device
    config.checkpoint.save_steps = 2
    config.checkpoint.async_save = False
    config.eval.every_steps = 0
    config.logging.every_steps = 1
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    config.data.train_path = str(data)
    config.data.max_length = 32
    config.data.max_prompt_length = 8
    return config.validate()


def train_losses(output_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if line["split"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted_losses(sources, tmp_path_factory) -> dict[int, float]:
    from flux_jax import FluxTrainer

    run = tmp_path_factory.mktemp("whole") / "run"
    FluxTrainer(train_config(run, sources["jsonl"], 4)).fit()
    return train_losses(run)


@pytest.mark.parametrize(
    "kind",
    ["parquet", pytest.param("arrow", marks=pytest.mark.slow)],  # the same reader past rows
)
def test_dpo_run_from_a_table_source_trains_and_resumes_exactly(
    sources, tmp_path, uninterrupted_losses, kind
):
    """2 steps, stop, resume to 4: the JSONL run's losses, step for step."""
    from flux_jax import FluxTrainer

    run = tmp_path / "run"
    FluxTrainer(train_config(run, sources[kind], 2)).fit()
    result = FluxTrainer(train_config(run, sources[kind], 4)).fit()
    assert result.resumed_from == 2
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in uninterrupted_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6), step
