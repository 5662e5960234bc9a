"""Where preference records come from: JSONL files, Parquet files, `datasets.save_to_disk` Arrow
directories and Hugging Face hub ids, all read as the same `RawRecord`s (or `DataError`s in their
place), so every source gets the same formats, tokenisation and bad-record policy.

    data.train_path                      kind      read with
    x.jsonl, x.jsonl.gz, dir, glob       jsonl     flux_jax.data.records (file:line)
    x.parquet, dir of *.parquet, glob    parquet   pyarrow.parquet, one row group batch at a time
    save_to_disk dir (state.json), .arrow  arrow   pyarrow IPC stream, memory-mapped
    hf:org/name  or  hf:org/name:split   hub       datasets.load_dataset (split default "train")

A table row's `line` is its row index in its file, counted from 0 as pyarrow, pandas and
`datasets` index it, so `file.parquet:17` is `pq.read_table(file).slice(17, 1)`; a hub row's
source is `hf:org/name:split` and its index that split's. Files are read in sorted name order
(a save_to_disk directory in its state.json order), so every run and process sees one order,
which is what makes a resumed run's batches exactly the uninterrupted run's.

Column mapping (`data.columns`, canonical field -> the dataset's column) is applied when a record
is validated (`flux_jax.data.formats`), so errors name the dataset's own column. Tables are
checked up front: a column the format needs that is missing, an unusable column type, or a
prompt column under implicit_prompt stops loading with a `DataError` naming the file (these are
mistakes of configuration, not bad records, so on_bad_record="skip" does not skip them).

A row whose strings total more than max_record_bytes is a bad record, as an over-long JSONL line
is: its tokenisation alone would cost ~190x its size. A file that cannot be opened, or whose data
is damaged from some row on, yields one `ShardReadError` and ends that file.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flux_jax.data.records import (
    SHARD_SUFFIXES,
    DataError,
    RawRecord,
    ShardReadError,
    read_records,
    resolve_data_files,
)
from flux_jax.errors import UserError

HUB_PREFIX = "hf:"
DEFAULT_HUB_SPLIT = "train"
PARQUET_SUFFIX = ".parquet"
ARROW_SUFFIX = ".arrow"
# Written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` beside the data.
DATASET_STATE_FILE = "state.json"
DATASET_DICT_FILE = "dataset_dict.json"

CANONICAL_FIELDS = ("prompt", "chosen", "rejected")

# Rows per Arrow batch handed to Python: large enough that per-batch overhead vanishes, small
# enough that one batch of long conversations stays a few MB.
ROWS_PER_BATCH = 1024

# Seconds to wait for the hub's host before saying there is no network (load_dataset itself
# retries for ~25 s on a machine without one).
HUB_CONNECT_TIMEOUT_S = 5.0

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class MissingReaderError(UserError, ImportError):
    """pyarrow or datasets, needed for a table source, is not installed."""


@dataclass(frozen=True)
class DataSource:
    """What a data path names: its kind (`jsonl`, `parquet`, `arrow`, `hub`) and its shards in
    read order (for a hub id, the id itself)."""

    path: str
    kind: str
    files: tuple[str, ...]


def resolve_source(path: str | Path) -> DataSource:
    """The kind of data `path` names and its files, in read order; DataError if it names none
    or mixes kinds. A hub id is not contacted here."""
    text = str(path)
    if text.startswith(HUB_PREFIX):
        hub_id(text)  # checks the spelling
        return DataSource(text, "hub", (text,))
    as_path = Path(text)
    if as_path.is_dir() and (as_path / DATASET_DICT_FILE).is_file():
        raise DataError(text, None, dataset_dict_message(as_path))
    if as_path.is_dir() and (as_path / DATASET_STATE_FILE).is_file():
        return DataSource(text, "arrow", tuple(str(f) for f in saved_dataset_files(as_path)))
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        kind_of = "glob pattern"
    elif as_path.is_dir():
        files = sorted(p for p in as_path.iterdir() if p.is_file())
        kind_of = "directory"
    elif as_path.is_file():
        files = [as_path]
        kind_of = "file"
    else:
        raise DataError(text, None, "no such file or directory")
    kinds = {file_kind(f) for f in files} - {None}
    if len(kinds) > 1:
        raise DataError(
            text,
            None,
            f"{kind_of} holds more than one kind of data ({', '.join(sorted(kinds))})"
            "; point at one kind (a glob such as dir/*.parquet picks one)",
        )
    if not kinds:
        if kind_of == "file":  # a single file of another name is read as JSONL, as before
            return DataSource(text, "jsonl", (text,))
        suffixes = (*SHARD_SUFFIXES, PARQUET_SUFFIX, ARROW_SUFFIX)
        raise DataError(text, None, f"{kind_of} matches no {' or '.join(suffixes)} files")
    kind = kinds.pop()
    if kind == "jsonl":
        return DataSource(text, kind, tuple(str(f) for f in resolve_data_files(text)))
    return DataSource(text, kind, tuple(str(f) for f in files if file_kind(f) == kind))


def file_kind(path: Path) -> str | None:
    if path.name.endswith(SHARD_SUFFIXES):
        return "jsonl"
    if path.name.endswith(PARQUET_SUFFIX):
        return "parquet"
    if path.name.endswith(ARROW_SUFFIX):
        return "arrow"
    return None


def saved_dataset_files(directory: Path) -> list[Path]:
    """The Arrow files of a `Dataset.save_to_disk` directory, in its state.json order."""
    state_file = directory / DATASET_STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            str(state_file), None, f"is not a datasets save_to_disk state file ({err!r})"
        ) from None
    files = [directory / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(
            str(directory), None, f"lists Arrow files that are missing: {', '.join(missing)}"
        )
    if not files:
        raise DataError(str(directory), None, "holds no Arrow files (an empty dataset)")
    return files


def dataset_dict_message(directory: Path) -> str:
    try:
        splits = json.loads((directory / DATASET_DICT_FILE).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        splits = sorted(p.name for p in directory.iterdir() if p.is_dir())
    example = directory / (splits[0] if splits else "train")
    return (
        f"is a DatasetDict with splits {', '.join(splits) or '(none)'}; point at one split's "
        f"directory, e.g. {example}"
    )


def hub_id(path: str) -> tuple[str, str]:
    """(repo id, split) of `hf:org/name[:split]`."""
    spec = path.removeprefix(HUB_PREFIX)
    name, _, split = spec.partition(":")
    if not name or name.count("/") > 1 or not all(name.split("/")) or ":" in split:
        raise DataError(
            path, None, "is not a hub dataset id; write hf:org/name or hf:org/name:split"
        )
    return name, split or DEFAULT_HUB_SPLIT


def column_mapping(columns: Mapping[str, str] | None) -> dict[str, str]:
    """Canonical field -> the dataset's column, for all three fields ('' = the field's name)."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(CANONICAL_FIELDS))
    if unknown:
        raise ValueError(
            f"data.columns: unknown field(s) {', '.join(unknown)}; valid: "
            f"{', '.join(CANONICAL_FIELDS)}"
        )
    mapping = {field: columns.get(field) or field for field in CANONICAL_FIELDS}
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"data.columns: two fields read the same column: {mapping}")
    return mapping


def parse_columns(text: str) -> dict[str, str]:
    """`prompt=question,chosen=good` (the CLI's --columns) as a data.columns mapping."""
    columns = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        field, eq, column = (s.strip() for s in item.partition("="))
        if not eq or not field or not column:
            raise ValueError(f"--columns: expected FIELD=COLUMN, got {item!r}")
        columns[field] = column
    return column_mapping(columns) if columns else {}


def required_fields(data_format: str) -> tuple[str, ...]:
    return ("chosen", "rejected") if data_format == "implicit_prompt" else CANONICAL_FIELDS


def read_source_records(
    path: str | Path,
    *,
    data_format: str,
    columns: Mapping[str, str] | None = None,
    max_record_bytes: int,
) -> Iterator[RawRecord | DataError]:
    """Every record at `path`, of any kind, in read order; a bad one's DataError in its place
    and a damaged file's ShardReadError after its readable rows (see the module docstring).
    Records keep the dataset's column names; `columns` picks which a table's reader reads."""
    source = resolve_source(path)
    if source.kind == "jsonl":
        yield from read_records(path, max_record_bytes)
        return
    check_table_packages(source)
    mapping = column_mapping(columns)
    if source.kind == "hub":
        yield from read_hub_records(source.path, data_format, mapping, max_record_bytes)
        return
    open_batches = open_parquet if source.kind == "parquet" else open_arrow
    for file in source.files:
        yield from read_table_file(file, open_batches, data_format, mapping, max_record_bytes)


def check_table_packages(source: DataSource) -> None:
    """MissingReaderError naming the extra when a table source's reader is not installed."""
    needed = ("pyarrow", "datasets") if source.kind == "hub" else ("pyarrow",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingReaderError(
            f"{source.path}: reading {source.kind} data needs {' and '.join(missing)}: "
            "pip install 'flux_jax[datasets]'"
        )


def open_parquet(file: str) -> tuple[Any, Any]:
    """(schema, batches(columns)) of a Parquet file, read one row group's batches at a time."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file, memory_map=True)
    return parquet.schema_arrow, lambda names: parquet.iter_batches(
        batch_size=ROWS_PER_BATCH, columns=list(names)
    )


def open_arrow(file: str) -> tuple[Any, Any]:
    """(schema, batches(columns)) of an Arrow IPC file, memory-mapped: the stream format
    `datasets` writes, or the random-access file format."""
    import pyarrow as pa

    source = pa.memory_map(file)
    try:
        reader = pa.ipc.open_stream(source)
        batches = iter(reader)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))

    def select(names: tuple[str, ...]) -> Iterator[Any]:
        with source:
            for batch in batches:
                selected = batch.select(list(names))
                for start in range(0, selected.num_rows, ROWS_PER_BATCH):
                    yield selected.slice(start, ROWS_PER_BATCH)

    return reader.schema, select


def read_table_file(
    file: str,
    open_batches: Any,
    data_format: str,
    mapping: dict[str, str],
    max_record_bytes: int,
) -> Iterator[RawRecord | DataError]:
    import pyarrow as pa

    try:
        schema, batches = open_batches(file)
    except (pa.ArrowException, OSError) as err:
        kind = "Parquet" if file.endswith(PARQUET_SUFFIX) else "Arrow"
        yield ShardReadError(
            file,
            None,
            f"cannot be opened as {kind} data ({type(err).__name__}: {err}); re-create or "
            "re-download it",
        )
        return
    names = columns_to_read(file, schema, data_format, mapping)
    yield from records_from_batches(file, batches(names), max_record_bytes)


def columns_to_read(
    source: str, schema: Any, data_format: str, mapping: dict[str, str]
) -> tuple[str, ...]:
    """The dataset columns of the format's fields; DataError naming the file when one is missing
    or of a type no format reads, or when implicit_prompt data has a prompt column."""
    present = {field.name: field.type for field in schema}
    if data_format == "implicit_prompt" and mapping["prompt"] in present:
        raise DataError(
            source,
            None,
            f"has a column {mapping['prompt']!r} (the prompt); data_format 'implicit_prompt' is "
            "for data without one: use preferences (strings) or conversational (messages)",
        )
    names = []
    for field in required_fields(data_format):
        column = mapping[field]
        if column not in present:
            hint = (
                f"map one with data.columns.{field}=NAME"
                if column == field
                else f"fix data.columns.{field}"
            )
            raise DataError(
                source,
                None,
                f"has no column {column!r} for the {field!r} field (its columns: "
                f"{', '.join(present) or 'none'}); {hint}",
            )
        if not is_text_or_messages(present[column]):
            raise DataError(
                source,
                None,
                f"column {column!r} has Arrow type {present[column]}; expected strings or "
                "lists of {role, content} messages",
                field=field if column == field else None,
            )
        names.append(column)
    return tuple(names)


def is_text_or_messages(arrow_type: Any) -> bool:
    """A type a record field can hold: strings, a message (struct), lists of messages, or null
    (an all-null column: every row is then a bad record, reported as such)."""
    import pyarrow.types as t

    if t.is_string(arrow_type) or t.is_large_string(arrow_type) or t.is_null(arrow_type):
        return True
    if t.is_string_view(arrow_type) or t.is_struct(arrow_type):
        return True
    if t.is_list(arrow_type) or t.is_large_list(arrow_type) or t.is_list_view(arrow_type):
        return t.is_struct(arrow_type.value_type) or t.is_null(arrow_type.value_type)
    return False


def records_from_batches(
    source: str, batches: Iterator[Any], max_record_bytes: int, first_row: int = 0
) -> Iterator[RawRecord | DataError]:
    """One RawRecord per row of `batches` (Arrow record batches), numbered from `first_row`; an
    over-long row's DataError in its place; a ShardReadError ends the source where reading
    fails."""
    import pyarrow as pa

    row = first_row
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            rows = batch.to_pylist()
            sizes = row_string_bytes(batch)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
            yield ShardReadError(
                source,
                row,
                f"cannot be read from this row on: the data is damaged ({type(err).__name__}: "
                f"{err}); re-create or re-download it",
            )
            return
        for data, size in zip(rows, sizes, strict=True):
            if size > max_record_bytes:
                yield DataError(
                    source,
                    row,
                    f"row holds {size:,} bytes of text, over data.max_record_bytes "
                    f"({max_record_bytes:,}); raise data.max_record_bytes to read it, or remove "
                    "the row",
                )
            else:
                yield RawRecord(source, row, data)
            row += 1


def row_string_bytes(batch: Any) -> np.ndarray:
    """UTF-8 bytes of all strings in each row of an Arrow record batch, computed in Arrow."""
    total = np.zeros(batch.num_rows, np.int64)
    for column in batch.columns:
        total += array_string_bytes(column)
    return total


def array_string_bytes(array: Any) -> np.ndarray:
    """Per element of `array`: bytes of the strings in it, nested lists and structs included."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as t

    arrow_type = array.type
    if t.is_string(arrow_type) or t.is_large_string(arrow_type) or t.is_string_view(arrow_type):
        return pc.fill_null(pc.binary_length(array), 0).to_numpy().astype(np.int64)
    if t.is_struct(arrow_type):
        sizes = np.zeros(len(array), np.int64)
        for child in array.flatten():  # flatten() applies the parent's offset and nulls
            sizes += array_string_bytes(child)
        return sizes
    if t.is_list(arrow_type) or t.is_large_list(arrow_type) or t.is_list_view(arrow_type):
        values = pc.list_flatten(array)
        parents = pc.list_parent_indices(array).to_numpy()
        child_sizes = array_string_bytes(values)
        return np.bincount(parents, weights=child_sizes, minlength=len(array)).astype(np.int64)
    if isinstance(array, pa.ChunkedArray):
        return np.concatenate([array_string_bytes(c) for c in array.chunks])
    return np.zeros(len(array), np.int64)


def read_hub_records(
    path: str, data_format: str, mapping: dict[str, str], max_record_bytes: int
) -> Iterator[RawRecord | DataError]:
    """The rows of a hub dataset split, through `datasets.load_dataset` (its local cache when
    HF_HUB_OFFLINE is set); a DataError saying what to do when it cannot be had."""
    dataset = load_hub_dataset(path)
    names = columns_to_read(path, dataset.features.arrow_schema, data_format, mapping)
    tables = dataset.select_columns(list(names)).with_format("arrow").iter(ROWS_PER_BATCH)
    batches = (batch for table in tables for batch in table.to_batches())
    yield from records_from_batches(path, batches, max_record_bytes)


def load_hub_dataset(path: str) -> Any:
    import datasets

    name, split = hub_id(path)
    offline = hub_offline()
    if not offline and not hub_reachable():
        raise DataError(path, None, offline_message(name, split, "there is no network"))
    try:
        return datasets.load_dataset(name, split=split)
    except ConnectionError as err:
        reason = f"HF_HUB_OFFLINE is set and it is not in the local cache ({err})"
        if not offline:
            reason = f"the hub could not be reached ({err})"
        raise DataError(path, None, offline_message(name, split, reason)) from None
    except ValueError as err:  # datasets' message for an unknown split lists the valid ones
        raise DataError(path, None, f"cannot be loaded: {err}") from None


def data_fingerprint(path: str) -> str:
    """A hash of the data `path` names: each file's name and bytes (a hub dataset: its id and
    datasets' fingerprint of its content). Keys the reference log-probs and token caches."""
    digest = hashlib.sha256()
    source = resolve_source(path)
    if source.kind == "hub":  # no files of ours: the id and datasets' fingerprint of its content
        digest.update(path.encode())
        digest.update(load_hub_dataset(path)._fingerprint.encode())
        return digest.hexdigest()
    for file in source.files:
        digest.update(os.path.basename(file).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def offline_message(name: str, split: str, reason: str) -> str:
    return (
        f"hub dataset {name} (split {split}) cannot be downloaded: {reason}. On a machine with "
        f"network run `datasets.load_dataset({name!r}, split={split!r}).save_to_disk(DIR)` and "
        "set data.train_path to DIR (or copy its Parquet files), or fill the HF cache and set "
        "HF_HUB_OFFLINE=1"
    )


def hub_offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in OFFLINE_VARIABLES
    )


def hub_reachable(timeout_s: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Whether the hub endpoint's host accepts a TCP connection (HF_ENDPOINT, default
    huggingface.co)."""
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False
