"""Reading Hugging Face safetensors checkpoints: the tensors of one file or an indexed shard set.

`SafetensorsCheckpoint` opens every shard once and reads tensors (or slices of them) on demand,
so a loader can fetch only the blocks its devices hold. A file safetensors refuses is explained
in plain words (`describe_safetensors_damage`: truncated copy, Git LFS pointer, not safetensors),
naming the file and the index entry that lists it.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the architecture its config describes."""


class SafetensorsCheckpoint:
    """The tensors of a HF model directory: one model.safetensors, or shards with an index."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, "model.safetensors.index.json")
        weight_map: dict[str, str] = {}
        if os.path.exists(index_path):
            weight_map = _read_weight_map(index_path)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(self.path) if n.endswith(".safetensors"))
            if not files:
                raise CheckpointError(
                    f"{self.path}: no model.safetensors, model.safetensors.index.json or "
                    "*.safetensors files (PyTorch .bin checkpoints are not read; convert them with "
                    "transformers' save_pretrained(safe_serialization=True))"
                )
        self._handles = {}
        self.file_of: dict[str, str] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        for name in files:
            file_path = os.path.join(self.path, name)
            if not os.path.exists(file_path):
                raise CheckpointError(f"{index_path}: lists {name}, which does not exist")
            try:
                handle = safe_open(file_path, framework="numpy")
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            except Exception as e:  # safetensors' errors name neither the file nor the cause
                listed = [k for k, v in weight_map.items() if v == name]
                where = (
                    f" (listed in {index_path} for {len(listed)} tensors, e.g. {listed[0]})"
                    if listed
                    else ""
                )
                raise CheckpointError(
                    f"{file_path}{where}: unreadable safetensors file: "
                    f"{describe_safetensors_damage(file_path, e)}. Re-download or re-copy it."
                ) from e
            self._handles[name] = handle
            for key, shape in shapes.items():
                self.file_of[key] = name
                self.shape_of[key] = shape

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        name = self.file_of[key]
        try:
            tensor_slice = self._handles[name].get_slice(key)
            return tensor_slice[index] if index is not None else tensor_slice[:]
        except Exception as e:
            raise CheckpointError(
                f"{os.path.join(self.path, name)}: cannot read tensor {key!r} "
                f"({type(e).__name__}: {e})"
            ) from e


def _read_weight_map(index_path: str) -> dict[str, str]:
    """The tensor -> shard file map of a model.safetensors.index.json, or an error naming it."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: invalid JSON ({e}); re-download or re-copy it") from e
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: no 'weight_map' mapping of tensor -> file") from e
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str)]
    if not isinstance(weight_map, dict) or bad:
        raise CheckpointError(
            f"{index_path}: 'weight_map' must map tensor names to file names; got {bad[:3]}"
        )
    return weight_map


def describe_safetensors_damage(file_path: str, error: Exception) -> str:
    """What seems wrong with a safetensors file that safetensors refused, in plain words.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data; comparing the file's size with what the header describes tells a
    truncated copy from a file that is not safetensors at all.
    """
    cause = f"safetensors says: {error}"
    try:
        size = os.path.getsize(file_path)
        with open(file_path, "rb") as f:
            start = f.read(64)
            header_len = int.from_bytes(start[:8], "little")
            f.seek(8)
            header_bytes = f.read(header_len) if header_len <= size - 8 else b""
    except OSError as e:
        return f"{e.strerror or e} ({cause})"
    if start.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights: run `git lfs pull` in its repository"
    if size < 8:
        return f"the file is {size} bytes, too short for a safetensors header ({cause})"
    if header_len > size - 8:
        return (
            f"its first 8 bytes give a {header_len}-byte header but the file has only "
            f"{size} bytes: truncated, or not a safetensors file ({cause})"
        )
    try:
        header = json.loads(header_bytes)
        data_end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"its header is not valid safetensors JSON: corrupted ({cause})"
    expected = 8 + header_len + data_end
    if size < expected:
        return (
            f"truncated: its header describes {expected} bytes, the file has {size} "
            f"({expected - size} missing) ({cause})"
        )
    if size > expected:
        return (
            f"{size - expected} bytes longer than the {expected} its header describes: "
            f"damaged or appended to ({cause})"
        )
    return cause
