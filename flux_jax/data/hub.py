"""Hugging Face hub dataset ids (`hf:org/name[:split]`) as a data source: through
`datasets.load_dataset` only when the hub is reachable (or its local cache with HF_HUB_OFFLINE),
else a DataError that says how to bring the data over."""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

from flux_jax.data.records import DataError, RawRecord
from flux_jax.data.tables import ROWS_PER_BATCH, columns_to_read, records_from_batches

HUB_PREFIX = "hf:"


DEFAULT_HUB_SPLIT = "train"


# Seconds to wait for the hub's host before saying there is no network (load_dataset itself
# retries for ~25 s on a machine without one).
HUB_CONNECT_TIMEOUT_S = 5.0


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_id(path: str) -> tuple[str, str]:
    """(repo id, split) of `hf:org/name[:split]`."""
    spec = path.removeprefix(HUB_PREFIX)
    name, _, split = spec.partition(":")
    if not name or name.count("/") > 1 or not all(name.split("/")) or ":" in split:
        raise DataError(
            path, None, "is not a hub dataset id; write hf:org/name or hf:org/name:split"
        )
    return name, split or DEFAULT_HUB_SPLIT


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
