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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flux_jax.data.batching import collate_pairs
from flux_jax.data.records import resolve_data_files
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


def data_fingerprint(path: str) -> str:
    digest = hashlib.sha256()
    for file in resolve_data_files(path):
        digest.update(os.path.basename(file).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
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
) -> np.ndarray:
    """[N, 2] (chosen, rejected) reference log-probs of `examples`, in order.

    `ref_logps_fn(host_batch) -> (chosen [B], rejected [B])` places and runs one batch. The last
    batch is filled up with copies of its first pair so every batch has the same shape (on a
    multi-host run every process must run the same number of same-shaped steps; pass
    `score_windows=False` there, see `collate_pairs`).
    """
    out = np.zeros((len(examples), 2), np.float32)
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        chosen, rejected = ref_logps_fn(
            collate_pairs(chunk, pad_id, bucket_lengths, score_windows=score_windows)
        )
        out[start : start + real, 0] = np.asarray(chosen)[:real]
        out[start : start + real, 1] = np.asarray(rejected)[:real]
    return out


def attach_ref_logps(
    examples: Sequence[PreferenceExample], logps_Nx2: np.ndarray
) -> list[PreferenceExample]:
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
    lengths = np.asarray(
        [[len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)] for e in examples], np.int32
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
