"""The jitted DPO step: log-probs against transformers, invariances, and that training learns.

Tolerances: sequence log-probs within 1e-4 abs of transformers (fp32, sums of ~20 log-probs);
accumulation and padding invariances within 1e-6 relative to the largest gradient entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flux_jax
from flux_jax import batch_logprobs, optim
from flux_jax import train_step as ts
from flux_jax.grad_accum import accumulate_gradients, split_microbatches
from flux_jax.models.qwen.model import build_model
from tests.train_fixtures import TINY, random_pair_batch


def _torch_sequence_logps(hf_model, ids: np.ndarray, mask: np.ndarray, seg: np.ndarray):
    import torch

    with torch.no_grad():
        logits = hf_model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(seg.astype(np.int64)),
        ).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = torch.from_numpy(ids[:, 1:].astype(np.int64))
    token = logp.gather(-1, target[..., None])[..., 0] * torch.from_numpy(mask[:, 1:])
    return token.sum(-1).numpy()


@pytest.mark.parametrize("chunk", [None, 5])
def test_sequence_logprobs_match_transformers(tmp_path, chunk):
    from tests.hf_reference import make_hf_model

    hf_model = make_hf_model("qwen2_gqa_untied", vocab_size=TINY.vocab_size, seed=7)
    hf_model.save_pretrained(tmp_path)
    model = flux_jax.load_pretrained(tmp_path)
    graphdef, params = ts.split_model(model)
    batch = random_pair_batch(3, 14, seed=2)
    token_logps, _ = batch_logprobs.paired_token_logprobs(
        graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()}, chunk
    )
    ours = np.asarray(token_logps.sum(-1))
    ref = np.concatenate(
        [
            _torch_sequence_logps(
                hf_model,
                batch[f"{s}_input_ids"],
                batch[f"{s}_loss_mask"],
                batch[f"{s}_segment_ids"],
            )
            for s in ("chosen", "rejected")
        ]
    )
    print(f"chunk={chunk}: max |logps - transformers| = {np.max(np.abs(ours - ref)):.2e}")
    # Summed log-probs (|sum| ~ 50-80) from torch and XLA kernels: relative, as they vary by CPU.
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def _loss_and_grads(params, graphdef, batch, ref_params, settings):
    def fn(p, b, r):
        loss_fn = lambda p_, b_: ts.dpo_loss_fn(  # noqa: E731
            p_, b_, graphdef=graphdef, ref_params=r, settings=settings
        )
        return jax.value_and_grad(loss_fn, has_aux=True)(p, b)

    # Jitted: op-by-op execution of the scanned model is many times slower on CPU.
    return jax.jit(fn)(params, batch, ref_params)


def _perturbed(params, seed=1, scale=0.02):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def _max_rel_diff(a, b) -> float:
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b))
    return (
        max(
            float(jnp.max(jnp.abs(x - y)))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
        / scale
    )


@pytest.fixture(scope="module")
def tiny_setup():
    graphdef, ref_params = ts.split_model(build_model(TINY, seed=0))
    params = _perturbed(ref_params)  # policy != reference, so the loss has a gradient
    return graphdef, params, ref_params


def test_grad_accumulation_equals_full_batch(tiny_setup):
    graphdef, params, ref_params = tiny_setup
    settings = ts.DPOSettings(logprob_chunk_size=8)
    batch = {k: jnp.asarray(v) for k, v in random_pair_batch(8, 20, seed=3).items()}
    (_, full_metrics), full_grads = _loss_and_grads(params, graphdef, batch, ref_params, settings)
    grad_fn = lambda p, mb: _loss_and_grads(p, graphdef, mb, ref_params, settings)  # noqa: E731
    accumulate = jax.jit(lambda p, b: accumulate_gradients(grad_fn, p, split_microbatches(b, 4)))
    acc_grads, (_, acc_metrics) = accumulate(params, batch)
    rel = _max_rel_diff(acc_grads, full_grads)
    print(f"4 x 2 accumulation vs batch of 8: max rel grad diff {rel:.2e}")
    # Whole-model losses and gradients sum many fp32 terms in a different order: ~1e-7 per op,
    # more on other CPUs' kernels. A real accumulation bug is off by O(1).
    assert rel < 1e-5
    np.testing.assert_allclose(acc_metrics["loss"], full_metrics["loss"], rtol=1e-5)


def test_extra_padding_changes_nothing(tiny_setup):
    graphdef, params, ref_params = tiny_setup
    settings = ts.DPOSettings(logprob_chunk_size=8, sft_coef=0.1, kl_coef=0.05)
    short = {k: jnp.asarray(v) for k, v in random_pair_batch(4, 20, seed=4).items()}
    long = {k: jnp.asarray(v) for k, v in random_pair_batch(4, 20, seed=4, pad_to=37).items()}
    (loss_a, _), grads_a = _loss_and_grads(params, graphdef, short, ref_params, settings)
    (loss_b, _), grads_b = _loss_and_grads(params, graphdef, long, ref_params, settings)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)  # other shapes, other kernels
    assert _max_rel_diff(grads_b, grads_a) < 1e-5


def test_chunked_equals_unchunked_in_the_step(tiny_setup):
    graphdef, params, ref_params = tiny_setup
    batch = {k: jnp.asarray(v) for k, v in random_pair_batch(4, 20, seed=5).items()}
    (la, _), ga = _loss_and_grads(
        params, graphdef, batch, ref_params, ts.DPOSettings(logprob_chunk_size=None)
    )
    (lb, _), gb = _loss_and_grads(
        params, graphdef, batch, ref_params, ts.DPOSettings(logprob_chunk_size=3)
    )
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    assert _max_rel_diff(gb, ga) < 1e-5


def test_policy_equal_to_reference_gives_ln2(tiny_setup):
    graphdef, _, ref_params = tiny_setup
    batch = {k: jnp.asarray(v) for k, v in random_pair_batch(4, 20, seed=6).items()}
    (loss, metrics), _ = _loss_and_grads(ref_params, graphdef, batch, ref_params, ts.DPOSettings())
    # ln 2 and a zero margin, up to beta (0.1) x the rounding of four summed log-probs.
    tol = 1e-7 * (abs(float(metrics["chosen_logps"])) + abs(float(metrics["rejected_logps"])))
    np.testing.assert_allclose(loss, np.log(2.0), rtol=0, atol=tol)
    assert abs(float(metrics["reward_margin"])) < tol


def test_thirty_steps_learn_and_compile_once(tiny_setup):
    graphdef, _, ref_params = tiny_setup
    params = jax.tree.map(jnp.copy, ref_params)
    tx = optim.make_optimizer(learning_rate=1e-3, num_steps=30)
    schedule = optim.make_schedule(learning_rate=1e-3, num_steps=30)
    state = ts.init_train_state(params, tx)
    step = ts.make_train_step(
        graphdef, tx, schedule, ts.DPOSettings(logprob_chunk_size=8, grad_accum_steps=2)
    )
    batches = [ts.shard_batch(random_pair_batch(8, 24, seed=s), None) for s in range(4)]
    history = []
    for i in range(30):
        state, metrics = step(state, batches[i % 4], ref_params)
        history.append({k: float(v) for k, v in metrics.items()})
    assert step._cache_size() == 1  # one shape, one compilation
    assert int(state["step"]) == 30
    first, last = history[0], history[-1]
    print(f"loss {first['loss']:.4f} -> {last['loss']:.4f}, margin {last['reward_margin']:.3f}")
    assert first["loss"] == pytest.approx(np.log(2.0), rel=1e-5)
    assert last["loss"] < 0.6 * first["loss"]
    assert last["reward_margin"] > 0
    assert np.mean([h["reward_accuracy"] for h in history[-4:]]) > np.mean(
        [h["reward_accuracy"] for h in history[:4]]
    )
    for key in ("grad_norm", "learning_rate", "tokens", "chosen_reward", "rejected_reward"):
        assert key in last


def test_precomputed_and_reference_free(tiny_setup):
    graphdef, params, ref_params = tiny_setup
    batch = {k: jnp.asarray(v) for k, v in random_pair_batch(4, 20, seed=8).items()}
    ref_c, ref_r = ts.make_ref_logps_step(graphdef, 8)(ref_params, batch)
    online, _ = ts.dpo_loss_fn(
        params, batch, graphdef=graphdef, ref_params=ref_params, settings=ts.DPOSettings()
    )
    pre, _ = ts.dpo_loss_fn(
        params,
        {**batch, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r},
        graphdef=graphdef,
        ref_params=None,
        settings=ts.DPOSettings(),
    )
    np.testing.assert_allclose(online, pre, rtol=1e-5)  # reference log-probs from another program
    free, _ = ts.dpo_loss_fn(
        params,
        batch,
        graphdef=graphdef,
        ref_params=None,
        settings=ts.DPOSettings(reference_free=True),
    )
    assert abs(float(free) - float(online)) > 1e-4
