"""Hugging Face checkpoints <-> flux_jax models: safetensors shards in, safetensors shards out.

Loading builds the model abstractly (no memory), checks the checkpoint against the weight table
(every problem reported in one error), then creates each parameter directly on its sharding with
`jax.make_array_from_callback`: the callback reads only the slice of the HF tensor that one device
holds, so no process ever holds the full model, and a process on a multi-host run reads only what
its own devices need.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors.numpy import save_file

from flux_jax import sharding as sharding_lib
from flux_jax.models.qwen import params as table
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.models.qwen.model import QwenForCausalLM, build_model

# CheckpointError is public as flux_jax.CheckpointError and flux_jax.hf_io.CheckpointError.
from flux_jax.safetensors_io import CheckpointError, SafetensorsCheckpoint
from flux_jax.tensor_inventory import inventory_problems

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: Any) -> Any:
    """The jnp dtype named by a config string ("float32", "bfloat16", "float16"); others pass."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def _expected_tensors(cfg: QwenConfig, our_shapes: dict) -> dict[str, tuple]:
    """HF name -> (entry, leading index into our parameter, expected HF shape)."""
    expected = {}
    for entry in table.weight_table(cfg):
        hf_shape = table.hf_shape(entry.layout, our_shapes[entry.path][entry.lead_dims :])
        for hf_name, lead in entry.hf_tensors():
            expected[hf_name] = (entry, lead, hf_shape)
    return expected


def _check_tensors(ckpt: SafetensorsCheckpoint, expected: dict, cfg: QwenConfig) -> None:
    found = dict(ckpt.shape_of)
    if cfg.tie_word_embeddings and "lm_head.weight" in found and "lm_head.weight" not in expected:
        # transformers ties the head to the embedding and ignores a stored copy; so do we.
        log.warning("%s: tie_word_embeddings=True; ignoring the stored lm_head.weight", ckpt.path)
        del found["lm_head.weight"]
    problems = inventory_problems(found, {name: exp[2] for name, exp in expected.items()})
    if problems:
        raise CheckpointError(
            f"{ckpt.path} does not match its config.json (model_type={cfg.model_type}, "
            f"layers={cfg.num_hidden_layers}, hidden={cfg.hidden_size}):\n  "
            + "\n  ".join(problems)
        )


def _read_block(
    ckpt: SafetensorsCheckpoint,
    entry: table.WeightEntry,
    index: tuple[slice, ...],
    full_shape: tuple[int, ...],
    dtype: Any,
) -> np.ndarray:
    """The block `index` of our parameter, read slice-wise from the HF tensors that hold it."""

    def one_layer(hf_name: str, inner_index, inner_shape) -> np.ndarray:
        hf_index = table.hf_index_for(entry.layout, inner_index, inner_shape)
        if hf_index is None:  # not a contiguous HF slice: read whole, then cut
            whole = table.to_ours(entry.layout, ckpt.read(hf_name), inner_shape)
            return whole[inner_index]
        block_shape = tuple(
            len(range(*s.indices(n))) for s, n in zip(inner_index, inner_shape, strict=True)
        )
        return table.to_ours(entry.layout, ckpt.read(hf_name, hf_index), block_shape)

    n = entry.lead_dims  # leading axes that pick an HF tensor (layer; expert)
    if n == 0:
        return np.asarray(one_layer(entry.hf_name, index, full_shape)).astype(dtype, copy=False)
    lead_ranges = [range(*s.indices(d)) for s, d in zip(index[:n], full_shape[:n], strict=True)]
    leads = list(itertools.product(*lead_ranges))
    tensors = [one_layer(entry.hf_name_at(lead), index[n:], full_shape[n:]) for lead in leads]
    lead_shape = tuple(len(r) for r in lead_ranges)
    return np.stack(tensors).reshape(lead_shape + tensors[0].shape).astype(dtype, copy=False)


def _block_reader(
    ckpt: SafetensorsCheckpoint, entry: table.WeightEntry, shape: tuple[int, ...], dtype: Any
) -> Any:
    """The make_array_from_callback callback for one parameter, reading each distinct block once.

    JAX calls it once per addressable device; devices holding replicas of one block (the data
    axis, a dimension too small to split) share a single read and a single host copy.
    """
    blocks: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        if key not in blocks:
            blocks[key] = _read_block(ckpt, entry, index, shape, dtype)
        return blocks[key]

    return read


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = "float32",
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    remat: str = "none",
    attention_impl: str | None = "xla",
    moe_impl: str = "auto",
) -> QwenForCausalLM:
    """Loads an HF Qwen2/Qwen3/Qwen3-MoE model directory (config.json + safetensors) into a
    flux_jax model.

    Args:
      path: the HF model directory.
      dtype: parameter dtype ("float32" for training master weights, "bfloat16" to serve).
      compute_dtype: activation dtype (default: `dtype`).
      mesh: place every parameter on its sharding over this mesh (default: the first device).
      remat, attention_impl, moe_impl: passed to the model (see QwenForCausalLM).
    """
    path = os.fspath(path)
    cfg = QwenConfig.from_pretrained_dir(path)
    param_dtype = as_dtype(dtype)
    abstract = build_model(
        cfg,
        param_dtype=param_dtype,
        compute_dtype=as_dtype(compute_dtype or dtype),
        remat=remat,
        attention_impl=attention_impl,
        activation_sharding=sharding_lib.batch_sharding(mesh) if mesh is not None else None,
        moe_impl=moe_impl,
        abstract=True,
    )
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    our_shapes = {p: v.get_value().shape for p, v in flat.items()}
    ckpt = SafetensorsCheckpoint(path)
    _check_tensors(ckpt, _expected_tensors(cfg, our_shapes), cfg)

    np_dtype = np.dtype(param_dtype)
    for entry in table.weight_table(cfg):
        var = flat[entry.path]
        shape = var.get_value().shape
        if mesh is not None:
            target = sharding_lib.logical_sharding(mesh, var.get_metadata()["logical_axes"], shape)
        else:  # this process's first device: jax.devices()[0] may belong to another process
            target = SingleDeviceSharding(jax.local_devices()[0])
        # Called only for this process's devices: a host reads just the blocks it holds.
        var.set_value(
            jax.make_array_from_callback(
                shape, target, _block_reader(ckpt, entry, shape, np_dtype), dtype=np_dtype
            )
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------------------------
# Export


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}; use bytes or e.g. '5GB', '500MB'")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _export_plan(cfg: QwenConfig, flat: dict) -> list[tuple[str, table.WeightEntry, tuple]]:
    """(hf_name, entry, leading index) in an order that reads each stacked parameter once."""
    return [
        (hf_name, entry, lead)
        for entry in table.weight_table(cfg)
        for hf_name, lead in entry.hf_tensors()
    ]


def _host_tensors(flat: dict, plan, np_dtype) -> Iterator[tuple[str, np.ndarray]]:
    current_path, current = None, None
    for hf_name, entry, lead in plan:
        if entry.path != current_path:  # one stacked parameter on the host at a time
            current_path, current = entry.path, sharding_lib.to_host(flat[entry.path].get_value())
        ours = current[lead]
        yield hf_name, table.to_hf(entry.layout, ours).astype(np_dtype)


def save_pretrained(
    model: QwenForCausalLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer_from: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dtype: Any = None,
) -> str:
    """Writes `model` as an HF checkpoint that transformers' from_pretrained loads.

    Safetensors shards (with model.safetensors.index.json when more than one), config.json,
    generation_config.json, and the tokenizer files found in `tokenizer_from`. Tied embeddings
    stay tied: no lm_head.weight is written. dtype defaults to the dtype the model was loaded from.
    On a multi-host run every process must call this (arrays are gathered); process 0 writes.
    """
    cfg = model.config
    out_dir = os.fspath(out_dir)
    dtype_name = dtype if isinstance(dtype, str) else (np.dtype(dtype).name if dtype else None)
    dtype_name = dtype_name or cfg.torch_dtype
    np_dtype = np.dtype(as_dtype(dtype_name))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    plan = _export_plan(cfg, flat)
    limit = _parse_size(max_shard_size)

    # Assign tensors to shards from their sizes first: shard names carry the total count.
    shard_of, sizes, shard, used = {}, {}, 0, 0
    for hf_name, entry, lead in plan:
        shape = flat[entry.path].get_value().shape[len(lead) :]
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if used and used + nbytes > limit:
            shard, used = shard + 1, 0
        shard_of[hf_name], used = shard, used + nbytes
        sizes[hf_name] = nbytes
    num_shards = shard + 1

    def shard_name(i: int) -> str:
        if num_shards == 1:
            return "model.safetensors"
        return f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"

    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    pending: dict[str, np.ndarray] = {}
    pending_shard = 0
    for hf_name, tensor in _host_tensors(flat, plan, np_dtype):
        if shard_of[hf_name] != pending_shard:
            if writer:
                save_file(
                    pending, os.path.join(out_dir, shard_name(pending_shard)), {"format": "pt"}
                )
            pending, pending_shard = {}, shard_of[hf_name]
        pending[hf_name] = tensor
    if writer:
        save_file(pending, os.path.join(out_dir, shard_name(pending_shard)), {"format": "pt"})
    if not writer:
        return out_dir

    if num_shards > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {name: shard_name(i) for name, i in shard_of.items()},
        }
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf_config(dtype=dtype_name), f, indent=2)
    _write_generation_config(cfg, out_dir, tokenizer_from)
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, out_dir)
    return out_dir


def _write_generation_config(cfg: QwenConfig, out_dir: str, source: Any) -> None:
    source_file = os.path.join(os.fspath(source), "generation_config.json") if source else None
    if source_file and os.path.exists(source_file):
        shutil.copyfile(source_file, os.path.join(out_dir, "generation_config.json"))
        return
    generation = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    generation = {k: v for k, v in generation.items() if v is not None}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)


def copy_tokenizer_files(source: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files present in `source`; errors if there are none."""
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(source, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    if not copied:
        raise FileNotFoundError(
            f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) to copy"
        )
    return copied
