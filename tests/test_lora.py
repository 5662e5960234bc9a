"""LoRA (flux_jax.lora): PEFT's initialisation, the adapter forward against the merged model, the
train step on adapters only with the base as its own reference, and sharded adapters.

Tolerances: forwards and losses of the adapter path vs the merged kernel differ by the rounding of
one fp32 sum per kernel (relative 1e-5 on logits, log-prob sums and losses); gradients compared
relative to the largest entry of their tree.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import lora, optim
from flux_jax import train_step as ts
from flux_jax.model_setup import shard_params_like, split_model
from flux_jax.models.qwen.model import build_model
from flux_jax.sharding import make_mesh
from tests.train_fixtures import TINY, random_pair_batch

SETTINGS = lora.LoraSettings(rank=4, alpha=8.0)


def _batch(seed: int, pairs: int = 4, length: int = 20) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in random_pair_batch(pairs, length, seed=seed).items()}


def _random_adapters(base, settings, seed=1, scale=0.05):
    """Adapters with B != 0 (a trained state), so the adapter path is not a no-op."""
    adapters = lora.init_adapters(base, settings, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), adapters
    )


def _max_rel_diff(a, b) -> float:
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b))
    diffs = [
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(diffs) / scale


@functools.cache
def _logits(graphdef, settings=None):
    """Jitted `(params, ids, adapters=None, rng=None) -> logits`: the scanned model run op by op
    is many times slower on CPU."""
    from flax import nnx

    def run(params, ids, adapters, rng):
        active = None if adapters is None else lora.ActiveAdapters(adapters, settings, rng)
        return nnx.merge(graphdef, params)(ids, lora=active)

    jitted = jax.jit(run)
    return lambda params, ids, adapters=None, rng=None: jitted(params, ids, adapters, rng)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model's graphdef and random fp32 weights (drawn with NumPy: a jitted init of every
    parameter costs seconds of threefry compilation on CPU)."""
    graphdef, abstract = split_model(build_model(TINY, abstract=True))
    rng = np.random.default_rng(0)

    def init(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):  # norms start at one
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), jnp.float32)

    return graphdef, jax.tree_util.tree_map_with_path(init, abstract)


# -- settings and initialisation ----------------------------------------------------------------


def test_scale_is_peft_scaling_and_rslora():
    assert lora.LoraSettings(rank=16, alpha=32.0).scale == 2.0  # PEFT: alpha / r
    assert lora.LoraSettings(rank=16, alpha=32.0, rslora=True).scale == 8.0  # alpha / sqrt(r)


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"target_modules \['qkv_proj'\] unknown; valid: q_proj"):
        lora.LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "qkv_proj"))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.LoraSettings(rank=0, alpha=8.0)


def test_init_is_peft_kaiming_uniform_and_zero_b(tiny):
    _, base = tiny
    settings = lora.LoraSettings(rank=8, alpha=16.0)
    adapters = lora.init_adapters(base, settings, jax.random.key(0))
    attn, mlp = adapters["layers"]["self_attn"], adapters["layers"]["mlp"]
    L, D, N, K, H, F = 2, 32, 4, 2, 8, 64  # TINY
    assert attn["q_proj"]["lora_a"].shape == (L, D, 8)
    assert attn["k_proj"]["lora_b"].shape == (L, 8, K, H)
    assert attn["o_proj"]["lora_a"].shape == (L, N, H, 8)
    assert mlp["down_proj"]["lora_a"].shape == (L, F, 8)
    assert mlp["gate_proj"]["lora_b"].shape == (L, 8, F)
    for name, fan_in in (("q_proj", D), ("o_proj", N * H)):
        a = np.asarray(attn[name]["lora_a"])
        # torch.nn.init.kaiming_uniform_(a=sqrt(5)): bound = gain * sqrt(3 / fan_in) with
        # gain = sqrt(2 / (1 + a^2)) (PEFT's reset_lora_parameters).
        bound = math.sqrt(2.0 / (1.0 + 5.0)) * math.sqrt(3.0 / fan_in)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound, name
        assert abs(a.mean()) < 0.1 * bound and a.dtype == np.float32
    assert all(not np.any(b) for b in jax.tree.leaves(_b_leaves(adapters)))
    # A target's values do not depend on which others are targeted.
    only_q = lora.init_adapters(
        base, lora.LoraSettings(rank=8, alpha=16.0, target_modules=("q_proj",)), jax.random.key(0)
    )
    np.testing.assert_array_equal(
        only_q["layers"]["self_attn"]["q_proj"]["lora_a"], attn["q_proj"]["lora_a"]
    )
    assert lora.num_params(adapters) == sum(x.size for x in jax.tree.leaves(adapters))


def test_checkpoint_check_names_both_sides():
    from flux_jax.adapter_checkpoint import BaseModel, adapter_metadata, check_matches

    base = BaseModel("builtin:tiny-qwen3", "ab" * 32)
    meta = adapter_metadata(SETTINGS, base)
    check_matches(meta, "ckpt/2", settings=SETTINGS, base=base)  # the same run: fine
    check_matches({}, "ckpt/2", settings=None, base=None)  # full fine-tuning on both sides
    other = lora.LoraSettings(rank=4, alpha=16.0, target_modules=("q_proj",))
    with pytest.raises(ValueError, match=r"ckpt/2 .*alpha: checkpoint 8.0, this run 16.0; "):
        check_matches(meta, "ckpt/2", settings=other, base=base)
    quantized = BaseModel("builtin:tiny-qwen3", "ab" * 32, "nf4/block64")
    with pytest.raises(ValueError, match="quantised as 'none', but this run .* 'nf4/block64'"):
        check_matches(meta, "ckpt/2", settings=SETTINGS, base=quantized)
    moved = BaseModel("/models/other", "cd" * 32)
    with pytest.raises(ValueError, match="base model_path 'builtin:tiny-qwen3' .* '/models/other'"):
        check_matches(meta, "ckpt/2", settings=SETTINGS, base=moved, action="load")
    with pytest.raises(ValueError, match="holds a full fine-tune"):
        check_matches({}, "ckpt/2", settings=SETTINGS, base=base)


def _b_leaves(adapters):
    return [pair["lora_b"] for group in adapters["layers"].values() for pair in group.values()]


# -- the forward ----------------------------------------------------------------------------------


def test_forward_with_adapters_equals_merged_model_and_dropout_needs_a_key(tiny):
    graphdef, base = tiny
    settings = lora.LoraSettings(rank=4, alpha=8.0, dropout=0.5, rslora=True)
    adapters = _random_adapters(base, settings)
    ids = jax.random.randint(jax.random.key(3), (2, 11), 0, TINY.vocab_size)
    logits = _logits(graphdef, settings)
    with_adapters = logits(base, ids, adapters)  # no dropout key: eval, no dropout
    merged = logits(lora.merge(base, adapters, settings), ids)
    plain = logits(base, ids)
    assert float(jnp.max(jnp.abs(with_adapters - plain))) > 1e-2  # the adapters do something
    atol = 1e-5 * float(jnp.abs(merged).max())
    np.testing.assert_allclose(with_adapters, merged, rtol=1e-5, atol=atol)
    # Zero B: the base model (up to the last bit: the two programs fuse their matmuls differently).
    fresh = lora.init_adapters(base, settings, jax.random.key(0))
    np.testing.assert_allclose(logits(base, ids, fresh), plain, rtol=1e-6, atol=atol / 10)
    # With a key: dropout, the same masks for the same key, others for another.
    key_a = logits(base, ids, adapters, jax.random.key(7))
    np.testing.assert_array_equal(key_a, logits(base, ids, adapters, jax.random.key(7)))
    assert float(jnp.max(jnp.abs(key_a - with_adapters))) > 1e-3
    assert float(jnp.max(jnp.abs(key_a - logits(base, ids, adapters, jax.random.key(8))))) > 1e-3


def test_merge_keeps_the_base_dtype_and_leaves_the_base_alone(tiny):
    _, base = tiny
    base_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    adapters = _random_adapters(base, SETTINGS)
    merged = lora.merge(base_bf16, adapters, SETTINGS)
    kernel = merged["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    assert (
        merged["layers"]["self_attn"]["q_proj"]["kernel"]
        is not (base_bf16["layers"]["self_attn"]["q_proj"]["kernel"])
    )
    untouched = base_bf16["layers"]["input_layernorm"]["scale"]
    assert merged["layers"]["input_layernorm"]["scale"] is untouched
    with pytest.raises(ValueError, match="do not match the LoRA settings"):
        lora.merge(base, adapters, lora.LoraSettings(rank=2, alpha=8.0))


# -- the train step -------------------------------------------------------------------------------


@functools.cache
def _lora_grad_fn(graphdef, settings, ref: bool):
    """Jitted `(adapters, batch, base) -> ((loss, metrics), adapter grads)`, compiled once per
    (model, LoRA settings, online reference or not)."""

    def fn(adapters, batch, base):
        loss_fn = lambda a, b: ts.dpo_loss_fn(  # noqa: E731
            a,
            b,
            graphdef=graphdef,
            ref_params=base if ref else None,
            settings=ts.DPOSettings(),
            lora=settings,
            base=base,
        )
        return jax.value_and_grad(loss_fn, has_aux=True)(adapters, batch)

    return jax.jit(fn)


def _lora_loss_and_grads(graphdef, base, adapters, batch, settings, ref=True):
    return _lora_grad_fn(graphdef, settings, ref)(adapters, batch, base)


def test_loss_and_grads_are_the_merged_policy_against_the_base(tiny):
    """The LoRA loss = the full-fine-tuning loss of the merged weights with the base as the
    reference (adapters on for the policy, off for the reference), and the adapter gradients =
    the gradients through `merge()` and a finite difference."""
    graphdef, base = tiny
    adapters = _random_adapters(base, SETTINGS)
    batch = _batch(seed=5)
    (loss, metrics), grads = _lora_loss_and_grads(graphdef, base, adapters, batch, SETTINGS)

    def merged_loss(a, b):
        merged = lora.merge(base, a, SETTINGS)
        return ts.dpo_loss_fn(
            merged, b, graphdef=graphdef, ref_params=base, settings=ts.DPOSettings()
        )[0]

    full, want = jax.jit(jax.value_and_grad(merged_loss))(adapters, batch)
    assert abs(float(loss) - math.log(2)) > 1e-4
    np.testing.assert_allclose(loss, full, rtol=1e-5)
    rel = _max_rel_diff(grads, want)
    print(f"adapter grads vs grads through merge(): max rel diff {rel:.2e}")
    assert rel < 1e-4
    # The reference is the base: its precomputed log-probs (what algorithm.precompute_ref_logps
    # caches, under the base weights' key) are the online reference's. Mean rewards are
    # beta x (policy - reference), so the online reference's mean log-probs follow from metrics.
    ref_c, ref_r = ts.make_ref_logps_step(graphdef, None)(base, batch)
    beta = ts.DPOSettings().beta
    online_c = float(metrics["chosen_logps"]) - float(metrics["chosen_reward"]) / beta
    online_r = float(metrics["rejected_logps"]) - float(metrics["rejected_reward"]) / beta
    np.testing.assert_allclose([online_c, online_r], [ref_c.mean(), ref_r.mean()], rtol=1e-5)
    # And a central finite difference of the loss along the (unit) gradient direction.
    norm = math.sqrt(sum(float(jnp.vdot(g, g)) for g in jax.tree.leaves(grads)))
    eps = 1e-2

    def loss_at(t):
        shifted = jax.tree.map(lambda a, g: a + (t / norm) * g, adapters, grads)
        return float(_lora_loss_and_grads(graphdef, base, shifted, batch, SETTINGS)[0][0])

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    print(f"directional derivative: autodiff {norm:.6f}, finite difference {fd:.6f}")
    assert norm == pytest.approx(fd, rel=1e-2)


def test_train_steps_change_only_adapters_from_ln2(tiny):
    """Adapters-only state and optimiser state; step 1 is the base model (ln 2) even with dropout
    (B = 0); the base stays bit-identical; the dropout masks are a function of the step number,
    so rerunning the steps (a resume) reproduces them exactly."""
    graphdef, base = tiny
    settings = lora.LoraSettings(rank=4, alpha=8.0, dropout=0.1)
    base_host = jax.tree.map(np.asarray, base)
    adapters = lora.init_adapters(base, settings, jax.random.key(0))
    tx = optim.make_optimizer(learning_rate=1e-2, num_steps=4)
    schedule = optim.make_schedule(learning_rate=1e-2, num_steps=4)
    step = ts.make_train_step(
        graphdef, tx, schedule, ts.DPOSettings(grad_accum_steps=2), lora=settings
    )
    batches = [_batch(seed=10 + i) for i in range(3)]

    def run(start_step=0):
        state = ts.init_train_state(jax.tree.map(jnp.copy, adapters), tx)
        state["step"] = state["step"] + start_step
        losses = []
        for batch in batches:
            state, metrics = step(state, batch, base)
            losses.append(float(metrics["loss"]))
        return state, losses

    state, losses = run()
    opt_sizes = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
    assert opt_sizes == 2 * lora.num_params(adapters)  # Adam's mu and nu, adapters only
    assert jax.tree.structure(state["params"]) == jax.tree.structure(adapters)
    # Step 1: B = 0, so the policy is the base model and the loss is ln 2, up to beta (0.1) x the
    # last-bit rounding of the summed log-probs (policy and reference are separately compiled).
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6, abs=0)
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), base_host)
    assert all(np.any(np.asarray(b)) for b in _b_leaves(state["params"]))
    again, _ = run()
    jax.tree.map(np.testing.assert_array_equal, again["params"], state["params"])
    # Other step numbers draw other dropout masks (the schedule is constant, Adam's count is its
    # own): the same data then gives other adapters, so dropout is live in the step.
    shifted, _ = run(start_step=5)
    assert _max_rel_diff(shifted["params"], state["params"]) > 1e-4


# -- sharding ------------------------------------------------------------------------------------


def test_sharded_adapters_match_one_device(tiny):
    """fsdp 4 x tensor 2 over 8 CPU devices: adapters laid out like their kernels (rank whole);
    loss and adapter gradients equal the single-device ones."""
    graphdef, base = tiny
    adapters = _random_adapters(base, SETTINGS)
    batch = _batch(seed=13)
    (loss_1, _), grads_1 = _lora_loss_and_grads(graphdef, base, adapters, batch, SETTINGS)

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    base_sharded = shard_params_like(base, mesh)
    placed = lora.init_adapters(base_sharded, SETTINGS, jax.random.key(1))
    q = placed["layers"]["self_attn"]["q_proj"]
    o = placed["layers"]["self_attn"]["o_proj"]
    assert tuple(q["lora_a"].sharding.spec) == (None, "fsdp", None)  # [L, D, r]
    assert tuple(q["lora_b"].sharding.spec) == (None, None, "tensor", None)  # [L, r, N, H]
    assert tuple(o["lora_a"].sharding.spec) == (None, "tensor", None, None)  # [L, N, H, r]
    assert tuple(o["lora_b"].sharding.spec) == (None, None, "fsdp")  # [L, r, D]
    shardings = jax.tree.map(lambda x: x.sharding, placed)
    adapters_sharded = jax.tree.map(jax.device_put, adapters, shardings)
    batch_sharded = ts.shard_batch(batch, mesh)
    (loss_8, _), grads_8 = _lora_loss_and_grads(
        graphdef, base_sharded, adapters_sharded, batch_sharded, SETTINGS
    )
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    rel = _max_rel_diff(grads_8, grads_1)
    print(f"fsdp 4 x tensor 2 vs one device: loss {float(loss_8):.6f}, max rel grad diff {rel:.2e}")
    assert rel < 1e-5
    g = grads_8["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert g.sharding.is_equivalent_to(q["lora_a"].sharding, g.ndim)
