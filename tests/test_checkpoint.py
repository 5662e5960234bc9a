"""Checkpoints: round trips of the train state and data position, rotation with `best` apart,
shape mismatches named, crash safety, restore onto another mesh, and the SIGTERM flag."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flux_jax import best_checkpoint, preemption
from flux_jax import checkpoint as ckpt
from flux_jax.data import make_preference_iterator
from flux_jax.models.qwen.model import build_model
from flux_jax.optim import make_optimizer
from flux_jax.sharding import make_mesh, state_shardings
from flux_jax.tiny_tokenizer import build_tiny_tokenizer
from tests.train_fixtures import TINY

REPO = Path(__file__).resolve().parents[1]
TX = make_optimizer(learning_rate=1e-3, num_steps=10)


# -- builders -----------------------------------------------------------------------------------


def abstract_train_state(config, mesh) -> dict:
    """The train state's ShapeDtypeStructs with shardings over `mesh`: parameters by their
    logical axes, the optimiser's parameter-shaped moments alike, its counters replicated."""
    abstract_model = build_model(config, abstract=True)
    shardings = nnx.to_pure_dict(state_shardings(nnx.state(abstract_model, nnx.Param), mesh))
    shapes = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))

    def sds(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.tree.map(sds, shapes, shardings)
    opt_state = optax.tree_utils.tree_map_params(
        TX,
        sds,
        jax.eval_shape(TX.init, shapes),
        shardings,
        transform_non_params=lambda x: sds(x, replicated),
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return {"step": step, "params": params, "opt_state": opt_state}


def make_train_state(config, mesh, *, seed: int = 0, step: int = 7) -> dict:
    """A state with random values in every leaf (moments and counters too), laid out over
    `mesh`; built on the host, so no model or optimiser code is compiled."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            value = rng.integers(1, 1000, x.shape)
        else:
            value = rng.standard_normal(x.shape)
        return jax.device_put(np.asarray(value, x.dtype), x.sharding)

    state = jax.tree.map(fill, abstract_train_state(config, mesh))
    state["step"] = jax.device_put(np.int32(step), state["step"].sharding)
    return state


def to_host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(fsdp=8)


@pytest.fixture(scope="module")
def state8(mesh8):
    return make_train_state(TINY, mesh8)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    records = [
        {
            "prompt": f"q{i:02d}",
            "chosen": f"Sure, answer {i}." + " more" * (i % 5),
            "rejected": "no",
        }
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_iterator(data_path, tokenizer):
    iterator, _ = make_preference_iterator(
        data_path,
        tokenizer,
        data_format="preferences",
        batch_size=4,
        max_length=32,
        max_prompt_length=8,
        seed=0,
        bucket_lengths=(16, 32),
    )
    return iterator


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# -- tests --------------------------------------------------------------------------------------


def test_round_trip_restores_state_and_data_position(tmp_path, mesh8, state8, data_path, tokenizer):
    state = make_train_state(TINY, mesh8, seed=3)  # its own copy: we delete its buffers below
    expected_state = to_host(state)
    abstract = ckpt.abstract_of(state)
    iterator = make_iterator(data_path, tokenizer)
    take(iterator, 3)
    meta = {"hf_config": TINY.to_hf_config(), "model_path": "tiny"}

    checkpointer = ckpt.TrainCheckpointer(tmp_path / "ckpt", save_interval_steps=7, async_save=True)
    assert checkpointer.save(7, state, data_iterator=iterator, metadata=meta)
    # Training goes on while the save is written: the step donates the state and the iterator
    # moves. Neither may leak into the checkpoint.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    expected_batches = take(iterator, 5)  # crosses the epoch boundary (6 batches per epoch)
    checkpointer.close()

    reopened = ckpt.TrainCheckpointer(tmp_path / "ckpt", save_interval_steps=7)
    assert reopened.latest_step() == 7 and reopened.all_steps() == [7]
    fresh_iterator = make_iterator(data_path, tokenizer)
    restored = reopened.restore(abstract_state=abstract, data_iterator=fresh_iterator)
    assert_trees_equal(to_host(restored), expected_state)
    for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True):
        assert leaf.sharding == target.sharding
    for got, want in zip(take(fresh_iterator, 5), expected_batches, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])

    saved_meta = ckpt.read_metadata(reopened.step_dir(7))
    assert saved_meta["step"] == 7 and saved_meta["model_path"] == "tiny"
    assert saved_meta["hf_config"] == json.loads(json.dumps(TINY.to_hf_config()))
    assert saved_meta["wall_time"] > 0
    params = best_checkpoint.load_params(reopened.step_dir(7), abstract["params"])
    assert_trees_equal(to_host(params), expected_state["params"])
    reopened.close()


def test_saves_on_the_interval_or_when_forced_and_never_twice(tmp_path, state8):
    with ckpt.TrainCheckpointer(tmp_path, save_interval_steps=10, async_save=False) as checkpointer:
        assert not checkpointer.save(5, state8)
        assert checkpointer.save(10, state8)
        assert not checkpointer.save(10, state8, force=True)  # already there
        assert checkpointer.save(13, state8, force=True)  # e.g. the final or a SIGTERM save
        assert checkpointer.all_steps() == [10, 13]


def test_rotation_keeps_the_last_k_and_best_apart(tmp_path, state8):
    def scaled(k):
        return {**state8, "params": jax.tree.map(lambda p: p * k, state8["params"])}

    abstract_params = ckpt.abstract_of(state8["params"])
    best = tmp_path / "best"
    meta = {"hf_config": TINY.to_hf_config(), "model_path": "m", "tokenizer_path": "t"}
    with ckpt.TrainCheckpointer(
        tmp_path / "checkpoints", max_to_keep=2, save_interval_steps=1, async_save=True
    ) as checkpointer:
        for step in (1, 2, 3, 4, 5):
            checkpointer.save(step, scaled(step))
            if step in (2, 3):
                best_checkpoint.save_best(
                    best,
                    step,
                    scaled(step)["params"],
                    metric_name="eval_loss",
                    metric_value=1.0 / step,
                    metadata=meta,
                )
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [4, 5]

    assert sorted(os.listdir(tmp_path)) == ["best", "checkpoints"]  # no staging or old copies
    info = ckpt.read_metadata(best)
    assert (info["step"], info["metric_name"], info["metric_value"]) == (3, "eval_loss", 1 / 3)
    assert (info["model_path"], info["tokenizer_path"]) == ("m", "t")
    assert info["hf_config"]["hidden_size"] == TINY.hidden_size
    assert_trees_equal(
        to_host(best_checkpoint.load_params(best, abstract_params)), to_host(scaled(3)["params"])
    )


def test_an_interrupted_best_swap_is_repaired(tmp_path, state8):
    best = tmp_path / "best"
    params = state8["params"]
    best_checkpoint.save_best(best, 1, params, metric_name="loss", metric_value=2.0)
    # A crash between the swap's two renames: the previous best is at best.old, and a
    # half-written staging directory lies beside it.
    os.rename(best, str(best) + ".old")
    os.makedirs(str(best) + ".staging/params")
    assert ckpt.read_metadata(best)["step"] == 1
    best_checkpoint.save_best(best, 2, params, metric_name="loss", metric_value=1.0)
    assert ckpt.read_metadata(best)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["best"]


def test_a_different_model_shape_names_the_mismatched_parameters(tmp_path, mesh8, state8):
    with ckpt.TrainCheckpointer(tmp_path / "checkpoints", save_interval_steps=1) as checkpointer:
        checkpointer.save(1, state8)
    best_checkpoint.save_best(
        tmp_path / "best", 1, state8["params"], metric_name="loss", metric_value=1.0
    )

    # Wider MLP: three kernels change shape. Tied embeddings: no lm_head in the model.
    other = dataclasses.replace(TINY, intermediate_size=48, tie_word_embeddings=True)
    abstract = abstract_train_state(other, mesh8)
    with ckpt.TrainCheckpointer(tmp_path / "checkpoints") as checkpointer:
        with pytest.raises(ckpt.CheckpointMismatchError) as err:
            checkpointer.restore(abstract_state=abstract)
    message = str(err.value)
    assert "params/layers/mlp/gate_proj/kernel: (2, 32, 64) -> (2, 32, 48)" in message
    assert "opt_state/1/0/mu/layers/mlp/down_proj/kernel: (2, 64, 32) -> (2, 48, 32)" in message
    assert "params/lm_head/kernel (32, 89)" in message  # in the checkpoint, not in the model
    assert len(err.value.mismatched) == 9 and not err.value.missing  # 3 kernels x (p, mu, nu)
    assert len(err.value.extra) == 3

    for path in (tmp_path / "best", tmp_path / "checkpoints" / "1"):
        with pytest.raises(ckpt.CheckpointMismatchError) as err:
            best_checkpoint.load_params(path, abstract["params"])
        assert {p for p, _, _ in err.value.mismatched} == {
            f"layers/mlp/{name}/kernel" for name in ("gate_proj", "up_proj", "down_proj")
        }
        assert [e.split()[0] for e in err.value.extra] == ["lm_head/kernel"]


CRASHING_SAVE = """
import os, sys, time
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from flux_jax import checkpoint as ckpt

real_rename = atomicity.async_path.rename

async def rename_then_hang(src, dst):
    if os.path.basename(str(dst)) == "2":  # every file of step 2 is written; commit pending
        print("COMMITTING", flush=True)
        time.sleep(600)
    await real_rename(src, dst)

atomicity.async_path.rename = rename_then_hang
state = {"step": jnp.asarray(2), "w": jnp.full((1024, 1024), 2.0)}  # 4 MiB
checkpointer = ckpt.TrainCheckpointer(sys.argv[1], save_interval_steps=1, async_save=True)
checkpointer.save(2, state)
checkpointer.wait_until_finished()
"""


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    directory = tmp_path / "checkpoints"
    state = {"step": jnp.asarray(1), "w": jnp.full((1024, 1024), 1.0)}
    with ckpt.TrainCheckpointer(directory, save_interval_steps=1) as checkpointer:
        checkpointer.save(1, state)

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    stderr = tmp_path / "child_stderr.txt"
    with open(stderr, "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CRASHING_SAVE), str(directory)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    watchdog = threading.Timer(120, child.kill)  # never hang the suite on a stuck child
    watchdog.start()
    try:
        line = child.stdout.readline().strip()
        assert line == "COMMITTING", stderr.read_text()[-3000:]
        child.send_signal(signal.SIGKILL)  # the crash: every file written, commit pending
    finally:
        watchdog.cancel()
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    leftovers = [name for name in os.listdir(directory) if name not in ("1",)]
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers), leftovers

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ckpt.TrainCheckpointer(directory, save_interval_steps=1) as checkpointer:
        assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]
        restored = checkpointer.restore(
            abstract_state=ckpt.abstract_of(jax.device_put(state, device))
        )
        assert_trees_equal(to_host(restored), to_host(state))
        assert checkpointer.save(2, state)  # the step the crash lost can be saved again
    assert sorted(os.listdir(directory)) == ["1", "2"]  # the partial save was cleaned away


def test_restores_onto_a_smaller_mesh(tmp_path, state8):
    with ckpt.TrainCheckpointer(tmp_path / "checkpoints", save_interval_steps=1) as checkpointer:
        checkpointer.save(1, state8)
    best_checkpoint.save_best(
        tmp_path / "best", 1, state8["params"], metric_name="loss", metric_value=1.0
    )
    kernel = state8["params"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 8

    mesh4 = make_mesh(fsdp=4, devices=jax.devices()[:4])
    abstract = abstract_train_state(TINY, mesh4)
    with ckpt.TrainCheckpointer(tmp_path / "checkpoints") as checkpointer:
        restored = checkpointer.restore(abstract_state=abstract)
    params = best_checkpoint.load_params(tmp_path / "best", abstract["params"])

    assert_trees_equal(to_host(restored), to_host(state8))
    assert_trees_equal(to_host(params), to_host(state8["params"]))
    for got, want in (
        (restored, abstract),
        (params, abstract["params"]),
    ):
        for leaf, target in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert leaf.sharding.is_equivalent_to(target.sharding, leaf.ndim)
    kernel = params["layers"]["mlp"]["gate_proj"]["kernel"]  # [layers, embed, mlp]
    assert kernel.sharding.mesh == mesh4 and len(kernel.sharding.device_set) == 4
    assert kernel.addressable_shards[0].data.shape == (2, 8, 64)  # embed split 4 ways


def test_restore_needs_shardings_and_an_existing_step(tmp_path, state8):
    with ckpt.TrainCheckpointer(tmp_path, save_interval_steps=1) as checkpointer:
        with pytest.raises(FileNotFoundError):
            checkpointer.restore(abstract_state=ckpt.abstract_of(state8))
        checkpointer.save(1, state8)
        bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state8)
        with pytest.raises(ValueError, match="sharding"):
            checkpointer.restore(abstract_state=bare)
    with pytest.raises(FileNotFoundError, match="not a flux_jax checkpoint"):
        best_checkpoint.load_params(tmp_path, ckpt.abstract_of(state8["params"]))


def test_sigterm_sets_the_preemption_flag():
    previous = signal.getsignal(signal.SIGTERM)
    is_preempted = preemption.install_preemption_handler()
    try:
        assert not is_preempted()
        os.kill(os.getpid(), signal.SIGTERM)
        assert is_preempted() and is_preempted(step=12)
    finally:
        is_preempted.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous
