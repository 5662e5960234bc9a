"""Tokenise once, memory-map after: this process's examples from a token store
(flux_jax.data.token_store), built on first use and mapped by every later run.

    store, stats = load_cached_examples(path, tokenizer, data_format=..., max_length=..., ...)

takes the settings of `flux_jax.data.loading.load_preference_examples` (a LoadSettings or its
fields as keywords) plus `cache_dir` and `workers`, and returns what it returns (the same
examples, as a lazy sequence, and the same DataStats).

Building runs load_preference_examples' own steps: `load_share` (read, validate, render, count
bad and duplicate records, take this process's share) in one process, then `tokenize_pairs` and
`truncate_examples` on chunks of TOKENIZE_CHUNK pairs in `workers` processes, each chunk appended
to the store's files as it comes back, in order.

Data larger than IN_PROCESS_MAX_BYTES is built in a child process (`python -m
flux_jax.data.builder_process`) that forks the workers, so that the training process never holds the
texts (its memory stays flat on the first run too), never forks after JAX has started its threads,
and a user's script is never re-imported by worker processes (which `spawn` would do, and an
unguarded script would then train again). The child's log records are re-emitted here and its
errors raised here with the same type and message. Smaller data is built in this process without
workers: starting the child (importing JAX and transformers again) and a pool costs more than
tokenising a few thousand pairs.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from flux_jax.data.builder_process import build_in_child
from flux_jax.data.formats import TextPair
from flux_jax.data.loading import (
    LoadSettings,
    load_share,
    log_summary,
    log_truncation,
    truncate_examples,
)
from flux_jax.data.records import DataError
from flux_jax.data.sources import resolve_source
from flux_jax.data.stats import DataStats
from flux_jax.data.token_store import (
    StoreDamaged,
    StoreWriter,
    TokenChunk,
    TokenStore,
    default_cache_dir,
    store_directory,
    store_key,
)
from flux_jax.data.tokenization import (
    TOKENIZE_CHUNK,
    log_prompts_cut,
    tokenize_pairs,
)

log = logging.getLogger(__name__)

# Source bytes up to which a store is built in this process, without workers (about 20k short
# pairs: a few seconds of tokenising, less than a child process takes to start).
IN_PROCESS_MAX_BYTES = 8 * 2**20

MAX_AUTO_WORKERS = 8  # data.tokenize_workers = 0: min(this, CPU count)

# DataStats fields that tokenising and truncating a chunk adds to.
CHUNK_COUNTS = (
    "pairs_seen",
    "prompts_truncated",
    "responses_truncated",
    "pairs_truncated",
    "pairs_dropped",
)


CHUNKS_PER_PROGRESS_LINE = 50  # ~100k pairs between "tokenised N of M pairs" lines


def load_cached_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    settings: LoadSettings | None = None,
    *,
    cache_dir: str | Path = "",
    workers: int = 0,
    in_process_max_bytes: int = IN_PROCESS_MAX_BYTES,
    **options: Any,
) -> tuple[TokenStore, DataStats]:
    """load_preference_examples' examples and stats, from the store of these data and settings,
    built first if there is none. `settings`: a LoadSettings, or its fields as keywords (as
    load_preference_examples). `cache_dir` '' = token_store.default_cache_dir(); `workers`
    0 = min(8, CPU count) processes to tokenise a large new store."""
    settings = LoadSettings.of(settings, options)
    key = store_key(path, tokenizer, settings.to_dict())
    directory = store_directory(
        cache_dir or default_cache_dir(), key, settings.process_index, settings.process_count
    )
    store = open_existing(directory)
    if store is not None:
        log.info("%s: %d tokenised pairs mapped from %s", path, len(store), directory)
        report_again(path, store, tokenizer)
        return store, store.stats
    start = time.perf_counter()
    size = source_bytes(path)
    if size is not None and size <= in_process_max_bytes:
        build_store(directory, path, tokenizer, settings, workers=1)
    else:
        build_in_child(directory, path, tokenizer, resolve_workers(workers), settings)
    store = TokenStore.open(directory)
    log.info(
        "%s: tokenised %d pairs into the token store %s in %.1f s (later runs map it)",
        path,
        len(store),
        directory,
        time.perf_counter() - start,
    )
    return store, store.stats


def open_existing(directory: Path) -> TokenStore | None:
    """The store at `directory`, or None if there is none; a damaged one is removed (and
    rebuilt by the caller) with a warning."""
    try:
        return TokenStore.open(directory)
    except FileNotFoundError:
        return None
    except StoreDamaged as err:
        log.warning("damaged token store %s (%s): removing and rebuilding it", directory, err)
        shutil.rmtree(directory, ignore_errors=True)
        return None


def report_again(path: str | Path, store: TokenStore, tokenizer: PreTrainedTokenizerBase) -> None:
    """The warnings and truncation line the build logged, logged again from the stored stats."""
    stats = store.stats
    log_summary(path, stats)
    log_truncation(path, stats, store.meta["settings"]["drop_truncated"])
    cut = store.meta["prompts_cut"]
    if cut["count"]:
        log_prompts_cut(cut["count"], cut["pairs"], tuple(cut["first"]), tokenizer)


def source_bytes(path: str | Path) -> int | None:
    """Bytes of the files `path` names; None for a hub dataset (its size is not known here)."""
    source = resolve_source(path)
    if source.kind == "hub":
        return None
    return sum(os.path.getsize(file) for file in source.files)


def resolve_workers(workers: int) -> int:
    return workers or min(MAX_AUTO_WORKERS, os.cpu_count() or 1)


@dataclasses.dataclass
class ChunkResult:
    """One chunk of pairs tokenised and truncated: the kept pairs, the counts the chunk adds to
    DataStats (CHUNK_COUNTS), and the joint pairs whose cut fell inside the prompt."""

    chunk: TokenChunk | None
    counts: dict[str, int]
    prompts_cut: int = 0
    first_cut: tuple[str, int, list[int]] | None = None
    error: tuple[str, int | None, str, str | None] | None = None  # a DataError's fields


def tokenize_chunk(
    pairs: list[TextPair], tokenizer: PreTrainedTokenizerBase, settings: LoadSettings
) -> ChunkResult:
    """`pairs` as load_preference_examples tokenises and truncates them. A DataError comes back
    as its fields (an exception with required arguments does not survive pickling)."""
    stats = DataStats()
    prompts_cut: list[tuple[str, int, list[int]]] = []
    try:
        examples = tokenize_pairs(pairs, tokenizer, settings.tokenization, prompts_cut)
    except DataError as err:
        return ChunkResult(None, {}, error=(err.source, err.line, err.reason, err.field))
    kept = truncate_examples(examples, stats, settings)
    return ChunkResult(
        TokenChunk.from_examples(kept),
        {name: getattr(stats, name) for name in CHUNK_COUNTS},
        len(prompts_cut),
        prompts_cut[0] if prompts_cut else None,
    )


def build_store(
    directory: Path,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    settings: LoadSettings,
    *,
    workers: int,
) -> DataStats:
    """Writes the store of this process's share of `path` to `directory` (module docstring)
    with `workers` processes (1 = this one); returns the stats it stored."""
    # The pool is forked before the texts are read, so the workers start small.
    pool = start_pool(workers, tokenizer, settings) if workers > 1 else None
    try:
        share, stats = load_share(path, tokenizer, settings)
        chunks = (share[i : i + TOKENIZE_CHUNK] for i in range(0, len(share), TOKENIZE_CHUNK))
        if pool is not None:
            results: Iterable[ChunkResult] = pool.map(tokenize_in_worker, chunks)
        else:
            results = (tokenize_chunk(c, tokenizer, settings) for c in chunks)
        with StoreWriter(directory) as writer:
            cut_count, first_cut = write_chunks(writer, results, stats, len(share))
            stats.pairs_kept = writer.pairs
            log_truncation(path, stats, settings.drop_truncated)
            if cut_count:
                log_prompts_cut(cut_count, len(share), first_cut, tokenizer)
            writer.finish(
                {
                    "data": str(path),
                    "settings": {**settings.to_dict(), "tokenizer": str(tokenizer.name_or_path)},
                    "stats": stats.to_dict(),
                    "prompts_cut": {"count": cut_count, "pairs": len(share), "first": first_cut},
                }
            )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return stats


def write_chunks(
    writer: StoreWriter, results: Iterable[ChunkResult], stats: DataStats, total: int
) -> tuple[int, tuple[str, int, list[int]] | None]:
    """Appends each chunk's pairs and adds its counts to `stats`; raises the first chunk's
    DataError. Returns (joint pairs with the prompt cut, the first of them)."""
    cut_count, first_cut = 0, None
    for done, result in enumerate(results, start=1):
        if result.error is not None:
            raise DataError(*result.error)
        writer.append(result.chunk)
        for name, count in result.counts.items():
            setattr(stats, name, getattr(stats, name) + count)
        cut_count += result.prompts_cut
        first_cut = first_cut or result.first_cut
        if done % CHUNKS_PER_PROGRESS_LINE == 0:
            log.info("tokenised %d of %d pairs", stats.pairs_seen, total)
    return cut_count, first_cut


# A pool worker's tokenizer and load settings, set once by its initializer (a pool's task
# function takes one argument; the tokenizer is inherited through fork, not pickled per chunk).
_worker_job: tuple[PreTrainedTokenizerBase, LoadSettings] | None = None


def start_pool(
    workers: int, tokenizer: PreTrainedTokenizerBase, settings: LoadSettings
) -> ProcessPoolExecutor:
    """`workers` forked processes that tokenise chunks, started now (callers fork only from a
    process that has not started JAX's threads: the child of `build_in_child`). An executor, not
    a multiprocessing.Pool: a worker killed (out of memory) fails the build instead of hanging."""
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_set_worker_job,
        initargs=(tokenizer, settings),
    )
    pool.submit(os.getpid).result()  # with fork, the first task starts every worker
    return pool


def _set_worker_job(tokenizer: PreTrainedTokenizerBase, settings: LoadSettings) -> None:
    global _worker_job
    # Each worker tokenises its chunk on one core: the pool is the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_job = (tokenizer, settings)


def tokenize_in_worker(pairs: list[TextPair]) -> ChunkResult:
    assert _worker_job is not None, "tokenize_in_worker runs in a pool started by start_pool"
    tokenizer, settings = _worker_job
    return tokenize_chunk(pairs, tokenizer, settings)
