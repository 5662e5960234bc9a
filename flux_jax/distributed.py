"""Multi-process start-up: `jax.distributed.initialize()` when, and only when, the job has several.

One call, `initialize_distributed()`, at the top of every entry point (before anything touches a
device) works unchanged on a laptop, a TPU pod slice and a SLURM GPU cluster. How the job is
recognised, first match wins:

  FLUX_JAX_DISTRIBUTED=0          never initialise (debugging one host of a pod, say)
  explicit arguments, or JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID
                                  a hand-rolled launch (any platform, CPU tests included);
                                  JAX_NUM_PROCESSES=1 means a single process
  SLURM_NTASKS > 1 inside an srun step (SLURM_STEP_NODELIST set)
                                  JAX's SLURM detection (coordinator = first node of the step,
                                  unless JAX_COORDINATOR_ADDRESS says otherwise). With one task
                                  per node, every GPU of the node is kept visible (JAX would
                                  otherwise give each task only the GPU numbered SLURM_LOCALID)
  TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing > 1 host, MEGASCALE_COORDINATOR_ADDRESS,
  MEGASCALE_NUM_SLICES > 1, or FLUX_JAX_DISTRIBUTED=1
                                  JAX's own cluster detection (Cloud TPU metadata, GKE env vars);
                                  tools/launch_tpu_pod.sh sets FLUX_JAX_DISTRIBUTED=1
  anything else                   a single process: nothing to do

Calling it again is a no-op, so library code may call it defensively.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

log = logging.getLogger(__name__)

ENV_SWITCH = "FLUX_JAX_DISTRIBUTED"
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on", "auto")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How to call `jax.distributed.initialize`: which launcher was recognised, and its kwargs."""

    launcher: str  # "env", "slurm" or "auto"
    kwargs: dict[str, Any]


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _hosts(value: str | None) -> int:
    return len([h for h in (value or "").split(",") if h.strip()])


def _local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    value = env.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    return [int(x) for x in value.split(",")] if value else None


def detect_launch(
    env: Mapping[str, str] | None = None,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Launch | None:
    """The multi-process launch this environment describes, or None for a single process.

    Pure (reads only `env`, default os.environ), so every rule in the module docstring is
    testable without starting anything.
    """
    env = os.environ if env is None else env
    switch = env.get(ENV_SWITCH, "").strip().lower()
    if switch in _OFF:
        return None

    coordinator = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _int(env, "JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _int(env, "JAX_PROCESS_ID")
    if count is not None or index is not None:
        if count is None or index is None or coordinator is None:
            raise ValueError(
                "an explicit multi-process launch needs all three of JAX_COORDINATOR_ADDRESS "
                f"(host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID; got {coordinator!r}, "
                f"{count!r}, {index!r}"
            )
        if count == 1:
            return None
        return Launch(
            "env",
            {
                "coordinator_address": coordinator,
                "num_processes": count,
                "process_id": index,
                "local_device_ids": _local_device_ids(env),
                # Skip JAX's cluster detection: under SLURM it would also restrict each process
                # to one GPU, which is wrong for the one-process-per-node layout.
                "cluster_detection_method": "deactivate",
            },
        )

    tasks = _int(env, "SLURM_NTASKS") or _int(env, "SLURM_NPROCS")
    if tasks and tasks > 1 and env.get("SLURM_STEP_NODELIST") and "SLURM_PROCID" in env:
        kwargs: dict[str, Any] = {"cluster_detection_method": "slurm"}
        if coordinator:
            kwargs["coordinator_address"] = coordinator
        local_ids = _local_device_ids(env)
        nodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_NNODES") or 1
        if local_ids is None and tasks == nodes:  # one task per node: keep all its GPUs
            gpus = _int(env, "SLURM_GPUS_ON_NODE") or _hosts(env.get("CUDA_VISIBLE_DEVICES"))
            if gpus:
                local_ids = list(range(gpus))
        if local_ids is not None:
            kwargs["local_device_ids"] = local_ids
        return Launch("slurm", kwargs)

    tpu_hosts = max(
        _hosts(env.get("TPU_WORKER_HOSTNAMES")), _hosts(env.get("TPU_PROCESS_ADDRESSES"))
    )
    slices = _int(env, "MEGASCALE_NUM_SLICES") or 1
    if switch in _ON or tpu_hosts > 1 or slices > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return Launch("auto", {"coordinator_address": coordinator} if coordinator else {})
    return None


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> str:
    """Starts JAX's distributed runtime if this is a multi-process job; returns a line for logs.

    Must run before the first device use (jax.devices(), any array). Idempotent: a second call,
    or a call after the runtime was started elsewhere, only describes it.
    """
    if jax.distributed.is_initialized():
        return describe_processes("already initialised")
    launch = detect_launch(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    if launch is None:
        return describe_processes("single process")
    kwargs = {k: v for k, v in launch.kwargs.items() if v is not None}
    log.info("jax.distributed.initialize(%s) [%s launch]", kwargs, launch.launcher)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                f"a {launch.launcher} multi-process launch was detected, but JAX already used a "
                "device in this process: call flux_jax.distributed.initialize_distributed() "
                "before anything touches jax.devices() or creates an array"
            ) from e
        raise
    where = kwargs.get("coordinator_address", "chosen by JAX")
    description = describe_processes(f"{launch.launcher} launch, coordinator {where}")
    log.info("%s", description)
    return description


def describe_processes(how: str = "") -> str:
    """E.g. 'process 0 of 2 (env launch, coordinator 10.0.0.1:1234): 4 local / 8 global gpu
    devices'. Touches the devices, so call it only once the launch is settled."""
    devices = jax.devices()
    platform = devices[0].platform if devices else "no"
    return (
        f"process {jax.process_index()} of {jax.process_count()}"
        + (f" ({how})" if how else "")
        + f": {jax.local_device_count()} local / {jax.device_count()} global {platform} devices"
    )


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, checkpoints' metadata and exports."""
    return jax.process_index() == 0
