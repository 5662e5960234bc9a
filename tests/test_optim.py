"""Optimiser chain: weight-decay mask, schedule values by hand, clipping, and gradient
accumulation equal to the full batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flux_jax.grad_accum import accumulate_gradients, split_microbatches
from flux_jax.optim import current_learning_rate, make_optimizer, make_schedule, weight_decay_mask


def _qwen_like_params():
    """A nested dict with the leaf names our Qwen model uses (shapes are irrelevant)."""
    ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    layer = {
        "self_attn": {
            "q_proj": {"kernel": ones(4, 4), "bias": ones(4)},
            "q_norm": {"scale": ones(4)},
            "o_proj": {"kernel": ones(4, 4)},
        },
        "mlp": {"gate_proj": {"kernel": ones(4, 8)}},
        "input_layernorm": {"scale": ones(4)},
    }
    return {
        "embed_tokens": {"embedding": ones(10, 4)},
        "layers": [layer, jax.tree.map(lambda x: x * 2, layer)],
        "norm": {"scale": ones(4)},
        "lm_head": {"kernel": ones(4, 10)},
    }


def _flat_mask(mask):
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return {jax.tree_util.keystr(path): bool(m) for path, m in flat}


def test_weight_decay_mask_on_nested_dict():
    mask = _flat_mask(weight_decay_mask(_qwen_like_params()))
    decayed = {k for k, v in mask.items() if v}
    assert decayed == {
        "['embed_tokens']['embedding']",
        "['lm_head']['kernel']",
        *(
            f"['layers'][{i}]{name}"
            for i in range(2)
            for name in (
                "['self_attn']['q_proj']['kernel']",
                "['self_attn']['o_proj']['kernel']",
                "['mlp']['gate_proj']['kernel']",
            )
        ),
    }
    assert not mask["['layers'][0]['self_attn']['q_proj']['bias']"]
    assert not mask["['layers'][1]['input_layernorm']['scale']"]
    assert not mask["['norm']['scale']"]


def test_weight_decay_mask_on_flat_path_keys():
    params = {"layers/self_attn/q_proj/kernel": 1.0, "layers/self_attn/q_proj/bias": 1.0}
    assert weight_decay_mask(params) == {
        "layers/self_attn/q_proj/kernel": True,
        "layers/self_attn/q_proj/bias": False,
    }


class _TinyBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(4, 4, use_bias=True, rngs=rngs)
        self.input_layernorm = nnx.RMSNorm(4, rngs=rngs)


class _TinyModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(10, 4, rngs=rngs)
        self.layers = nnx.List([_TinyBlock(rngs) for _ in range(2)])
        self.norm = nnx.RMSNorm(4, rngs=rngs)


def _decay_only_step(params, weight_decay=0.1, lr=0.5):
    """One update with zero gradients: Adam's part is exactly 0, so only the decay moves a leaf."""
    tx = make_optimizer(
        learning_rate=lr, num_steps=10, weight_decay=weight_decay, max_grad_norm=1.0
    )

    @jax.jit
    def step(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    return step(params)


def test_decay_moves_only_kernels_and_embeddings_nested_dict():
    params = _qwen_like_params()
    after = _decay_only_step(params)
    same = _flat_mask(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, after))
    unchanged = {k for k, s in same.items() if s}
    assert unchanged == {k for k, dec in _flat_mask(weight_decay_mask(params)).items() if not dec}
    assert len(unchanged) == 7  # 2 x (bias, q_norm, input_layernorm) + final norm
    # The decayed leaves shrink by exactly lr * wd (decoupled AdamW).
    np.testing.assert_allclose(after["lm_head"]["kernel"], 1 - 0.5 * 0.1, rtol=1e-6)


def test_decay_mask_on_nnx_state():
    _, state = nnx.split(_TinyModel(nnx.Rngs(0)), nnx.Param)
    after = _decay_only_step(state)
    changed = {
        jax.tree_util.keystr(p): not bool(jnp.all(a == b))
        for (p, a), b in zip(
            jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(after), strict=True
        )
    }
    assert {k for k, c in changed.items() if c} == {
        "['embed_tokens']['embedding'].value",
        "['layers'][0]['q_proj']['kernel'].value",
        "['layers'][1]['q_proj']['kernel'].value",
    }


@pytest.mark.parametrize(
    "schedule, want",
    [
        # lr 1, 10 steps, 2 warm-up: steps 0, 1 ramp 0 -> 0.5; then decay over 8 steps.
        ("constant", {0: 0.0, 1: 0.5, 2: 1.0, 6: 1.0, 10: 1.0, 50: 1.0}),
        ("linear", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.75, 6: 0.5, 10: 0.0, 50: 0.0}),
        ("cosine", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 10: 0.0}),
    ],
)
def test_schedule_values_by_hand(schedule, want):
    fn = make_schedule(learning_rate=1.0, num_steps=10, warmup_steps=2, schedule=schedule)
    for step, lr in want.items():
        assert float(current_learning_rate(fn, step)) == pytest.approx(lr, abs=1e-6), step


def test_schedule_min_lr_ratio_and_no_warmup():
    cos = make_schedule(learning_rate=2e-5, num_steps=100, schedule="cosine", min_lr_ratio=0.1)
    assert float(cos(0)) == pytest.approx(2e-5)  # no warm-up: the first step uses the peak
    assert float(cos(50)) == pytest.approx(2e-5 * (0.1 + 0.9 * 0.5))
    assert float(cos(100)) == pytest.approx(2e-6) and float(cos(1000)) == pytest.approx(2e-6)
    lin = make_schedule(learning_rate=1.0, num_steps=10, schedule="linear", min_lr_ratio=0.2)
    assert float(lin(5)) == pytest.approx(0.2 + 0.8 * 0.5)
    # Traced steps work (the optimiser calls it with its int32 count inside jit).
    assert float(jax.jit(lin)(jnp.int32(5))) == pytest.approx(0.6)
    for bad in (
        dict(schedule="step"),
        dict(warmup_steps=11),
        dict(min_lr_ratio=1.5),
        dict(num_steps=0),
    ):
        kwargs = dict(learning_rate=1.0, num_steps=10) | bad
        with pytest.raises(ValueError):
            make_schedule(**kwargs)


def test_clipping_caps_global_norm():
    # eps = 1 makes Adam's first step scale-dependent: update = -lr * g / (|g| + 1), so we can
    # see the clipped gradient through it.
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.asarray([30.0, 40.0])}  # global norm 50

    def first_update(max_grad_norm):
        tx = make_optimizer(learning_rate=1.0, num_steps=1, eps=1.0, max_grad_norm=max_grad_norm)
        updates, _ = tx.update(grads, tx.init(params), params)
        return np.asarray(updates["w"])

    clipped = np.array([0.6, 0.8])  # grads * 1 / 50
    np.testing.assert_allclose(first_update(1.0), -clipped / (clipped + 1), rtol=1e-5)
    raw = np.array([30.0, 40.0])
    np.testing.assert_allclose(first_update(None), -raw / (raw + 1), rtol=1e-5)
    np.testing.assert_allclose(first_update(0.0), -raw / (raw + 1), rtol=1e-5)
    np.testing.assert_allclose(first_update(100.0), -raw / (raw + 1), rtol=1e-5)  # under the cap


def _regression_loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mean_pred": pred.mean(), "n": jnp.asarray(batch["x"].shape[0])}


def test_accumulate_gradients_equals_full_batch():
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
    }
    params = {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.asarray(0.3)}
    loss_and_grad = jax.value_and_grad(_regression_loss, has_aux=True)

    (full_loss, full_aux), full_grads = loss_and_grad(params, batch)
    micro = split_microbatches(batch, 4)
    assert micro["x"].shape == (4, 2, 3)
    grads, (loss, aux) = jax.jit(accumulate_gradients, static_argnums=0)(
        loss_and_grad, params, micro
    )
    np.testing.assert_allclose(grads["w"], full_grads["w"], rtol=1e-6)
    np.testing.assert_allclose(grads["b"], full_grads["b"], rtol=1e-6)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(aux["mean_pred"], full_aux["mean_pred"], rtol=1e-6, atol=1e-7)
    assert float(aux["n"]) == 2.0  # per-micro-batch values are averaged, not summed
    assert grads["w"].dtype == jnp.float32


def test_split_microbatches_is_strided():
    micro = split_microbatches({"i": jnp.arange(8)}, 4)["i"]
    np.testing.assert_array_equal(micro, [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="divisible"):
        split_microbatches({"i": jnp.arange(6)}, 4)


def test_accumulate_gradients_sums_low_precision_grads_in_fp32():
    # bf16 has 8 significant bits: 256 + 1 rounds back to 256, so summing [256, 1, 1, 1] in bf16
    # gives 256 (mean 64); the fp32 sum 259 gives mean 64.75, which rounds to 64.5 or 65 in bf16.
    def loss_and_grad(params, microbatch):
        return microbatch["g"].astype(jnp.float32), {"w": microbatch["g"]}

    micro = {"g": jnp.asarray([256.0, 1.0, 1.0, 1.0], jnp.bfloat16)}
    grads, aux = accumulate_gradients(loss_and_grad, {"w": jnp.zeros((), jnp.bfloat16)}, micro)
    assert grads["w"].dtype == jnp.bfloat16
    assert float(grads["w"]) in (64.5, 65.0)
    assert float(aux) == pytest.approx(64.75)
