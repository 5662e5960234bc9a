"""The memory plan as text: a per-device table and a fits / does NOT fit verdict for a device.

`memory_plan.memory_plan` computes the numbers; this module only judges and prints them.
"""

from __future__ import annotations

from typing import Any

from flux_jax.devices import GIB, device_memory
from flux_jax.sharding import format_bytes

USABLE_FRACTION = 0.9  # the rest is XLA's scratch buffers and fragmentation


def fits(plan: dict[str, Any], device_memory_bytes: float) -> bool:
    """Whether the plan's total leaves USABLE_FRACTION of the device's memory unused by it."""
    return plan["per_device"]["total"] <= USABLE_FRACTION * device_memory_bytes


def format_memory_plan(
    plan: dict[str, Any], device_memory_gb: float | None = None, *, device: str | None = None
) -> str:
    """The plan as a table, with a fits verdict for `device` (a KNOWN_DEVICES name) or for
    `device_memory_gb` GiB per device."""
    m, b, s, per = plan["model"], plan["batch"], plan["settings"], plan["per_device"]
    mesh = plan["mesh"]
    lines = [
        f"model: {m.get('model_path', m['model_type'])} ({m['num_params'] / 1e9:.3f}B params, "
        f"{m['layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}"
        f"{', tied' if m['tied_embeddings'] else ''})",
        f"mesh: data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']} "
        f"expert={mesh.get('expert', 1)} ({mesh['devices']} devices)",
        f"batch: {b['batch_size']} pairs/step, {b['grad_accum_steps']} micro-batch(es) of "
        f"{b['micro_batch']}; {b['rows_per_device']:g} rows x {b['max_length']} tokens per device",
        f"dtypes: params {s['param_dtype']}, compute {s['compute_dtype']}; remat {s['remat']}; "
        f"logprob chunk {s['logprob_chunk_size']}; reference {s['reference']}",
    ]
    if s.get("lora"):
        lines.append(f"{s['lora']} (params = the adapters; reference = the base, adapters off)")
    lines.append("per device:")
    for key in ("base", "params", "gradients", "optimizer", "reference", "activations"):
        if key in per:  # "base": LoRA's frozen base
            lines.append(f"  {key:<12} {format_bytes(per[key]):>12}")
    for key, value in plan["activation_terms"].items():
        lines.append(f"    {key:<22} {format_bytes(value):>12}")
    lines.append(f"  {'total':<12} {format_bytes(per['total']):>12}")
    memory = None
    if device is not None:
        name, memory = device_memory(device)
    elif device_memory_gb is not None:
        name, memory = f"{device_memory_gb:g} GiB device", device_memory_gb * GIB
    if memory is not None:
        verdict = "fits" if fits(plan, memory) else "does NOT fit"
        lines.append(
            f"{name}: {format_bytes(memory)} per device -> {verdict} "
            f"({per['total'] / memory:.0%} of memory; limit {USABLE_FRACTION:.0%})"
        )
    for warning in plan["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
