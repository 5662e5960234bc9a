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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from flux_jax.data.hub import (
    HUB_PREFIX,
    hub_id,
    load_hub_dataset,
    read_hub_records,
)
from flux_jax.data.records import (
    SHARD_SUFFIXES,
    DataError,
    RawRecord,
    read_records,
    resolve_data_files,
)
from flux_jax.data.tables import (
    ARROW_SUFFIX,
    CANONICAL_FIELDS,
    PARQUET_SUFFIX,
    open_arrow,
    open_parquet,
    read_table_file,
)
from flux_jax.errors import UserError

# Written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` beside the data.
DATASET_STATE_FILE = "state.json"


DATASET_DICT_FILE = "dataset_dict.json"


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
