"""Reading Parquet files and `datasets.save_to_disk` Arrow files as preference records: only the
columns the format needs, checked up front, one Arrow batch at a time (never a whole table), each
row a `RawRecord` whose `line` is its row index in its file (from 0, as pyarrow counts). See
flux_jax.data.sources for which paths are tables."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from flux_jax.data.records import DataError, RawRecord, ShardReadError

PARQUET_SUFFIX = ".parquet"
ARROW_SUFFIX = ".arrow"

CANONICAL_FIELDS = ("prompt", "chosen", "rejected")


# Rows per Arrow batch handed to Python: large enough that per-batch overhead vanishes, small
# enough that one batch of long conversations stays a few MB.
ROWS_PER_BATCH = 1024


def required_fields(data_format: str) -> tuple[str, ...]:
    return ("chosen", "rejected") if data_format == "implicit_prompt" else CANONICAL_FIELDS


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
