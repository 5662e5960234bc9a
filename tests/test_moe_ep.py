"""Expert parallelism (models/qwen/expert_parallel.py) on the 8 simulated CPU devices: a tiny
Qwen3-MoE's loss (logits plus the router load-balancing loss) and its gradients on an `expert`
mesh equal one device's, alone and combined with fsdp, tensor and data; the mesh check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax.model_setup import shard_params_like
from flux_jax.models.qwen import moe
from flux_jax.models.qwen.model import build_model
from flux_jax.sharding import batch_sharding, make_mesh
from tests.test_moe import numpy_model, tiny_moe_config

RTOL = 1e-5  # fp32; sums of a few hundred terms reduced in another order across devices


def _loss_fn(cfg, mesh, impl):
    """loss(params, ids) of a model on `mesh` (None: one device): a fixed random projection of
    the logits plus the aux loss, so every expert's output and the router reach the loss."""
    sharding = batch_sharding(mesh) if mesh is not None else None
    model = build_model(cfg, activation_sharding=sharding, moe_impl=impl)
    graphdef, _ = nnx.split(model)
    probe = jnp.asarray(np.random.default_rng(1).standard_normal(cfg.vocab_size), jnp.float32)

    def loss(params, ids):
        state = nnx.state(build_model(cfg, abstract=True))
        nnx.replace_by_pure_dict(state, params)
        m = nnx.merge(graphdef, state)
        logits, router_logits = m(ids, return_router_logits=True)
        aux = moe.load_balancing_loss(router_logits, cfg.num_experts_per_tok)
        return jnp.mean(logits @ probe) + aux

    return loss


def _value_and_grads(cfg, params, ids, mesh, impl="grouped"):
    loss = _loss_fn(cfg, mesh, impl)
    if mesh is not None:
        params = shard_params_like(params, mesh)
        ids = jax.device_put(ids, batch_sharding(mesh))
    value, grads = jax.jit(jax.value_and_grad(loss))(params, ids)
    return float(value), jax.tree.map(np.asarray, grads)


def _assert_close(got, want):
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    for path, w in jax.tree_util.tree_leaves_with_path(want):
        g = flat_got[path]
        scale = max(float(np.max(np.abs(w))), 1e-30)
        err = float(np.max(np.abs(g - w))) / scale
        assert err <= RTOL, (jax.tree_util.keystr(path), err)


@pytest.fixture(scope="module")
def tiny():
    """8 experts (top-2), 2 sparse layers (one scan body: compiles fast), 8 rows of 6 tokens."""
    cfg = tiny_moe_config(num_experts=8, num_hidden_layers=2)
    params = nnx.to_pure_dict(nnx.state(numpy_model(cfg, "grouped", seed=3), nnx.Param))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(8, 6)).astype(np.int32)
    return cfg, params, ids


@pytest.fixture(scope="module")
def reference(tiny):
    cfg, params, ids = tiny
    value, grads = _value_and_grads(cfg, params, ids, None)
    return cfg, params, ids, value, grads


@pytest.mark.parametrize(
    "mesh_shape",
    [
        pytest.param(dict(data=1, fsdp=1, tensor=1, expert=8), marks=pytest.mark.slow),
        dict(data=1, fsdp=2, tensor=1, expert=4),
        dict(data=2, fsdp=1, tensor=2, expert=2),
    ],
    ids=["expert8", "expert4xfsdp2", "expert2xtensor2xdata2"],
)
def test_expert_parallel_loss_and_grads_equal_one_device(reference, mesh_shape):
    cfg, params, ids, want_value, want_grads = reference
    mesh = make_mesh(**mesh_shape)
    value, grads = _value_and_grads(cfg, params, ids, mesh)
    assert abs(value - want_value) <= RTOL * max(abs(want_value), 1.0)
    _assert_close(grads, want_grads)


def test_expert_kernels_are_split_over_the_expert_axis(tiny):
    """What makes it expert parallelism: each device holds E / expert whole experts (and the
    grouped path runs through the shard_map), while attention weights stay whole over `expert`."""
    cfg, params, _ = tiny
    mesh = make_mesh(data=1, fsdp=2, tensor=1, expert=4)
    placed = shard_params_like(params, mesh)
    gate = placed["layers"]["moe"]["experts"]["gate_proj"]["kernel"]  # [L, E, D, F]
    assert gate.sharding.spec[1] == "expert"
    assert gate.addressable_shards[0].data.shape[1] == cfg.num_experts // 4
    q = placed["layers"]["self_attn"]["q_proj"]["kernel"]
    assert "expert" not in jax.tree.leaves(tuple(q.sharding.spec))
    spec = build_model(cfg, activation_sharding=batch_sharding(mesh), abstract=True).moe_spec
    assert spec.expert_parallel and spec.mesh is mesh


def test_expert_mesh_errors():
    """mesh.expert must divide num_experts, and a dense model takes no expert axis."""
    mesh = make_mesh(data=1, fsdp=2, tensor=1, expert=4)
    with pytest.raises(ValueError, match=r"mesh.expert=4 does not divide the model's num_exp"):
        build_model(tiny_moe_config(), activation_sharding=batch_sharding(mesh), abstract=True)
    dense = tiny_moe_config(model_type="qwen3", num_experts=0, num_experts_per_tok=0)
    with pytest.raises(ValueError, match=r"mesh.expert=4: the model \(qwen3\) has no mixture"):
        build_model(dense, activation_sharding=batch_sharding(mesh), abstract=True)


def test_plan_splits_the_experts_over_the_expert_axis():
    """`flux-jax plan`'s parameter blocks: expert kernels divided by expert x fsdp, attention
    by fsdp only; the activation estimate gathers only the local experts."""
    from flux_jax.activation_memory import activation_terms
    from flux_jax.memory_plan import memory_plan, param_blocks
    from flux_jax.models.qwen.presets import resolve_architecture

    cfg = resolve_architecture("builtin:tiny-qwen3-moe")
    blocks = param_blocks(cfg, (1, 2, 1, 4))
    gate = blocks["layers/moe/experts/gate_proj/kernel"]
    L, E, D, F = gate["shape"]
    assert gate["local_elements"] == L * (E // 4) * (D // 2) * F
    q = blocks["layers/self_attn/q_proj/kernel"]
    assert q["local_elements"] == np.prod(q["shape"]) // 2
    args = dict(rows=2, seq_len=16, tensor=1, compute_bytes=2, remat="full", chunk=None, fsdp=2)
    one = activation_terms(cfg, **args)["gathered_weights"]
    split = activation_terms(cfg, **args, expert=4)["gathered_weights"]
    assert split < one
    plan = memory_plan(cfg, mesh_shape=(1, 2, 1, 4), batch_size=8, max_length=16)
    assert plan["mesh"]["expert"] == 4 and plan["batch"]["rows_per_device"] == 2


@pytest.mark.parametrize("impl", ["grouped", "dense"])
def test_tokens_that_do_not_split_over_the_expert_axis(tiny, impl):
    """15 tokens on expert=4 (a decode step, an odd eval batch): the tokens go to every expert
    shard whole and the partial outputs are summed; logits equal one device's."""
    cfg, params, _ = tiny
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(3, 5)).astype(np.int32)

    def logits(mesh):
        sharding = batch_sharding(mesh) if mesh is not None else None
        model = build_model(cfg, activation_sharding=sharding, moe_impl=impl)
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, shard_params_like(params, mesh) if mesh else params)
        nnx.update(model, state)
        return np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))

    want = logits(None)
    got = logits(make_mesh(data=1, fsdp=2, tensor=1, expert=4))
    assert np.max(np.abs(got - want)) <= RTOL * np.max(np.abs(want))


def test_plan_from_config_refuses_an_expert_axis_that_does_not_divide():
    """`flux-jax plan` checks mesh.expert against the model's expert count before planning."""
    from flux_jax.config import FluxConfig
    from flux_jax.memory_plan import plan_from_config

    config = FluxConfig.default()
    config.model_path = "builtin:tiny-qwen3-moe"  # 8 experts
    config.mesh.fsdp, config.mesh.expert = 2, 3
    with pytest.raises(ValueError, match=r"mesh.expert=3 does not divide .* one of \[1, 2, 4, 8\]"):
        plan_from_config(config, num_devices=6)
    config.mesh.expert = 4
    assert plan_from_config(config, num_devices=8)["mesh"]["expert"] == 4
