"""Reading JSON-lines preference files: which files a path names, and one JSON object per line.

A path is one `.jsonl` file, one `.jsonl.gz` file, a directory of shards (its `*.jsonl` and
`*.jsonl.gz` files) or a glob pattern. Shards are read in sorted name order so every process and
every run sees the same record order. Blank lines are allowed and skipped; line numbers are
1-based physical lines of the (decompressed) file, so they match what an editor shows.

Problems are reported as `DataError`s naming `file:line` and, where one is at fault, the field.
Reading yields the error in place of the record instead of raising it, so the caller decides
between failing and skipping (see `flux_jax.data.loading`). Besides lines that are not JSON
objects, these are bad records:
- a line that is not UTF-8, or whose JSON holds a lone UTF-16 surrogate escape ("\\ud800"): it
  decodes to a Python string that is not Unicode text, which the tokenizer refuses with a bare
  TypeError far from the line;
- a line longer than `max_record_bytes`: lines are read with a bounded readline, so a runaway
  line (a file with no line breaks, a 50 MB record) costs at most that much memory, not the
  ~190x of the whole line parsed, rendered and tokenised.
A `.gz` shard that is not gzip data, or whose gzip stream is corrupt or truncated, yields one
`ShardReadError` (naming the file and the line reached) and ends that shard: nothing after the
damage can be decompressed.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from flux_jax.config_schema import LEAVES

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz")

# The config's data.max_record_bytes default (16 MiB; config_schema says why).
DEFAULT_MAX_RECORD_BYTES = LEAVES["data.max_record_bytes"].default

# The rest of an over-long line is read and dropped this much at a time.
SKIP_CHUNK_BYTES = 2**20

# What a damaged gzip stream raises while reading: BadGzipFile (an OSError) for a wrong magic
# number or CRC, EOFError for a stream cut short, zlib.error for corrupt deflate data.
SHARD_READ_ERRORS = (OSError, EOFError, zlib.error)

# A JSON escape of a UTF-16 surrogate; a cheap test before looking for a lone one in the record.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


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


class ShardReadError(DataError):
    """A shard that cannot be read past `line` (not gzip data, or a corrupt or truncated gzip
    stream): the rest of the shard is lost, not one record."""


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


def read_records(
    path: str | Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[RawRecord | DataError]:
    """Every non-blank line of every shard, parsed; a line that is not a JSON object yields its
    DataError in its place, and a shard that cannot be read to its end a ShardReadError."""
    for file in resolve_data_files(path):
        yield from read_shard(file, max_record_bytes)


def read_shard(
    file: Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[RawRecord | DataError]:
    if max_record_bytes < 1:
        raise ValueError(f"max_record_bytes must be >= 1, got {max_record_bytes}")
    source = str(file)
    line_number = 0
    # Binary reading: decoding per line lets invalid UTF-8 be reported with its line number.
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as f:
        try:
            # One byte over the cap tells a line of exactly max_record_bytes (+ its newline)
            # from a longer one.
            while raw_line := f.readline(max_record_bytes + 1):
                line_number += 1
                if len(raw_line) > max_record_bytes and not raw_line.endswith(b"\n"):
                    size = len(raw_line) + rest_of_line_bytes(f)
                    yield over_long_record(source, line_number, size, max_record_bytes)
                elif raw_line.strip():
                    yield parse_line(raw_line, source, line_number)
        except SHARD_READ_ERRORS as err:
            yield unreadable_shard(source, line_number, err)


def rest_of_line_bytes(f: BinaryIO) -> int:
    """Reads to the end of the current line in bounded chunks; returns its bytes before the line
    break."""
    skipped = 0
    while chunk := f.readline(SKIP_CHUNK_BYTES):
        if chunk.endswith(b"\n"):
            return skipped + len(chunk) - 1
        skipped += len(chunk)
    return skipped


def over_long_record(source: str, line: int, size: int, max_record_bytes: int) -> DataError:
    return DataError(
        source,
        line,
        f"line is {size:,} bytes, over data.max_record_bytes ({max_record_bytes:,}); raise "
        "data.max_record_bytes to read it, or remove the record",
    )


def unreadable_shard(source: str, lines_read: int, err: Exception) -> ShardReadError:
    cause = f"{type(err).__name__}: {err}"
    if lines_read == 0 and isinstance(err, gzip.BadGzipFile):
        return ShardReadError(
            source,
            None,
            f"is not gzip data ({cause}); a .gz shard must be gzip-compressed JSONL "
            "(rename a plain-text file to .jsonl)",
        )
    return ShardReadError(
        source,
        lines_read + 1,
        f"cannot be read from this line on: the file is damaged or cut short ({cause}); "
        "re-create or re-download it",
    )


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
    if SURROGATE_ESCAPE.search(text):
        field = lone_surrogate_field(data, "")
        if field is not None:
            reason = (
                "holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), "
                "which is not Unicode text; fix or remove the record"
            )
            return DataError(source, line, reason, field=field)
    return RawRecord(source, line, data)


def lone_surrogate_field(value: Any, where: str) -> str | None:
    """The path (`chosen[1].content`) of the first string in `value` that is not valid Unicode
    (a lone surrogate cannot be encoded as UTF-8), or None."""
    if isinstance(value, str):
        return None if is_unicode_text(value) else where
    if isinstance(value, list):
        for index, item in enumerate(value):
            if (found := lone_surrogate_field(item, f"{where}[{index}]")) is not None:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else key
            if not is_unicode_text(key):
                return path
            if (found := lone_surrogate_field(item, path)) is not None:
                return found
    return None


def is_unicode_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
