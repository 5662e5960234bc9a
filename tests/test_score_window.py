"""The LM head on scored positions only (scored-position windows) equals the head everywhere.

Batches carry `{chosen,rejected}_scored_positions` (or `scored_positions` for shared-prefix rows)
when every row's scored tokens fit in a quarter or half of the row; the head then runs on those W
positions instead of all T. Tolerances: fp32 on CPU, the same math per position, so log-probs and
the loss within 1e-6 relative and gradients within 1e-6 of the largest entry.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import logprobs
from flux_jax import train_step as ts
from flux_jax.data.batching import (
    SCORED_POSITION_KEYS,
    collate_pairs,
    score_window,
    scored_positions,
)
from flux_jax.data.packing import collate_shared_prefix
from flux_jax.data.tokenization import PreferenceExample
from flux_jax.models.qwen.model import build_model
from tests.train_fixtures import TINY

BUCKETS = (16, 32, 64)


def test_window_is_a_quarter_or_half_of_the_row():
    assert score_window(0, 64) == 16
    assert score_window(16, 64) == 16
    assert score_window(17, 64) == 32
    assert score_window(32, 64) == 32
    assert score_window(33, 64) is None  # saves less than half of the head: not worth a shape
    assert score_window(3, 10) == 3  # rounded up


def test_scored_positions_are_the_mask_columns_then_minus_one():
    mask = np.array([[0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]])
    assert scored_positions(mask, 4).tolist() == [[2, 3, 5, -1], [-1, -1, -1, -1]]
    with pytest.raises(ValueError, match="row 0 has 3 scored tokens, more than 2"):
        scored_positions(mask, 2)


def _random_head_inputs(seed: int):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(3, 17, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 13)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 13, (3, 17)), jnp.int32)
    mask = np.zeros((3, 17), np.int32)
    mask[0, 5:12] = 1
    mask[1, 1:4] = 1
    mask[2, 9:17] = 1
    return hidden, head, ids, mask


@pytest.mark.parametrize("chunk", [None, 3, 512])
def test_windowed_token_logprobs_equal_the_full_head(chunk):
    hidden, head, ids, mask = _random_head_inputs(0)
    positions = jnp.asarray(scored_positions(mask, 9))
    weights = jnp.asarray(np.random.default_rng(1).normal(size=mask.shape), jnp.float32)

    def total(h, w, scored):
        logps = logprobs.token_logprobs(
            h, w, ids, jnp.asarray(mask), chunk_size=chunk, scored_positions_BxW=scored
        )
        return (logps * weights).sum(), logps

    (full, full_logps), full_grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        hidden, head, None
    )
    (win, win_logps), win_grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        hidden, head, positions
    )
    assert float(jnp.abs(full_logps).min(where=mask == 1, initial=1.0)) > 0  # really scored
    # Per-token log-probs round like the logits they come from: atol scales with their size.
    token_atol = 1e-6 * float(jnp.abs(full_logps).max())
    np.testing.assert_allclose(win_logps, full_logps, rtol=1e-5, atol=token_atol)
    np.testing.assert_allclose(win, full, rtol=1e-5)  # a sum of many fp32 terms
    for a, b in zip(win_grads, full_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.abs(b).max()))


def test_window_column_zero_and_unlisted_tokens_are_not_scored():
    hidden, head, ids, mask = _random_head_inputs(2)
    mask[:, 0] = 1  # nothing predicts token 0: never scored in the standard layout
    listed = scored_positions(mask, 10)
    listed[0, 1] = -1  # drop one listed token: a window scores what it lists, no more
    logps = logprobs.token_logprobs(
        hidden, head, ids, jnp.asarray(mask), scored_positions_BxW=jnp.asarray(listed)
    )
    full = logprobs.token_logprobs(hidden, head, ids, jnp.asarray(mask))
    assert float(jnp.abs(logps[:, 0]).max()) == 0.0
    dropped = int(scored_positions(mask, 10)[0, 1])
    assert float(logps[0, dropped]) == 0.0 and float(full[0, dropped]) != 0.0
    np.testing.assert_allclose(
        logps.at[0, dropped].set(full[0, dropped]),
        full,
        rtol=1e-5,
        atol=1e-6 * float(jnp.abs(full).max()),  # rounding scales with the largest log-prob
    )


def _examples(n: int, seed: int) -> list[PreferenceExample]:
    """Long prompts, short responses: the responses fit a quarter or half of the row."""
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return rng.integers(3, TINY.vocab_size, int(rng.integers(lo, hi))).astype(np.int32)

    return [PreferenceExample(ids(10, 30), ids(1, 12), ids(1, 12), "test", i) for i in range(n)]


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, params, ref_params, batch):
    settings = ts.DPOSettings(logprob_chunk_size=8, sft_coef=0.1, kl_coef=0.05)

    def loss_fn(p):
        return ts.dpo_loss_fn(p, batch, graphdef=graphdef, ref_params=ref_params, settings=settings)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


@pytest.fixture(scope="module")
def models():
    graphdef, ref_params = ts.split_model(build_model(TINY, seed=0))
    leaves, treedef = jax.tree.flatten(ref_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return graphdef, jax.tree.unflatten(treedef, noisy), ref_params


@pytest.mark.parametrize("layout", ["standard", "prefix"])
def test_train_step_with_windows_equals_without(models, layout):
    graphdef, params, ref_params = models
    examples = _examples(6, seed=4)
    if layout == "standard":
        collate, keys = collate_pairs, SCORED_POSITION_KEYS
    else:
        collate, keys = collate_shared_prefix, ("scored_positions",)
    windowed = collate(examples, 0, BUCKETS)
    plain = collate(examples, 0, BUCKETS, score_windows=False)
    assert all(key in windowed for key in keys) and not any(key in plain for key in keys)
    width, row = (
        windowed[keys[0]].shape[1],
        windowed[keys[0].replace("scored_positions", "loss_mask")].shape[1],
    )
    assert width <= row // 2  # the head really ran on fewer positions
    (loss_w, metrics_w), grads_w = _loss_and_grads(graphdef, params, ref_params, windowed)
    (loss_p, metrics_p), grads_p = _loss_and_grads(graphdef, params, ref_params, plain)
    # Sums of many fp32 terms: relative tolerances (kl, a mean of tiny k3 terms, keeps an atol).
    np.testing.assert_allclose(loss_w, loss_p, rtol=1e-5)
    for key in ("chosen_logps", "rejected_logps", "kl", "sft_loss"):
        np.testing.assert_allclose(metrics_w[key], metrics_p[key], rtol=1e-5, atol=1e-7)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_p))
    diff = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(grads_w), jax.tree.leaves(grads_p), strict=True)
    )
    print(f"{layout}: W={width} of T={row}, loss {float(loss_w):.6f}, grad diff {diff / scale:.1e}")
    assert diff <= 1e-5 * scale  # gradient entries sum over every position: ~N ulps of scale
