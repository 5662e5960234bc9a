"""Reading JSON-lines preference files: which files a path names, and one JSON object per line.

A path is one `.jsonl` file, one `.jsonl.gz` file, a directory of shards (its `*.jsonl` and
`*.jsonl.gz` files) or a glob pattern. Shards are read in sorted name order so every process and
every run sees the same record order. Blank lines are allowed and skipped; line numbers are
1-based physical lines of the (decompressed) file, so they match what an editor shows.

Problems are reported as `DataError`s naming `file:line` and, where one is at fault, the field.
Reading yields the error in place of the record instead of raising it, so the caller decides
between failing and skipping (see `flux_jax.data.loading`).
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz")


class DataError(ValueError):
    """A bad record or input path, with where it is: `file:line: field 'x' ...`."""

    def __init__(self, source: str, line: int | None, reason: str, field: str | None = None):
        self.source = source
        self.line = line
        self.field = field
        self.reason = reason
        where = source if line is None else f"{source}:{line}"
        what = reason if field is None else f"field '{field}' {reason}"
        super().__init__(f"{where}: {what}")


@dataclass(frozen=True)
class RawRecord:
    """One parsed JSON object and where it came from."""

    source: str
    line: int
    data: dict[str, Any]


def resolve_data_files(path: str | Path) -> list[Path]:
    """The shard files `path` names, in the sorted order they are read."""
    text = str(path)
    as_path = Path(text)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        kind = "glob pattern"
    elif as_path.is_dir():
        files = sorted(p for p in as_path.iterdir() if p.is_file() and is_shard(p))
        kind = "directory"
    elif as_path.is_file():
        return [as_path]
    else:
        raise DataError(text, None, "no such file or directory")
    if not files:
        raise DataError(text, None, f"{kind} matches no {' or '.join(SHARD_SUFFIXES)} files")
    return files


def is_shard(path: Path) -> bool:
    return path.name.endswith(SHARD_SUFFIXES)


def read_records(path: str | Path) -> Iterator[RawRecord | DataError]:
    """Every non-blank line of every shard, parsed; a line that is not a JSON object yields its
    DataError in its place."""
    for file in resolve_data_files(path):
        yield from read_shard(file)


def read_shard(file: Path) -> Iterator[RawRecord | DataError]:
    source = str(file)
    # Binary reading: decoding per line lets invalid UTF-8 be reported with its line number.
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            if not raw_line.strip():
                continue
            yield parse_line(raw_line, source, line_number)


def parse_line(raw_line: bytes, source: str, line: int) -> RawRecord | DataError:
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw_line[err.start : err.start + 1].hex()
        reason = f"line is not valid UTF-8 (byte 0x{bad} at byte {err.start + 1})"
        return DataError(source, line, reason)
    try:
        # Without the line break, an unfinished record's error points at its own line's end.
        data = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        return DataError(source, line, f"line is not valid JSON ({err.msg} at column {err.colno})")
    if not isinstance(data, dict):
        reason = f"line holds a JSON {json_type_name(data)}, expected an object"
        return DataError(source, line, reason)
    return RawRecord(source, line, data)


def json_type_name(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages that users read."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
