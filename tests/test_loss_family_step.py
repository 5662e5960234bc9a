"""The loss family inside the jitted train step on the tiny model: BCO's running mean carried in
the train state (and checkpointed and restored exactly), SimPO with no reference at all, LD-DPO
from the step's per-token log-probs, WPO weights and TRL's logits/* metrics from the LM head's
statistics (against TRL's own fused head and loss, and float64 NumPy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax import batch_logprobs, dpo, logprobs, optim
from flux_jax import train_step as ts
from flux_jax.checkpoint import TrainCheckpointer, abstract_of
from flux_jax.models.qwen.model import build_model
from tests.train_fixtures import TINY, random_pair_batch


@pytest.fixture(scope="module")
def tiny():
    graphdef, ref_params = ts.split_model(build_model(TINY, seed=0))
    leaves, treedef = jax.tree.flatten(ref_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [
            x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ],
    )
    return graphdef, params, ref_params


def _batch(seed, n=4):
    return {k: jnp.asarray(v) for k, v in random_pair_batch(n, 16, seed=seed).items()}


@pytest.mark.slow  # two compilations of the whole step and a checkpoint: ~15 s on a quiet CPU
def test_bco_running_mean_lives_in_the_train_state_and_resumes_exactly(tiny, tmp_path):
    graphdef, params, ref_params = tiny
    settings = ts.DPOSettings(loss_type="bco_pair", beta=0.5, logprob_chunk_size=8)
    tx = optim.make_optimizer(learning_rate=1e-3, num_steps=4)
    schedule = optim.make_schedule(learning_rate=1e-3, num_steps=4)
    state = ts.init_train_state(
        jax.tree.map(jnp.copy, params), tx, dpo.initial_loss_state(settings)
    )
    step = ts.make_train_step(graphdef, tx, schedule, settings)
    batch_means = []
    for seed in range(3):
        state, m = step(state, _batch(seed), ref_params)
        batch_means.append(float(m["bco/batch_reward_mean"]))
        # delta of this step = the mean of the batch means so far, this one included
        np.testing.assert_allclose(float(m["bco/reward_mean"]), np.mean(batch_means), rtol=1e-5)
    assert float(state["loss_state"]["bco_batches"]) == 3.0
    np.testing.assert_allclose(
        float(state["loss_state"]["bco_reward_mean"]), np.mean(batch_means), rtol=1e-5
    )

    ckpt = TrainCheckpointer(tmp_path / "ckpt", save_interval_steps=1, async_save=False)
    ckpt.save(3, state, force=True)
    fresh = ts.init_train_state(
        jax.tree.map(jnp.copy, params), tx, dpo.initial_loss_state(settings)
    )
    restored = ckpt.restore(3, abstract_state=abstract_of(fresh))
    for key in ("bco_reward_mean", "bco_batches"):
        assert float(restored["loss_state"][key]) == float(state["loss_state"][key])
    ckpt.close()
    # The next step from the restored state equals the next step from the live one.
    _, live = step(state, _batch(9), ref_params)
    _, resumed = step(restored, _batch(9), ref_params)
    assert float(live["loss"]) == float(resumed["loss"])
    assert float(live["bco/reward_mean"]) == float(resumed["bco/reward_mean"])


def test_simpo_runs_without_any_reference(tiny):
    graphdef, params, _ = tiny
    settings = ts.DPOSettings(
        loss_type="simpo", beta=2.0, simpo_gamma=0.5, reference_free=True, logprob_chunk_size=8
    )
    assert not settings.needs_reference
    batch = _batch(3)
    loss, m = ts.dpo_loss_fn(params, batch, graphdef=graphdef, ref_params=None, settings=settings)
    tok, mask = batch_logprobs.paired_token_logprobs(graphdef, params, batch, 8)
    sums = np.asarray(tok, np.float64).sum(1)
    counts = np.asarray(mask)[:, 1:].sum(1).astype(np.float64)
    a = sums / counts
    z = 2.0 * (a[:4] - a[4:]) - 0.5
    np.testing.assert_allclose(float(loss), np.mean(np.logaddexp(0.0, -z)), rtol=1e-5)
    assert "simpo/margin" in m


@pytest.mark.slow  # LD-DPO's formula is checked against TRL in test_loss_family_trl.py
def test_ld_dpo_in_the_step_uses_the_shared_length(tiny):
    graphdef, params, ref_params = tiny
    batch = _batch(4)
    settings = ts.DPOSettings(ld_alpha=0.3, logprob_chunk_size=8)
    loss, _ = ts.dpo_loss_fn(
        params, batch, graphdef=graphdef, ref_params=ref_params, settings=settings
    )
    tok, mask = (
        np.asarray(x) for x in batch_logprobs.paired_token_logprobs(graphdef, params, batch, 8)
    )
    ref_tok = np.asarray(batch_logprobs.paired_token_logprobs(graphdef, ref_params, batch, 8)[0])
    mask = mask.copy()
    mask[:, 0] = 0
    pos = np.cumsum(mask, 1) * mask
    n = mask.sum(1)
    shared = np.tile(np.minimum(n[:4], n[4:]), 2)[:, None]
    w = np.where((pos > 0) & (pos <= shared), 1.0, np.where(pos > shared, 0.3, 0.0))
    pol, ref = (tok * w).sum(1), (ref_tok * w).sum(1)
    h = (pol[:4] - ref[:4]) - (pol[4:] - ref[4:])
    np.testing.assert_allclose(float(loss), np.mean(np.logaddexp(0.0, -0.1 * h)), rtol=1e-5)
    plain, _ = ts.dpo_loss_fn(
        params, batch, graphdef=graphdef, ref_params=ref_params, settings=ts.DPOSettings()
    )
    assert float(plain) != float(loss)


def _hidden_and_head(graphdef, params, batch):
    """The policy's final hidden states [2B, T, D] and head [D, V] of the paired rows."""
    model = nnx.merge(graphdef, params)
    paired = batch_logprobs.paired_inputs(batch)
    hidden = model(
        paired["input_ids"],
        paired["positions"],
        segment_ids_BxT=paired["segment_ids"],
        return_hidden=True,
    )
    return np.asarray(hidden), np.asarray(model.lm_head_weight()), paired


def logsumexp(x, axis, keepdims=False):
    top = x.max(axis=axis, keepdims=True)
    out = top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis)


def _float64_head(hidden_NxTxD, head_DxV, ids_NxT, mask_NxT):
    """log p(token), log sum_v p_v^2 and the mean logit per scored token, in float64 NumPy."""
    logits = np.einsum("ntd,dv->ntv", hidden_NxTxD.astype(np.float64), head_DxV)[:, :-1]
    log_p = logits - logsumexp(logits, axis=-1, keepdims=True)
    target = np.take_along_axis(log_p, ids_NxT[:, 1:, None], axis=-1)[..., 0]
    scored = np.asarray(mask_NxT, bool)[:, 1:]

    def aligned(x):
        return np.pad(np.where(scored, x, 0.0), ((0, 0), (1, 0)))

    return (
        aligned(target),
        aligned(logsumexp(2 * log_p, axis=-1)),
        aligned(logits.mean(axis=-1)),
    )


def test_wpo_and_logits_metrics_in_the_step_match_trl_and_float64(tiny):
    pytest.importorskip("trl")
    from tests import trl_referee

    graphdef, params, ref_params = tiny
    batch = _batch(5)
    beta = 0.3
    settings = ts.DPOSettings(
        beta=beta, use_weighting=True, logits_metrics=True, logprob_chunk_size=8
    )
    loss, m = ts.dpo_loss_fn(
        params, batch, graphdef=graphdef, ref_params=ref_params, settings=settings
    )
    hidden, head, paired = _hidden_and_head(graphdef, params, batch)
    ids, mask = np.asarray(paired["input_ids"]), np.asarray(paired["loss_mask"])
    ref_tok = np.asarray(
        batch_logprobs.paired_token_logprobs(graphdef, ref_params, batch, 8)[0], np.float64
    )
    ref_sums = ref_tok.sum(1)

    # Float64 NumPy, from WPO eq. 2 with sec. 3.2's sampling-aligned probabilities.
    logp, log_sum_sq, mean_logits = _float64_head(hidden, head, ids, mask)
    scored = mask.copy()
    scored[:, 0] = 0
    n = scored.sum(1)
    log_w = ((logp - log_sum_sq) * scored).sum(1) / np.maximum(n, 1)
    w_pair = np.exp(log_w[:4] + log_w[4:])
    sums = logp.sum(1)
    h = (sums[:4] - ref_sums[:4]) - (sums[4:] - ref_sums[4:])
    expected = np.mean(w_pair * np.logaddexp(0.0, -beta * h))
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(float(m["wpo/weight"]), w_pair.mean(), rtol=2e-5)
    chosen_logits = (mean_logits[:4] * scored[:4]).sum() / scored[:4].sum()
    rejected_logits = (mean_logits[4:] * scored[4:]).sum() / scored[4:].sum()
    np.testing.assert_allclose(float(m["logits/chosen"]), chosen_logits, rtol=1e-5)
    np.testing.assert_allclose(float(m["logits/rejected"]), rejected_logits, rtol=1e-5)

    # TRL 1.16: its fused LM head on the same hidden states and head, then DPOTrainer's loss.
    trl_head = trl_referee.trl_lm_head_outputs(hidden, head, ids)
    trl_loss, trl_metrics = trl_referee.trl_dpo_loss(
        trl_head["log_probs"],
        mask,
        ref_sums[:4],
        ref_sums[4:],
        loss_type=["sigmoid"],
        beta=beta,
        use_weighting=True,
        log_sum_sq_NxT=trl_head["log_sum_sq_probs"],
        mean_logits_NxT=trl_head["mean_logits"],
        with_metrics=True,
    )
    np.testing.assert_allclose(float(loss), trl_loss, rtol=2e-5)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(
            float(m[f"logits/{side}"]), trl_metrics[f"logits/{side}"], rtol=1e-5
        )

    # Off by default: the head computes no statistics.
    assert ts.DPOSettings().lm_head_stats == ()


@pytest.mark.parametrize(
    "layout",
    [
        "scored_positions",  # the trainer's batches (score windows)
        pytest.param("standard", marks=pytest.mark.slow),
        pytest.param("source_index", marks=pytest.mark.slow),
    ],
)
def test_lm_head_statistics_carry_no_gradient_and_match_float64(layout):
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 11, 8, 37
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, v, (b, t)))
    mask = np.asarray(rng.integers(0, 2, (b, t)))
    mask[:, 0] = 0
    options = {"chunk_size": 4}
    if layout == "source_index":  # the standard layout's sources, spelled out
        sources_T = np.maximum(np.arange(t) - 1, 0)
        options["source_index_BxT"] = jnp.asarray(np.tile(sources_T, (b, 1)))
    elif layout == "scored_positions":
        cols = [np.flatnonzero(row) for row in mask]
        width = max(len(c) for c in cols)
        options["scored_positions_BxW"] = jnp.asarray(
            [np.pad(c, (0, width - len(c)), constant_values=-1) for c in cols]
        )
    names = logprobs.HEAD_STATS

    def run(head_DxV):
        return logprobs.token_logprobs_and_stats(
            hidden, head_DxV, ids, jnp.asarray(mask), stats=names, **options
        )

    logps, stats = run(head)
    want_logp, want_lss, want_mean = _float64_head(
        np.asarray(hidden), np.asarray(head, np.float64), np.asarray(ids), mask
    )
    np.testing.assert_allclose(np.asarray(logps), want_logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["log_sum_sq_probs"]), want_lss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["mean_logits"]), want_mean, rtol=1e-5, atol=1e-6)
    # TRL marks them non-differentiable: adding them to the objective changes no gradient.
    g_plain = jax.jit(jax.grad(lambda w: run(w)[0].sum()))(head)
    g_with = jax.jit(
        jax.grad(lambda w: run(w)[0].sum() + sum(x.sum() for x in run(w)[1].values()))
    )(head)
    np.testing.assert_array_equal(np.asarray(g_plain), np.asarray(g_with))
