"""How long a generation may be: the model's position range and the KV cache's memory, checked
before anything is allocated.

The cache holds every layer's keys and values for every row and slot,

  bytes = 2 (k, v) x L x B x S x K x H x bytes(compute dtype),   S = prompt width + max_new_tokens,

split over the devices as the cache sharding splits it. Unchecked, a large `max_new_tokens`
(1e9) reaches XLA as an allocation of hundreds of GB, which fails (or swaps the host to a halt)
with a message that names no setting; and tokens past `max_position_embeddings` get RoPE
positions the model never saw in training.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flux_jax.models.qwen.config import QwenConfig
from flux_jax.sharding import format_bytes

SETTING = "max_new_tokens (generation.max_new_tokens)"


def check_positions(cfg: QwenConfig, longest_prompt: int, max_new_tokens: int) -> None:
    """ValueError unless the longest prompt plus max_new_tokens fits max_position_embeddings."""
    limit = cfg.max_position_embeddings
    if longest_prompt + max_new_tokens <= limit:
        return
    if longest_prompt >= limit:
        raise ValueError(
            f"the longest prompt has {longest_prompt} tokens, leaving no room for new tokens in "
            f"the model's max_position_embeddings={limit} (its config.json); shorten the prompt"
        )
    raise ValueError(
        f"{SETTING}={max_new_tokens} plus the longest prompt ({longest_prompt} tokens) is "
        f"{longest_prompt + max_new_tokens} positions, beyond the model's "
        f"max_position_embeddings={limit} (its config.json); at most "
        f"max_new_tokens={limit - longest_prompt} fits"
    )


def kv_cache_shape(cfg: QwenConfig, batch: int, max_len: int) -> tuple[int, ...]:
    """[L, B, S, K, H]: the shape of each of the cache's `k` and `v`."""
    return (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)


def kv_cache_bytes_per_device(
    cfg: QwenConfig, batch: int, max_len: int, dtype: Any, sharding: Any = None
) -> int:
    """Bytes of the cache's k and v on one device, under `sharding` (None: one device)."""
    shape = kv_cache_shape(cfg, batch, max_len)
    local = sharding.shard_shape(shape) if sharding is not None else shape
    return 2 * math.prod(local) * np.dtype(dtype).itemsize


def host_available_bytes() -> int | None:
    """The host memory the kernel says can be allocated without swapping (Linux MemAvailable),
    else the physical memory; None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def free_memory(devices: Sequence[Any]) -> tuple[int, str] | None:
    """(bytes, description) of the memory one device of `devices` can still allocate.

    Accelerators report their own limit and use; CPU devices report nothing and share the host's
    memory, so for them it is the host's available memory divided by their number.
    """
    reported = []
    for device in devices:
        stats = device.memory_stats()
        if stats and "bytes_limit" in stats:
            reported.append((stats["bytes_limit"] - stats.get("bytes_in_use", 0), device))
    if reported:
        free_bytes, device = min(reported, key=lambda pair: pair[0])
        return free_bytes, f"free on {device}"
    host = host_available_bytes()
    if host is None:
        return None
    if len(devices) == 1:
        return host, "available host memory"
    return host // len(devices), f"available host memory shared by {len(devices)} CPU devices"


def check_kv_cache_fits(
    cfg: QwenConfig,
    *,
    batch: int,
    prompt_width: int,
    max_new_tokens: int,
    dtype: Any,
    sharding: Any = None,
) -> None:
    """ValueError naming max_new_tokens, the bytes needed and the bytes free, unless the cache
    for `batch` rows of `prompt_width + max_new_tokens` slots fits each device's free memory."""
    max_len = prompt_width + max_new_tokens
    needed = kv_cache_bytes_per_device(cfg, batch, max_len, dtype, sharding)
    devices = sorted(sharding.addressable_devices, key=lambda d: d.id) if sharding else None
    free = free_memory(devices or [jax.local_devices()[0]])
    if free is None or needed <= free[0]:
        return
    free_bytes, where = free
    fitting_slots = int(free_bytes // (needed / max_len))
    advice = (
        f"at most max_new_tokens={fitting_slots - prompt_width} fits with {batch} prompts"
        if fitting_slots > prompt_width
        else "generate fewer prompts at once"
    )
    L, B, S, K, H = kv_cache_shape(cfg, batch, max_len)
    raise ValueError(
        f"{SETTING}={max_new_tokens} needs a KV cache of {format_bytes(needed)} ({needed} bytes) "
        f"per device (k and v, global shape [layers={L}, rows={B}, slots={S}, kv_heads={K}, "
        f"head_dim={H}] in {np.dtype(dtype).name}), more than the {format_bytes(free_bytes)} "
        f"{where}; {advice}"
    )
