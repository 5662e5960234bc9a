"""Sharded training on 8 simulated CPU devices: the numbers of one device, the bytes of the plan.

Tolerances: loss and every gradient entry within 1e-5 absolute of the single-device run (fp32; a
different reduction order over 8 devices moves the last bits). Per-device parameter bytes are
exact: the plan and the placement use the same `logical_to_spec`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flux_jax import optim
from flux_jax import sharding as sh
from flux_jax import train_step as ts
from flux_jax.memory_plan import memory_plan
from flux_jax.model_setup import shard_params_like, split_model
from flux_jax.models.qwen.model import build_model
from flux_jax.models.qwen.presets import PRESETS
from flux_jax.sharding_check import ShardingError, check_sharding
from tests.train_fixtures import TINY, random_pair_batch

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
NUM_PAIRS, LENGTH, CHUNK = 8, 20, 8
# Halves the CPU compile time of each step; the partitioning (what these tests check) is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _perturbed(params, seed=1, scale=0.02):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def _loss_and_grads(graphdef, params, batch, ref_params):
    settings = ts.DPOSettings(logprob_chunk_size=CHUNK)

    def fn(p, b, r):
        loss_fn = lambda p_, b_: ts.dpo_loss_fn(  # noqa: E731
            p_, b_, graphdef=graphdef, ref_params=r, settings=settings
        )
        return jax.value_and_grad(loss_fn, has_aux=True)(p, b)

    compiled = jax.jit(fn).lower(params, batch, ref_params).compile(FAST_COMPILE)
    (loss, _), grads = compiled(params, batch, ref_params)
    return float(loss), jax.tree.map(np.asarray, grads)


@pytest.fixture(scope="module")
def single_device():
    """Host copies of the policy and reference, and the one-device loss and gradients."""
    graphdef, ref_params = split_model(build_model(TINY, seed=0))
    params = _perturbed(ref_params)
    host_batch = random_pair_batch(NUM_PAIRS, LENGTH, seed=3)
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
    loss, grads = _loss_and_grads(graphdef, params, batch, ref_params)
    host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    return host(params), host(ref_params), host_batch, loss, grads


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "data{}-fsdp{}-tensor{}".format(*s))
def test_sharded_step_matches_single_device_and_plan(single_device, mesh_shape):
    host_params, host_ref, host_batch, want_loss, want_grads = single_device
    mesh = sh.make_mesh(*mesh_shape)
    # The model as the trainer builds it on a mesh: activations pinned to data x fsdp.
    graphdef, _ = nnx.split(
        build_model(TINY, abstract=True, activation_sharding=sh.batch_sharding(mesh))
    )
    params = shard_params_like(host_params, mesh)
    ref_params = shard_params_like(host_ref, mesh)
    batch = sh.shard_batch(host_batch, mesh)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == dict(zip(sh.MESH_AXES, (*mesh_shape, 1), strict=True))

    loss, grads = _loss_and_grads(graphdef, params, batch, ref_params)
    worst = max(
        float(np.max(np.abs(g - w)))
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True)
    )
    print(f"{mesh_shape}: loss {loss:.7f} vs {want_loss:.7f}; max |grad diff| {worst:.1e}")
    assert abs(loss - want_loss) < 1e-5
    assert worst < 1e-5

    tx = optim.make_optimizer(learning_rate=1e-3, num_steps=10)
    state = ts.init_train_state(params, tx)
    report = check_sharding(state, mesh, reference=ref_params)
    plan = memory_plan(
        TINY,
        mesh_shape=mesh_shape,
        batch_size=NUM_PAIRS,
        max_length=LENGTH,
        logprob_chunk_size=CHUNK,
        compute_dtype="float32",
    )["per_device"]
    print(report)
    assert report.device_bytes("params") == plan["params"]
    assert report.device_bytes("reference") == plan["reference"]
    # optax's two step counters (int32, replicated) are the only optimiser bytes not in the plan.
    assert report.device_bytes("opt_state") == plan["optimizer"] + 2 * 4


def test_replicated_state_is_refused():
    mesh = sh.make_mesh(1, 8, 1)
    _, host_params = split_model(build_model(TINY, seed=0))
    good = shard_params_like(host_params, mesh)
    bad = jax.device_put(host_params, sh.replicated(mesh))
    # TINY is 95 KiB: with no absolute slack, only the proportional check is left.
    assert check_sharding(good, mesh, slack_bytes=0).ok
    with pytest.raises(ShardingError) as info:
        check_sharding(bad, mesh, slack_bytes=0)
    message = str(info.value)
    assert "TOO BIG" in message and "P()" in message
    assert (
        info.value.report.device_bytes("params")
        == 8 * info.value.report.categories["params"].ideal_bytes
    )

    # The default slack only forgives noise: a replicated 42M-parameter model is refused
    # (abstract arrays, so nothing is allocated).
    abstract = nnx.state(build_model(PRESETS["qwen3-40m"], abstract=True), nnx.Param)
    shardings = sh.state_shardings(abstract, mesh)
    sharded = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(abstract),
        nnx.to_pure_dict(shardings),
    )
    replicated = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh.replicated(mesh)), sharded
    )
    assert check_sharding(sharded, mesh).ok
    with pytest.raises(ShardingError):
        check_sharding(replicated, mesh)


def test_unsharded_optimiser_state_is_refused():
    """What `jax.jit(tx.init)` alone does: moments on one device, caught by the check."""
    mesh = sh.make_mesh(1, 8, 1)
    _, host_params = split_model(build_model(TINY, seed=0))
    params = shard_params_like(host_params, mesh)
    tx = optim.make_optimizer(learning_rate=1e-3, num_steps=10)
    naive = {"params": params, "opt_state": jax.jit(tx.init)(params)}
    with pytest.raises(ShardingError, match="opt_state"):
        check_sharding(naive, mesh, slack_bytes=0)
    state = ts.init_train_state(params, tx)
    mu = state["opt_state"][1][0].mu["layers"]["mlp"]["up_proj"]["kernel"]
    assert mu.sharding == params["layers"]["mlp"]["up_proj"]["kernel"].sharding
    assert state["step"].sharding.is_fully_replicated and len(state["step"].devices()) == 8


def test_shard_params_like_places_casts_and_copies():
    mesh = sh.make_mesh(2, 2, 2)
    model = build_model(TINY, seed=0)
    graphdef, host_params = split_model(model)
    want = nnx.to_pure_dict(sh.state_shardings(nnx.state(model, nnx.Param), mesh))
    numpy_params = jax.tree.map(np.asarray, host_params)
    placed = shard_params_like(numpy_params, mesh)
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, placed, want))
    ref = shard_params_like(placed, mesh, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(ref)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, ref, want))
    same = shard_params_like(placed, mesh)
    copied = shard_params_like(placed, mesh, copy=True)
    leaves = zip(*map(jax.tree.leaves, (placed, same, copied)), strict=True)
    for a, b, c in leaves:
        assert b is a and c is not a
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
    with pytest.raises(ValueError, match="Qwen parameter dict"):
        shard_params_like({"w": np.zeros(3)}, mesh)


def test_mesh_from_config():
    from flux_jax.config import FluxConfig

    config = FluxConfig.default()

    def shape(mesh_cfg):
        return tuple(sh.mesh_from_config(mesh_cfg).shape.values())  # data, fsdp, tensor, expert

    assert shape(config.mesh) == (1, 8, 1, 1)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, -1, 2
    assert shape(config.mesh) == (2, 2, 2, 1)
    mesh = sh.mesh_from_config({"data": -1, "fsdp": 2}, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1, "expert": 1}
    config.mesh.data, config.mesh.tensor, config.mesh.expert = 1, 1, 4
    assert shape(config.mesh) == (1, 2, 1, 4)
    with pytest.raises(ValueError, match="8 devices"):
        sh.mesh_from_config({"data": 3, "fsdp": 1, "tensor": 1})


def test_batch_multiple_and_weight_shard_factor_of_a_mesh_or_its_shape():
    mesh = sh.make_mesh(2, 2, 2)
    assert sh.batch_multiple(mesh) == 4 == sh.batch_multiple({"data": 2, "fsdp": 2, "tensor": 2})
    assert sh.batch_multiple(sh.make_mesh(1, 8, 1)) == 8
    assert sh.batch_multiple({"data": 8, "fsdp": 1, "tensor": 1}) == 8
    assert sh.weight_shard_factor(mesh) == 4 == sh.weight_shard_factor(dict(mesh.shape))
    assert sh.weight_shard_factor({"data": 8, "fsdp": 1, "tensor": 1}) == 1
    # `expert` splits the batch like a data axis; only the expert kernels are split over it.
    expert = sh.make_mesh(1, 2, 1, expert=4)
    assert sh.batch_multiple(expert) == 8 and sh.weight_shard_factor(expert) == 2
    # The batch splits as batch_sharding places it: one block per data x fsdp device group.
    host = {"x": np.arange(8 * 3).reshape(8, 3)}
    x = sh.shard_batch(host, mesh)["x"]
    assert x.sharding == sh.batch_sharding(mesh)
    assert x.addressable_shards[0].data.shape == (8 // sh.batch_multiple(mesh), 3)


def test_logical_sharding_is_the_spec_on_the_mesh():
    mesh = sh.make_mesh(1, 2, 4)
    got = sh.logical_sharding(mesh, ("embed", "vocab"), (64, 512))
    assert got == NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    # A dimension that does not divide stays whole.
    uneven = sh.logical_sharding(mesh, ("embed", "vocab"), (63, 510))
    assert uneven.spec == PartitionSpec(None, None)


def test_moved_names_stay_importable_from_sharding():
    """check_sharding & co. moved to sharding_check / model_setup; old imports still work."""
    import flux_jax.model_setup
    import flux_jax.sharding_check

    assert sh.check_sharding is check_sharding
    assert sh.ShardingError is ShardingError
    assert sh.shard_params_like is flux_jax.model_setup.shard_params_like
    assert sh.ShardingReport is flux_jax.sharding_check.ShardingReport
    with pytest.raises(AttributeError, match="no_such_name"):
        sh.no_such_name  # noqa: B018
