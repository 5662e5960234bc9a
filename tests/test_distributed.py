"""Multi-process start-up: the launch rules, and a real 2-process x 4-device run on this machine.

The run: the parent saves a seeded TINY model as an HF checkpoint; two processes (4 CPU devices
each, gloo collectives) start JAX's distributed runtime through `initialize_distributed` from the
JAX_* environment variables, load the checkpoint onto a (data 1, fsdp 4, tensor 2) mesh that spans
both (the fsdp axis crosses the process boundary), and train 3 steps, each process feeding its
half of every global batch. The losses and the
final parameters must match this process's own 8-device run within 1e-5, and each process must
have read only about half of the checkpoint (the blocks its devices hold).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from flux_jax.distributed import Launch, detect_launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = (1, 4, 2)
STEPS, PAIRS, LENGTH = 3, 8, 20
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# ---------------------------------------------------------------------------------------------
# The launch rules (pure: no runtime is started)


def test_single_process_environments_start_nothing():
    assert detect_launch({}) is None
    assert detect_launch({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    # sbatch's own shell (no srun step) is one process even if the job has several tasks.
    assert detect_launch({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}) is None
    assert detect_launch({"TPU_WORKER_HOSTNAMES": "t1v-0"}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
    assert detect_launch(env) is None


def test_explicit_environment_launch():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "2",
        "SLURM_NTASKS": "4",  # explicit settings win over the scheduler's
        "SLURM_PROCID": "2",
        "SLURM_STEP_NODELIST": "n[1-4]",
    }
    launch = detect_launch(env)
    assert launch == Launch(
        "env",
        {
            "coordinator_address": "10.0.0.1:1234",
            "num_processes": 4,
            "process_id": 2,
            "local_device_ids": None,
            "cluster_detection_method": "deactivate",
        },
    )
    assert detect_launch(env, process_id=3).kwargs["process_id"] == 3
    assert detect_launch({**env, "FLUX_JAX_DISTRIBUTED": "0"}) is None
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        detect_launch({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        detect_launch({"JAX_NUM_PROCESSES": "two"})


def test_slurm_launch():
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "1"}
    # One task per node: every GPU of the node stays visible to its one process.
    per_node = {**step, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    launch = detect_launch(per_node)
    assert launch.launcher == "slurm"
    assert launch.kwargs == {
        "cluster_detection_method": "slurm",
        "local_device_ids": list(range(8)),
    }
    with_cuda = {**per_node, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    del with_cuda["SLURM_GPUS_ON_NODE"]
    assert detect_launch(with_cuda).kwargs["local_device_ids"] == [0, 1, 2, 3]
    # One task per GPU: JAX's own rule (device SLURM_LOCALID) is right; pass the coordinator.
    per_gpu = {**step, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_NODES": "2"}
    per_gpu["JAX_COORDINATOR_ADDRESS"] = "gpu01:5555"
    assert detect_launch(per_gpu).kwargs == {
        "cluster_detection_method": "slurm",
        "coordinator_address": "gpu01:5555",
    }


def test_tpu_pod_launch():
    assert detect_launch({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == Launch("auto", {})
    assert detect_launch({"TPU_PROCESS_ADDRESSES": "a:1,b:1"}).launcher == "auto"
    assert detect_launch({"MEGASCALE_COORDINATOR_ADDRESS": "w0"}).launcher == "auto"
    assert detect_launch({"MEGASCALE_NUM_SLICES": "2"}).launcher == "auto"
    assert detect_launch({"FLUX_JAX_DISTRIBUTED": "1"}).launcher == "auto"


def test_initialize_is_a_noop_for_one_process():
    from flux_jax.distributed import initialize_distributed, is_main_process

    first = initialize_distributed()
    assert first.startswith("process 0 of 1 (single process): 8 local / 8 global cpu devices")
    assert initialize_distributed() == first
    assert is_main_process()


# ---------------------------------------------------------------------------------------------
# The 2-process run


def _train(ckpt_dir: str) -> dict:
    """Loads the checkpoint onto the MESH over all devices (of all processes) and trains STEPS."""
    import jax

    from flux_jax import hf_io, optim
    from flux_jax import sharding as sh
    from flux_jax import train_step as ts
    from flux_jax.model_setup import shard_params_like, split_model
    from flux_jax.sharding_check import check_sharding
    from tests.train_fixtures import random_pair_batch

    bytes_read = [0]
    read = hf_io.SafetensorsCheckpoint.read

    def counting_read(self, key, index=None):
        block = read(self, key, index)
        bytes_read[0] += block.nbytes
        return block

    hf_io.SafetensorsCheckpoint.read = counting_read
    try:
        mesh = sh.make_mesh(*MESH)
        model = hf_io.load_pretrained(ckpt_dir, mesh=mesh)
    finally:
        hf_io.SafetensorsCheckpoint.read = read
    graphdef, params = split_model(model)
    ref_params = shard_params_like(params, mesh, copy=True)
    tx = optim.make_optimizer(learning_rate=1e-2, num_steps=STEPS)
    schedule = optim.make_schedule(learning_rate=1e-2, num_steps=STEPS)
    state = ts.init_train_state(params, tx)
    report = check_sharding(state, mesh, reference=ref_params)
    step = ts.make_train_step(
        graphdef,
        tx,
        schedule,
        ts.DPOSettings(logprob_chunk_size=None),
        state_shardings=sh.state_shardings_of(state),
    )
    # This process's rows of each global batch: the blocks its devices hold, in order.
    blocks = sh.batch_sharding(mesh).addressable_devices_indices_map((PAIRS,))
    starts = sorted({idx[0].indices(PAIRS)[0] for idx in blocks.values()})
    stops = sorted({idx[0].indices(PAIRS)[1] for idx in blocks.values()})
    rows = slice(starts[0], stops[-1])
    batches = []
    for seed in range(STEPS):
        global_batch = random_pair_batch(PAIRS, LENGTH, seed=seed)
        batches.append(sh.shard_batch({k: v[rows] for k, v in global_batch.items()}, mesh))
    # Compiled once, up front, with cheaper CPU code generation (the partitioning is the same).
    step = step.lower(state, batches[0], ref_params).compile(FAST_COMPILE)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch, ref_params)
        losses.append(float(metrics["loss"]))
    after = check_sharding(state, mesh, reference=ref_params)  # the step kept the layout
    assert after.device_bytes("opt_state") == report.device_bytes("opt_state")
    squares = jax.jit(lambda p: sum((x.astype("float32") ** 2).sum() for x in jax.tree.leaves(p)))
    return {
        "losses": losses,
        "params_sq_norm": float(squares(state["params"])),
        "bytes_read": bytes_read[0],
        "rows": [rows.start, rows.stop],
        "params_bytes_per_device": report.device_bytes("params"),
        "opt_bytes_per_device": report.device_bytes("opt_state"),
        "steps": int(state["step"]),
    }


def _worker(ckpt_dir: str, out_path: str) -> None:
    """One process of the 2-process run (started by the test below)."""
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from flux_jax.distributed import initialize_distributed

    description = initialize_distributed()
    result = _train(ckpt_dir)
    result["description"] = description
    result["again"] = initialize_distributed()
    with open(out_path, "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from flux_jax.hf_io import save_pretrained
    from flux_jax.models.qwen.model import build_model
    from tests.train_fixtures import TINY

    path = tmp_path_factory.mktemp("tiny_ckpt")
    save_pretrained(build_model(TINY, seed=0), path)
    return str(path)


@pytest.mark.slow  # ~23 s; test_run_safety's multi-process test runs by default
def test_two_processes_match_one(tiny_checkpoint, tmp_path):
    port = _free_port()
    procs, outs = [], []
    for i in range(2):
        out = tmp_path / f"process{i}.json"
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
            "PYTHONPATH": REPO,
        }
        code = f"from tests.test_distributed import _worker; _worker({tiny_checkpoint!r}, '{out}')"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        outs.append(out)
    start = time.time()
    # The single-process reference on this process's 8 devices, while the workers run.
    want = _train(tiny_checkpoint)
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(10, 240 - (time.time() - start)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-process run did not finish in 240 s")
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    got = [json.loads(out.read_text()) for out in outs]

    print(f"1 process x 8 devices: {want}")
    for i, g in enumerate(got):
        print(f"process {i}: {g}")
        assert g["description"].startswith(f"process {i} of 2 (env launch, coordinator 127.0.0.1")
        assert g["description"].endswith("4 local / 8 global cpu devices")
        assert "already initialised" in g["again"]
        assert g["steps"] == STEPS
        np.testing.assert_allclose(g["losses"], want["losses"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(g["params_sq_norm"], want["params_sq_norm"], rtol=1e-5)
        assert g["params_bytes_per_device"] == want["params_bytes_per_device"]
        assert g["opt_bytes_per_device"] == want["opt_bytes_per_device"]
    assert [g["rows"] for g in got] == [[0, PAIRS // 2], [PAIRS // 2, PAIRS]]
    assert want["losses"][0] == pytest.approx(np.log(2.0), abs=1e-6)  # policy == reference
    assert abs(want["losses"][-1] - want["losses"][0]) > 1e-4  # and then it trained

    # Reading: a process reads each distinct block its devices hold once (devices holding
    # replicas share the read), so one process reads the checkpoint exactly once, and each of
    # two processes splitting fsdp reads half of it (plus the small q/k norms both need).
    from flux_jax.hf_io import SafetensorsCheckpoint

    shapes = SafetensorsCheckpoint(tiny_checkpoint).shape_of.values()
    total = sum(4 * int(np.prod(shape)) for shape in shapes)
    assert want["bytes_read"] == total
    for g in got:
        assert total / 2 <= g["bytes_read"] <= 0.52 * total
