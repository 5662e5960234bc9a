"""The tokenised-data store on disk: its key, its files, its writer and its memory-mapped reader.

A store holds one process's share of one data set, tokenised and truncated exactly as
`flux_jax.data.loading.load_preference_examples` returns it, so a later run maps it instead of
tokenising again (flux_jax.data.token_cache builds and finds stores). One directory per store:

    <cache>/tokens/<key>-p<index>of<count>/
      tokens.i32    int32, every pair's prompt, chosen and rejected ids, pair after pair
      offsets.i64   int64 [N]: where pair i's ids start in tokens.i32
      counts.i32    int32 [N, 3]: prompt, chosen and rejected token counts of pair i
      lines.i64     int64 [N]: the record's line (JSONL, 1-based) or row (tables, 0-based)
      sources.i32   int32 [N]: the record's file, an index into meta.json's "sources"
      meta.json     format version, sizes, the key's settings, the load stats (written last)

The key hashes everything that changes the tokens: the data's bytes and path, the tokenizer
(its serialised vocabulary, merges, normaliser and post-processor; its chat template and special
tokens), every tokenisation setting and FORMAT_VERSION. A store is written under a temporary
name and renamed into place when complete, so a crash mid-write never leaves a store under a
real name; `TokenStore.open` also checks the file sizes against meta.json.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
from transformers import PreTrainedTokenizerBase

from flux_jax.data.sources import data_fingerprint
from flux_jax.data.stats import DataStats
from flux_jax.data.tokenization import PreferenceExample

log = logging.getLogger(__name__)

# Bump when the files or what goes into them change: older stores then miss and are rebuilt.
FORMAT_VERSION = 1

# name -> (dtype, columns per pair); tokens.i32 is the one file not sized by the pair count.
INDEX_FILES = {
    "offsets.i64": (np.int64, 1),
    "counts.i32": (np.int32, 3),
    "lines.i64": (np.int64, 1),
    "sources.i32": (np.int32, 1),
}
TOKENS_FILE = "tokens.i32"
META_FILE = "meta.json"
PARTIAL = ".partial-"  # a store being written: <final name>.partial-<host>-<pid>

# A tokenizer's own files, hashed when it was loaded from a directory and has no serialised
# fast-tokenizer state to hash instead.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def default_cache_dir() -> Path:
    """$FLUX_JAX_CACHE/tokens, else $XDG_CACHE_HOME/flux_jax/tokens, else
    ~/.cache/flux_jax/tokens."""
    if os.environ.get("FLUX_JAX_CACHE"):
        return Path(os.environ["FLUX_JAX_CACHE"]) / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flux_jax" / "tokens"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything in `tokenizer` that decides token ids and rendered chat text."""
    digest = hashlib.sha256()
    identity = {
        "class": type(tokenizer).__name__,
        "name_or_path": str(tokenizer.name_or_path),
        "vocab": len(tokenizer),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "eos_token_id": tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template,
    }
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole tokenizer.json, in memory or not
        digest.update(backend.to_str().encode())
        return digest.hexdigest()
    directory = Path(str(tokenizer.name_or_path))
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        raise ValueError(
            f"data.token_cache: cannot fingerprint the tokenizer {tokenizer.name_or_path!r} (not a "
            "fast tokenizer and not loaded from a local directory), so a token store could be "
            "reused with other token ids; set data.token_cache: false"
        )
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def store_key(path: str | Path, tokenizer: PreTrainedTokenizerBase, settings: dict) -> str:
    """The store's key: data bytes and path, tokenizer, `settings` (every option of
    load_preference_examples, the process share included) and FORMAT_VERSION."""
    text = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "path": os.path.abspath(path) if not str(path).startswith("hf:") else str(path),
            "data": data_fingerprint(str(path)),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            **settings,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def store_directory(
    cache_dir: str | Path, key: str, process_index: int, process_count: int
) -> Path:
    return Path(cache_dir) / f"{key}-p{process_index}of{process_count}"


class StoreDamaged(Exception):
    """A store directory whose files do not match its meta.json (or that has none)."""


class TokenStore(Sequence[PreferenceExample]):
    """A store's pairs as a read-only sequence of PreferenceExample whose id arrays view the
    memory-mapped token file: opening costs a few small reads, whatever the data's size, and a
    pair's ids are read from disk (the page cache) when it is indexed."""

    def __init__(self, directory: Path, meta: dict, arrays: dict[str, np.ndarray]):
        self.directory = directory
        self.meta = meta
        self._tokens = arrays[TOKENS_FILE]
        self._offsets = arrays["offsets.i64"]
        self._counts = arrays["counts.i32"]
        self._lines = arrays["lines.i64"]
        self._source_ids = arrays["sources.i32"]
        self._sources: list[str] = meta["sources"]
        self._ref_logps: np.ndarray | None = None  # [N, 2], set by with_ref_logps

    @classmethod
    def open(cls, directory: str | Path) -> TokenStore:
        """Maps the store at `directory`; raises StoreDamaged if it is incomplete or altered,
        FileNotFoundError if there is none."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not directory.is_dir():
            raise FileNotFoundError(directory)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise StoreDamaged(f"{meta_path}: unreadable ({err})") from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreDamaged(f"{meta_path}: format {meta.get('format_version')}")
        pairs, tokens = int(meta["pairs"]), int(meta["tokens"])
        arrays = {TOKENS_FILE: _map(directory / TOKENS_FILE, np.int32, (tokens,))}
        for name, (dtype, columns) in INDEX_FILES.items():
            shape = (pairs, columns) if columns > 1 else (pairs,)
            arrays[name] = _map(directory / name, dtype, shape)
        return cls(directory, meta, arrays)

    @property
    def stats(self) -> DataStats:
        """The load stats of the run that built the store (fresh copy)."""
        return DataStats(**self.meta["stats"])

    @property
    def token_counts(self) -> np.ndarray:
        """[N, 3] int32 prompt, chosen and rejected counts, from the index alone."""
        return self._counts

    def with_ref_logps(self, logps_Nx2: np.ndarray) -> TokenStore:
        """The same pairs, each carrying its (chosen, rejected) reference log-probs."""
        logps_Nx2 = np.asarray(logps_Nx2, np.float32)
        if logps_Nx2.shape != (len(self), 2):
            raise ValueError(f"need [{len(self)}, 2] reference log-probs, got {logps_Nx2.shape}")
        store = copy.copy(self)  # shares the maps
        store._ref_logps = logps_Nx2
        return store

    def __len__(self) -> int:
        return len(self._counts)

    @overload
    def __getitem__(self, index: int) -> PreferenceExample: ...

    @overload
    def __getitem__(self, index: slice) -> list[PreferenceExample]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} of a store of {len(self)}")
        index = int(index) % len(self)
        start = int(self._offsets[index])
        prompt, chosen, rejected = (int(n) for n in self._counts[index])
        ids = self._tokens[start : start + prompt + chosen + rejected]
        ref = None
        if self._ref_logps is not None:
            ref = (float(self._ref_logps[index, 0]), float(self._ref_logps[index, 1]))
        return PreferenceExample(
            prompt_ids=ids[:prompt],
            chosen_ids=ids[prompt : prompt + chosen],
            rejected_ids=ids[prompt + chosen :],
            source=self._sources[int(self._source_ids[index])],
            line=int(self._lines[index]),
            ref_logps=ref,
        )

    def __iter__(self) -> Iterator[PreferenceExample]:
        return (self[i] for i in range(len(self)))


def _map(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The file at `path` as a read-only array of `shape`, memory-mapped (zero-size files cannot
    be mapped: those are empty arrays)."""
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        size = path.stat().st_size
    except OSError as err:
        raise StoreDamaged(f"{path}: missing") from err
    if size != expected:
        raise StoreDamaged(f"{path}: {size} bytes, expected {expected}")
    if expected == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape).view(np.ndarray)


@dataclasses.dataclass(frozen=True)
class TokenChunk:
    """Consecutive pairs packed as the store lays them out (what a tokenising worker returns:
    a few flat arrays pickle far faster than thousands of small ones)."""

    tokens: np.ndarray  # int32: each pair's prompt, chosen, rejected ids, pair after pair
    counts: np.ndarray  # int32 [n, 3]
    lines: np.ndarray  # int64 [n]
    sources: list[str]

    @classmethod
    def from_examples(cls, examples: Sequence[PreferenceExample]) -> TokenChunk:
        counts = np.asarray(
            [(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)) for e in examples],
            np.int32,
        ).reshape(-1, 3)
        parts = [part for e in examples for part in (e.prompt_ids, e.chosen_ids, e.rejected_ids)]
        return cls(
            tokens=np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32),
            counts=counts,
            lines=np.asarray([e.line for e in examples], np.int64),
            sources=[e.source for e in examples],
        )


class StoreWriter:
    """Writes a store chunk by chunk under a temporary name; `finish` renames it into place.

        with StoreWriter(directory) as writer:
            writer.append(chunk)             # a TokenChunk, as often as needed
            writer.finish({"stats": ...})    # meta.json, fsync, atomic rename

    Leaving the block without `finish` (an exception) deletes the partial directory.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.partial = self.directory.with_name(
            f"{self.directory.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}"
        )
        self.pairs = 0
        self.tokens = 0
        self.sources: dict[str, int] = {}
        self._files: dict[str, Any] = {}

    def __enter__(self) -> StoreWriter:
        remove_dead_partials(self.directory)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir()
        for name in (TOKENS_FILE, *INDEX_FILES):
            self._files[name] = open(self.partial / name, "wb")  # noqa: SIM115 (closed in finish)
        return self

    def append(self, chunk: TokenChunk) -> None:
        """Appends `chunk`'s pairs after those already written."""
        if not len(chunk.counts):
            return
        sizes = chunk.counts.sum(axis=1, dtype=np.int64)
        offsets = self.tokens + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        source_ids = [self.sources.setdefault(s, len(self.sources)) for s in chunk.sources]
        chunk.tokens.astype(np.int32, copy=False).tofile(self._files[TOKENS_FILE])
        offsets.astype(np.int64).tofile(self._files["offsets.i64"])
        chunk.counts.astype(np.int32, copy=False).tofile(self._files["counts.i32"])
        chunk.lines.astype(np.int64, copy=False).tofile(self._files["lines.i64"])
        np.asarray(source_ids, np.int32).tofile(self._files["sources.i32"])
        self.pairs += len(chunk.counts)
        self.tokens += int(sizes.sum())

    def finish(self, meta: dict) -> None:
        """Writes meta.json (with `meta`), makes the files durable and renames the store into
        place. If another process finished the same store first, keeps that one."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files = {}
        full_meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "pairs": self.pairs,
            "tokens": self.tokens,
            "sources": sorted(self.sources, key=self.sources.__getitem__),
        }
        with open(self.partial / META_FILE, "w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(self.partial, self.directory)
        except OSError:
            if not self.directory.is_dir():
                raise
            shutil.rmtree(self.partial)  # the same store, finished by another run first
        _fsync_directory(self.directory.parent)

    def __exit__(self, exc_type, exc, tb) -> None:
        for f in self._files.values():
            f.close()
        if self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)


def remove_dead_partials(directory: Path) -> None:
    """Deletes partial copies of the store at `directory` left by killed writers of this host
    (their process is gone); other hosts' and live writers' copies are left alone."""
    host = socket.gethostname()
    for partial in directory.parent.glob(f"{directory.name}{PARTIAL}{host}-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            log.info("removing %s, left by a killed token-store writer", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
