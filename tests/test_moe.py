"""Qwen3-MoE math without torch: routing, the dense vs grouped expert paths (values and grads),
the load-balancing loss against a numpy transcription of transformers' formula, layer runs of a
mixed dense/sparse stack, the config fields. Parity with transformers is tests/test_moe_hf.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax.models.qwen import layer_stack, moe
from flux_jax.models.qwen.config import QwenConfig, UnsupportedConfigError
from flux_jax.models.qwen.model import build_model

RTOL = 1e-5  # fp32, sums of a few dozen terms in another order


def tiny_moe_config(**overrides) -> QwenConfig:
    fields = dict(
        model_type="qwen3_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
    )
    fields.update(overrides)
    return QwenConfig(**fields)


def _block_params(seed, dim=16, experts=5, hidden=12):
    rng = np.random.default_rng(seed)

    def normal(scale, *shape):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    return {
        "router": {"kernel": normal(1.0, dim, experts)},
        "experts": {
            "gate_proj": {"kernel": normal(0.3, experts, dim, hidden)},
            "up_proj": {"kernel": normal(0.3, experts, dim, hidden)},
            "down_proj": {"kernel": normal(0.3, experts, hidden, dim)},
        },
    }


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.max(np.abs(b))), 1e-30)
    assert float(np.max(np.abs(a - b))) <= rtol * scale, float(np.max(np.abs(a - b))) / scale


def test_route_matches_numpy_softmax_topk_and_renormalisation():
    params = _block_params(0)
    h = np.random.default_rng(1).standard_normal((9, 16)).astype(np.float32)
    logits = h @ np.asarray(params["router"]["kernel"])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want_idx = np.argsort(-probs, axis=-1)[:, :3]
    want_w = np.take_along_axis(probs, want_idx, axis=-1)
    for norm in (False, True):
        spec = moe.MoeSpec(num_experts=5, top_k=3, norm_topk_prob=norm)
        got_logits, got_w, got_idx = moe.route(params["router"]["kernel"], h, spec, jnp.float32)
        _close(got_logits, logits)
        np.testing.assert_array_equal(np.asarray(got_idx), want_idx)
        _close(got_w, want_w / want_w.sum(-1, keepdims=True) if norm else want_w)


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_grouped_equals_dense_values_and_grads(top_k):
    params = _block_params(2)
    h = jnp.asarray(np.random.default_rng(3).standard_normal((2, 7, 16)), jnp.float32)

    def loss(p, x, impl):
        spec = moe.MoeSpec(num_experts=5, top_k=top_k, norm_topk_prob=top_k > 1, impl=impl)
        out, logits = moe.moe_block(p, x, spec, jnp.float32)
        return jnp.sum(out * jnp.cos(out)) + 0.1 * jnp.sum(logits**2), out

    grads_of = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=(2,))
    (l_d, out_d), g_d = grads_of(params, h, "dense")
    (l_g, out_g), g_g = grads_of(params, h, "grouped")
    _close(out_g, out_d)
    _close(l_g, l_d)
    jax.tree.map(_close, g_g, g_d)


def test_grouped_handles_experts_with_no_tokens():
    params = _block_params(4)
    # A router that sends every token to experts 0 and 1 only: experts 2..4 get empty groups.
    params["router"]["kernel"] = jnp.zeros((16, 5)).at[:, :2].set(1.0)
    h = jnp.asarray(np.abs(np.random.default_rng(5).standard_normal((1, 6, 16))), jnp.float32)
    outs = [
        moe.moe_block(params, h, moe.MoeSpec(5, 2, True, impl), jnp.float32)[0]
        for impl in ("dense", "grouped")
    ]
    _close(outs[1], outs[0])


def _numpy_load_balancing(logits_LxMxE, top_k, mask_M=None):
    """transformers' load_balancing_loss_func, transcribed to numpy (layers looped, sums first)."""
    num_experts = logits_LxMxE.shape[-1]
    counts, prob_sum, rows = np.zeros(num_experts), np.zeros(num_experts), 0.0
    mask = np.ones(logits_LxMxE.shape[1]) if mask_M is None else mask_M.astype(np.float64)
    for layer in logits_LxMxE.astype(np.float64):
        probs = np.exp(layer - layer.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        selected = np.argsort(-probs, axis=-1)[:, :top_k]
        np.add.at(counts, selected.reshape(-1), np.repeat(mask, top_k))
        prob_sum += (probs * mask[:, None]).sum(0)
        rows += mask.sum()
    return float(np.sum(counts / rows * prob_sum / rows) * num_experts)


def test_load_balancing_loss_matches_the_reference_formula():
    logits = np.random.default_rng(6).standard_normal((3, 2, 5, 7)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    for top_k in (1, 2):
        got = moe.load_balancing_loss(jnp.asarray(logits), top_k)
        _close(got, _numpy_load_balancing(logits.reshape(3, 10, 7), top_k))
        got = moe.load_balancing_loss(jnp.asarray(logits), top_k, jnp.asarray(mask))
        _close(got, _numpy_load_balancing(logits.reshape(3, 10, 7), top_k, mask.reshape(-1)))
    # Perfectly uniform routing gives k (the loss's minimum); all padding gives 0, not NaN.
    uniform = moe.load_balancing_loss(jnp.zeros((2, 1, 4, 8)), 2)
    assert abs(float(uniform) - 2.0) < 1e-6
    assert float(moe.load_balancing_loss(jnp.asarray(logits), 2, jnp.zeros((2, 5)))) == 0.0


def test_layer_runs_cut_a_mixed_stack_into_same_kind_runs():
    runs = layer_stack.layer_runs([False, True, True, False, True])
    assert [(r.sparse, r.start, r.stop, r.kind_start) for r in runs] == [
        (False, 0, 1, 0),
        (True, 1, 3, 0),
        (False, 3, 4, 1),
        (True, 4, 5, 2),
    ]
    assert len(layer_stack.layer_runs([True] * 48)) == 1  # a released Qwen3-MoE: one scan


def test_config_sparse_layers_follow_transformers_rule():
    cfg = tiny_moe_config(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=(3,))
    # Layer i is sparse iff (i + 1) % step == 0 and i is not in mlp_only_layers.
    assert cfg.sparse_layers == (False, True, False, False, False, True)
    hf = cfg.to_hf_config()
    assert hf["architectures"] == ["Qwen3MoeForCausalLM"] and hf["mlp_only_layers"] == [3]
    assert QwenConfig.from_hf_config(hf) == cfg
    # transformers 5 writes the expert count as num_local_experts.
    hf_v5 = {k: v for k, v in hf.items() if k != "num_experts"} | {"num_local_experts": 6}
    assert QwenConfig.from_hf_config(hf_v5).num_experts == 6
    with pytest.raises(UnsupportedConfigError, match="shared expert"):
        QwenConfig.from_hf_config(hf | {"shared_expert_intermediate_size": 64})
    with pytest.raises(UnsupportedConfigError, match="num_experts_per_tok"):
        tiny_moe_config(num_experts_per_tok=7)


def test_active_parameters_count_only_the_routed_experts():
    cfg = tiny_moe_config()
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = cfg.num_experts - cfg.num_experts_per_tok
    assert cfg.num_params() - cfg.num_active_params() == 4 * idle * expert
    model = build_model(cfg, abstract=True)
    counted = sum(x.size for x in jax.tree.leaves(jax.tree.map(lambda v: v, model)))
    assert cfg.num_params() == counted


def numpy_model(cfg: QwenConfig, moe_impl: str, seed: int = 0):
    """A model with random numpy weights: no RNG kernels to compile (seconds each on a busy CPU).

    Norm scales near 1, everything else N(0, 0.1^2): large enough that routing differs by token.
    """
    graphdef, state = nnx.split(build_model(cfg, moe_impl=moe_impl, abstract=True))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        base = 1.0 if "norm" in "/".join(map(str, path)) else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))


@pytest.mark.parametrize(
    "mlp_only_layers",
    # All-sparse is also covered by test_moe_hf's grouped-path parity: default-run only the mix.
    [pytest.param((), marks=pytest.mark.slow), (0, 2)],
)
def test_model_dense_and_grouped_paths_agree(mlp_only_layers):
    cfg = tiny_moe_config(mlp_only_layers=mlp_only_layers)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)))
    mask = jnp.asarray(np.array([[1] * 9, [1] * 5 + [0] * 4]))
    outs = {}
    for impl in ("dense", "grouped"):
        graphdef, params = nnx.split(numpy_model(cfg, impl))
        forward = jax.jit(
            lambda p, g=graphdef: nnx.merge(g, p)(
                ids, attention_mask_BxT=mask, return_router_logits=True
            )
        )
        outs[impl] = forward(params)
    assert outs["dense"][1].shape == (4 - len(mlp_only_layers), 2, 9, 6)
    _close(outs["grouped"][0], outs["dense"][0])
    _close(outs["grouped"][1], outs["dense"][1])


def test_router_logits_are_refused_for_a_dense_model():
    cfg = QwenConfig(
        model_type="qwen3",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    model = build_model(cfg, abstract=True)
    with pytest.raises(ValueError, match="no mixture-of-experts"):
        nnx.eval_shape(lambda m: m(jnp.zeros((1, 3), jnp.int32), return_router_logits=True), model)


def test_flops_count_the_router_and_only_the_routed_experts():
    from flux_jax import flops

    cfg = tiny_moe_config(mlp_only_layers=(1,))
    d, f_moe = cfg.hidden_size, cfg.moe_intermediate_size
    attention = 2 * d * (4 * 8 + 2 * 2 * 8) + 2 * 4 * 8 * d
    sparse = 2 * d * cfg.num_experts + 2 * 2 * 3 * d * f_moe  # router + top-2 experts
    dense = 2 * 3 * d * cfg.intermediate_size
    assert flops.layer_flops_per_token(cfg) == 4 * attention + 3 * sparse + dense
    down = 2 * cfg.intermediate_size * d + 3 * 2 * 2 * f_moe * d
    assert flops.down_proj_flops_per_token(cfg) == down


def test_kv_cache_decoder_equals_the_full_forward_on_a_mixed_stack():
    """Prefill then one cached decode step give the full forward's logits (dense and sparse
    layers in runs, the cache threaded through each run's scan)."""
    from flux_jax.generation import kv_cache

    # Two layers, sparse then dense: two runs (two scan bodies) keep the compile short.
    cfg = tiny_moe_config(num_hidden_layers=2, mlp_only_layers=(1,))
    model = numpy_model(cfg, "grouped")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 6)))
    want = np.asarray(nnx.jit(lambda m: m(ids))(model))
    spec, params = kv_cache.DecoderSpec.of(model), kv_cache.decoder_params(model)
    cache = kv_cache.init_kv_cache(spec, params, 2, 8)
    no_pad = jnp.zeros((2,), jnp.int32)

    @jax.jit
    def run(params, cache):
        hidden, cache = kv_cache.forward_cached(spec, params, ids[:, :5], 0, no_pad, cache)
        last, _ = kv_cache.forward_cached(spec, params, ids[:, 5:], 5, no_pad, cache)
        return kv_cache.lm_logits(spec, params, jnp.concatenate([hidden, last], axis=1))

    _close(run(params, cache), want)
