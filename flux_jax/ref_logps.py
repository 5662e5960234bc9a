"""Precomputed reference log-probs: one pass of the frozen reference over the data, cached on disk.

With `algorithm.precompute_ref_logps`, the reference model runs once over the training pairs before
training; its summed response log-probs ride along in every batch (`ref_chosen_logps`,
`ref_rejected_logps`), so the train step runs no reference forward and holds no reference weights.
The result is cached under a key derived from the model weights, the data files and every setting
that changes tokenisation or numerics, and later runs on the same data reuse it.

The weights' fingerprint hashes config.json, each safetensors file's size and header (names,
shapes, dtypes, offsets) and 64 evenly spaced 64 KiB samples of its bytes: reading all of an 8B
checkpoint (16 GB) for a cache key would cost more than it saves.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from flux_jax.data.batching import add_scored_positions, bucket_length, pad_side
from flux_jax.data.packing import collate_shared_prefix, pair_length
from flux_jax.data.sources import data_fingerprint  # noqa: F401 (ref_logps.data_fingerprint)
from flux_jax.data.token_store import TokenStore
from flux_jax.data.tokenization import PreferenceExample

log = logging.getLogger(__name__)

SAMPLES_PER_FILE = 64
SAMPLE_BYTES = 64 * 1024


def cache_dir() -> str:
    root = os.environ.get("FLUX_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "flux_jax"
    )
    return os.path.join(root, "ref_logps")


def _hash_file_sampled(digest: Any, path: str) -> None:
    size = os.path.getsize(path)
    digest.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little") if path.endswith(".safetensors") else 0
        digest.update(f.read(min(header_len, 100_000_000)))
        for i in range(SAMPLES_PER_FILE):
            f.seek(size * i // SAMPLES_PER_FILE)
            digest.update(f.read(SAMPLE_BYTES))


def model_fingerprint(model_dir_or_builtin: str, seed: int) -> str:
    digest = hashlib.sha256()
    if not os.path.isdir(model_dir_or_builtin):  # builtin: the preset name and init seed
        digest.update(f"{model_dir_or_builtin}:{seed}".encode())
        return digest.hexdigest()
    for path in sorted(glob.glob(os.path.join(model_dir_or_builtin, "*.safetensors"))):
        _hash_file_sampled(digest, path)
    with open(os.path.join(model_dir_or_builtin, "config.json"), "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()


def cache_key(model_fp: str, data_fp: str, settings: dict[str, Any]) -> str:
    text = json.dumps({"model": model_fp, "data": data_fp, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compute_ref_logps(
    examples: Sequence[PreferenceExample],
    ref_logps_fn: Callable[[dict[str, np.ndarray]], tuple[Any, Any]],
    *,
    batch_size: int,
    pad_id: int,
    bucket_lengths: Sequence[int],
    score_windows: bool = True,
    shared_prefix: bool = False,
) -> np.ndarray:
    """[N, 2] (chosen, rejected) reference log-probs of `examples`, in order.

    `ref_logps_fn(host_batch) -> (chosen [B], rejected [B])` places and runs one batch: a
    standard-layout batch of `batch_size` pairs, i.e. 2B rows that are each scored on their own,
    or with `shared_prefix` a batch of one-pair rows (pairs in `pair_order`'s slot order).

    The reference needs no pairing, so this pass batches the 2N sequences (prompt + chosen,
    prompt + rejected) by length rather than by pair: each batch's 2B rows are 2B sequences of
    about the same length, and it pads only to its own longest one's bucket. (256 pairs of the
    long-tailed mix of tools/make_length_mix.py, batch 8: 49% of the computed tokens were
    padding in file order, 21% with pairs sorted by length, 7% with sequences sorted.)

    With `shared_prefix`, each pair is one `prompt | chosen | rejected` row (the layout of
    flux_jax.data.packing, the prompt run once), pairs sorted by that length, 2B pairs per call
    (as many rows as the sequence layout's). The log-probs are the same; the work is not: the
    prompt's tokens go through the model once instead of twice (on the fixed-length mix of
    tools/make_length_mix.py, 384 tokens a pair instead of 512). Single process only.

    The results go back to the pairs' order. The last batch is filled up with copies of its first
    sequence (pair) so every batch has the same number of rows (on a multi-host run every process
    must run the same number of same-shaped steps; pass `score_windows=False` and one bucket
    there).
    """
    rows = 2 * batch_size
    out = np.zeros((len(examples), 2), np.float32)
    if shared_prefix:
        lengths = [pair_length(e, share_prefix=True) for e in examples]
        for chunk, real in _length_sorted_chunks(lengths, rows):
            batch = collate_shared_prefix(
                [examples[i] for i in chunk], pad_id, bucket_lengths, score_windows=score_windows
            )
            chosen, rejected = ref_logps_fn(batch)
            # One pair a row: row r holds the chunk's pair pair_order[r, 0], in the outputs' order.
            for r, slot in enumerate(batch["pair_order"][:, 0]):
                if slot < real:
                    out[chunk[slot]] = (float(chosen[r]), float(rejected[r]))
        return out
    sequences = [(i, side) for i in range(len(examples)) for side in (0, 1)]
    lengths = [_sequence_length(examples[i], side) for i, side in sequences]
    for chunk, real in _length_sorted_chunks(lengths, rows):
        width = bucket_length(max(lengths[k] for k in chunk), bucket_lengths)
        chosen, rejected = ref_logps_fn(
            _collate_sequences(
                examples, [sequences[k] for k in chunk], batch_size, pad_id, width, score_windows
            )
        )
        logps = np.concatenate([np.asarray(chosen), np.asarray(rejected)])
        for k, value in zip(chunk[:real], logps[:real], strict=True):
            out[sequences[k]] = value
    return out


def _length_sorted_chunks(lengths: Sequence[int], rows: int) -> Iterator[tuple[list[int], int]]:
    """Indices of `lengths` in chunks of `rows`, shortest first (a stable sort), each with its
    count of real entries; the last chunk is filled up with copies of its first index."""
    by_length = np.argsort(lengths, kind="stable")
    for start in range(0, len(lengths), rows):
        chunk = [int(i) for i in by_length[start : start + rows]]
        yield chunk + [chunk[0]] * (rows - len(chunk)), len(chunk)


def _sequence_length(example: PreferenceExample, side: int) -> int:
    completion = example.rejected_ids if side else example.chosen_ids
    return len(example.prompt_ids) + len(completion)


def _collate_sequences(
    examples: Sequence[PreferenceExample],
    chunk: Sequence[tuple[int, int]],
    batch_size: int,
    pad_id: int,
    width: int,
    score_windows: bool,
) -> dict[str, np.ndarray]:
    """A standard-layout batch whose "chosen" rows are the first B sequences of `chunk` and whose
    "rejected" rows are the other B (each (pair index, 0 = chosen / 1 = rejected))."""
    batch = {}
    for name, part in (("chosen", chunk[:batch_size]), ("rejected", chunk[batch_size:])):
        prompts = [examples[i].prompt_ids for i, _ in part]
        completions = [
            examples[i].rejected_ids if side else examples[i].chosen_ids for i, side in part
        ]
        arrays = pad_side(prompts, completions, pad_id, width)
        batch.update({f"{name}_{key}": array for key, array in arrays.items()})
    if score_windows:
        add_scored_positions(batch, ("chosen_loss_mask", "rejected_loss_mask"))
    return batch


def attach_ref_logps(
    examples: Sequence[PreferenceExample], logps_Nx2: np.ndarray
) -> Sequence[PreferenceExample]:
    if isinstance(examples, TokenStore):  # stays memory-mapped; the values ride alongside
        return examples.with_ref_logps(logps_Nx2)
    return [
        dataclasses.replace(e, ref_logps=(float(c), float(r)))
        for e, (c, r) in zip(examples, logps_Nx2, strict=True)
    ]


def load_or_compute(
    key: str, examples: Sequence[PreferenceExample], compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, str]:
    """The cached [N, 2] array for `key` (checked against the examples), or a fresh one, saved.

    Returns the array and "cache" or "computed". Each process caches its own share.
    """
    import jax

    path = os.path.join(cache_dir(), f"{key}-p{jax.process_index()}of{jax.process_count()}.npz")
    if isinstance(examples, TokenStore):  # from its index, without reading the tokens
        lengths = np.asarray(examples.token_counts)
    else:
        lengths = np.asarray(
            [[len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)] for e in examples],
            np.int32,
        )
    if os.path.exists(path):
        cached = np.load(path)
        if cached["lengths"].shape == lengths.shape and np.array_equal(cached["lengths"], lengths):
            return cached["logps"], "cache"
        log.warning("%s does not match the tokenised data; recomputing", path)
    logps = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, logps=logps, lengths=lengths)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry
    return logps, "computed"
