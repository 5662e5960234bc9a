"""Devices: how much memory an accelerator has by name, and N fake CPU devices for the tools.

Names are case- and spacing-insensitive ("h100", "TPU v5p", "A100-40GB"); the memory is the
nominal HBM per chip as vendors quote it, in GiB, as `flux-jax plan --device` takes it.
"""

from __future__ import annotations

import os

GIB = 1 << 30

# Nominal memory per chip (HBM), in GiB as the vendors quote it.
KNOWN_DEVICES: dict[str, tuple[str, float]] = {
    "v4": ("TPU v4", 32),
    "v5e": ("TPU v5e", 16),
    "v5p": ("TPU v5p", 95),
    "v6e": ("TPU v6e (Trillium)", 32),
    "a100-40gb": ("NVIDIA A100 40GB", 40),
    "a100-80gb": ("NVIDIA A100 80GB", 80),
    "h100": ("NVIDIA H100 80GB", 80),
    "h200": ("NVIDIA H200", 141),
    # 24 GB cards: the single-GPU QLoRA target (flux-jax plan --device l4).
    "l4": ("NVIDIA L4 24GB", 24),
    "a10g": ("NVIDIA A10G 24GB", 24),
    "rtx4090": ("NVIDIA GeForce RTX 4090 24GB", 24),
}
_ALIASES = {
    "a100": "a100-80gb",
    "a100-40": "a100-40gb",
    "a100-80": "a100-80gb",
    "v5litepod": "v5e",
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
}


def device_memory(device: str) -> tuple[str, int]:
    """(description, bytes) of a KNOWN_DEVICES name: "h100", "v5e", "TPU v5p", "A100-40GB", ..."""
    key = device.strip().lower().replace(" ", "-").removeprefix("tpu-").removeprefix("nvidia-")
    key = _ALIASES.get(key, key)
    if key not in KNOWN_DEVICES:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(KNOWN_DEVICES)}")
    name, gib = KNOWN_DEVICES[key]
    return name, int(gib * GIB)


def fake_cpu_devices(count: int) -> None:
    """Makes JAX's CPU backend show `count` devices (a mesh to try sharding on without chips);
    0 leaves the devices as they are (the tools' --cpu-devices default).

    XLA reads the flag when JAX first starts a backend: call this before anything touches
    `jax.devices()`; later calls have no effect on this process.
    """
    if not count:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
