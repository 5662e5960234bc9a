"""Preference data for DPO: JSONL records -> tokenised pairs -> padded batches via grain.

records.py       which files a path names; one JSON object per line; DataError
formats.py       the preferences / conversational / implicit_prompt schemas, validation
chat.py          rendering chat messages with the tokenizer's chat template
tokenization.py  the tokenisation convention (ids, eos, truncation, loss mask)
loading.py       path -> this process's tokenised examples, with DataStats
token_store.py   the tokenised-data store on disk: key, files, writer, memory-mapped reader
token_cache.py   tokenise once (worker processes), memory-map after: load_cached_examples
batching.py      bucket lengths and the padded batch dict (the batch contract)
pipeline.py      the grain MapDataset pipeline and its resumable iterator
check.py         the `flux-jax data check` report
"""

from flux_jax.data.batching import (
    BATCH_KEYS,
    SCORED_POSITION_KEYS,
    collate_pairs,
    default_bucket_lengths,
)
from flux_jax.data.check import data_check_report, format_data_check_report
from flux_jax.data.formats import DATA_FORMATS
from flux_jax.data.loading import load_preference_examples
from flux_jax.data.pipeline import make_preference_iterator, preference_batches
from flux_jax.data.records import DataError
from flux_jax.data.stats import DataStats
from flux_jax.data.tokenization import PreferenceExample

__all__ = [
    "BATCH_KEYS",
    "SCORED_POSITION_KEYS",
    "DATA_FORMATS",
    "DataError",
    "DataStats",
    "PreferenceExample",
    "collate_pairs",
    "data_check_report",
    "default_bucket_lengths",
    "format_data_check_report",
    "load_preference_examples",
    "make_preference_iterator",
    "preference_batches",
]
