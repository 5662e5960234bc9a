"""Shared-prefix and packed batches give the standard layout's log-probs, loss and gradients.

Tolerances: fp32 on CPU; per-pair log-probs within 1e-5 absolute (sums of ~20 log-probs),
the loss within 1e-6 relative and gradients within 1e-5 relative to the largest entry.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import batch_logprobs, logprobs
from flux_jax import train_step as ts
from flux_jax.data.batching import collate_pairs
from flux_jax.data.packing import assign_rows, collate_shared_prefix, max_pairs_per_row
from flux_jax.data.tokenization import PreferenceExample
from flux_jax.grad_accum import accumulate_gradients, split_microbatches
from flux_jax.models.qwen.layers import branch_segment_mask
from flux_jax.models.qwen.model import build_model
from tests.train_fixtures import TINY

BUCKETS = (16, 32, 64)


def _examples(n: int, seed: int, *, empty_prompt: bool = False) -> list[PreferenceExample]:
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return rng.integers(3, TINY.vocab_size, int(rng.integers(lo, hi))).astype(np.int32)

    out = []
    for i in range(n):
        prompt = np.zeros(0, np.int32) if empty_prompt and i == 0 else ids(1, 12)
        out.append(PreferenceExample(prompt, ids(1, 15), ids(1, 15), "test", i))
    return out


def test_branch_mask_by_hand():
    # Row: pair 1 = prompt(2) chosen(2) rejected(1), pair 2 = prompt(1) chosen(1) rejected(1), pad.
    seg = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 0]])
    branch = jnp.asarray([[0, 0, 1, 1, 2, 0, 1, 2, 0]])
    expected = np.array(
        [
            # keys: p  p  c  c  r | p  c  r | pad
            [1, 0, 0, 0, 0, 0, 0, 0, 0],  # prompt 0
            [1, 1, 0, 0, 0, 0, 0, 0, 0],  # prompt 1
            [1, 1, 1, 0, 0, 0, 0, 0, 0],  # chosen 0
            [1, 1, 1, 1, 0, 0, 0, 0, 0],  # chosen 1
            [1, 1, 0, 0, 1, 0, 0, 0, 0],  # rejected 0: the prompt and itself, not the chosen
            [0, 0, 0, 0, 0, 1, 0, 0, 0],  # pair 2 prompt: nothing of pair 1
            [0, 0, 0, 0, 0, 1, 1, 0, 0],  # pair 2 chosen
            [0, 0, 0, 0, 0, 1, 0, 1, 0],  # pair 2 rejected
            [0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding sees padding only
        ],
        dtype=bool,
    )
    mask = branch_segment_mask(seg, branch)
    assert mask.shape == (1, 1, 9, 9)
    np.testing.assert_array_equal(np.asarray(mask[0, 0]), expected)


def test_collate_layout_by_hand():
    a = PreferenceExample(np.array([5, 6, 7]), np.array([8, 9]), np.array([10]), "t", 0)
    b = PreferenceExample(np.array([11]), np.array([12]), np.array([13, 14]), "t", 1)
    batch = collate_shared_prefix([a, b], 0, (16,), pairs_per_row=2)
    np.testing.assert_array_equal(batch["pair_order"], [[0, 1]])  # longest (a, 6 tokens) first
    row = {k: v[0].tolist() for k, v in batch.items() if v.shape[1] == 16}
    assert row["input_ids"][:10] == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert row["segment_ids"][:11] == [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0]
    assert row["branch_ids"][:10] == [0, 0, 0, 1, 1, 2, 0, 1, 2, 2]
    assert row["positions"][:10] == [0, 1, 2, 3, 4, 3, 0, 1, 1, 2]
    assert row["loss_mask"][:11] == [0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0]
    # The first rejected token of each pair is predicted by its pair's last prompt token.
    assert row["source_index"][3:10] == [2, 3, 2, 5, 6, 6, 8]

    unshared = collate_shared_prefix([a], 0, (16,), share_prefix=False)
    assert unshared["input_ids"][0, :9].tolist() == [5, 6, 7, 8, 9, 5, 6, 7, 10]
    assert unshared["branch_ids"][0, :9].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2]
    assert unshared["positions"][0, :9].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert unshared["loss_mask"][0, :9].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1]


def test_assign_rows_balances_and_fills():
    rows = assign_rows([10, 9, 8, 1, 1, 1], 3)
    assert sorted(sum(rows, [])) == list(range(6)) and all(len(r) == 3 for r in rows)
    assert sorted(sum([10, 9, 8, 1, 1, 1][i] for i in r) for r in rows) == [12, 18]
    assert max_pairs_per_row(16, 16, 8) == 2  # 8 rows over 8 devices
    assert max_pairs_per_row(8, 8, 8) == 1
    assert max_pairs_per_row(16, 16, 2, limit=3) == 2
    with pytest.raises(ValueError, match="do not fill"):
        assign_rows([1, 2, 3], 2)


def test_source_index_path_matches_the_shift():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 11, (2, 9)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 9)), jnp.int32).at[:, 0].set(0)
    source = jnp.broadcast_to(jnp.maximum(jnp.arange(9) - 1, 0), (2, 9))

    def total(h, w, src):
        kw = {"chunk_size": 4} if src is None else {"chunk_size": 4, "source_index_BxT": src}
        return logprobs.token_logprobs(h, w, ids, mask, **kw).sum()

    base = jax.grad(total, argnums=(0, 1))(hidden, head, None)
    gathered = jax.grad(total, argnums=(0, 1))(hidden, head, source)
    for a, b in zip(base, gathered, strict=True):
        # Gradients sum many fp32 terms: rounding scales with the largest entry, not each one.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))

    # Hidden 2 predicts tokens 3 and 5, hidden 4 nothing: against a naive log-softmax.
    twice = source.at[:, 5].set(2)
    scored = jnp.ones_like(mask).at[:, 0].set(0)

    def naive(h, w):
        logp = jax.nn.log_softmax(h[jnp.arange(2)[:, None], twice] @ w, axis=-1)
        return (jnp.take_along_axis(logp, ids[:, :, None], axis=-1)[..., 0] * scored).sum()

    def ours(h, w):
        return logprobs.token_logprobs(
            h, w, ids, scored, chunk_size=4, source_index_BxT=twice
        ).sum()

    np.testing.assert_allclose(ours(hidden, head), naive(hidden, head), rtol=1e-5)
    d_ours = jax.grad(ours, argnums=(0, 1))(hidden, head)
    d_naive = jax.grad(naive, argnums=(0, 1))(hidden, head)
    for a, b in zip(d_ours, d_naive, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
    assert float(jnp.abs(d_ours[0][:, 4]).max()) == 0.0


_SETTINGS = ts.DPOSettings(logprob_chunk_size=8, sft_coef=0.1, kl_coef=0.05)


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, params, ref_params, batch):
    """Per-pair (chosen, rejected) log-probs in the batch's pair order, loss, metrics, grads."""

    def loss_fn(p):
        return ts.dpo_loss_fn(
            p, batch, graphdef=graphdef, ref_params=ref_params, settings=_SETTINGS
        )

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    pairs = batch_logprobs.pair_sums(
        batch_logprobs.token_logprobs(graphdef, params, batch, 8)[0], batch
    )
    return pairs, loss, metrics, grads


def _max_rel_diff(a, b) -> float:
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b))
    diffs = [
        jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(float(d) for d in diffs) / scale


@pytest.fixture(scope="module")
def standard():
    """A tiny policy != its reference, 8 pairs of mixed lengths (one with an empty prompt),
    and the standard layout's results."""
    graphdef, ref_params = ts.split_model(build_model(TINY, seed=0))
    leaves, treedef = jax.tree.flatten(ref_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(treedef, noisy)
    examples = _examples(8, seed=3, empty_prompt=True)
    batch = ts.shard_batch(collate_pairs(examples, 0, BUCKETS), None)
    return graphdef, params, ref_params, examples, _run(graphdef, params, ref_params, batch)


@pytest.mark.parametrize("pairs_per_row,share_prefix", [(1, True), (4, True), (2, False)])
def test_layouts_match_the_standard_one(standard, pairs_per_row, share_prefix):
    graphdef, params, ref_params, examples, (std_pairs, loss_s, m_s, grads_s) = standard
    host = collate_shared_prefix(
        examples, 0, BUCKETS, pairs_per_row=pairs_per_row, share_prefix=share_prefix
    )
    assert host["input_ids"].shape[0] == 8 // pairs_per_row
    pairs, loss_p, m_p, grads_p = _run(graphdef, params, ref_params, ts.shard_batch(host, None))

    order = host["pair_order"].reshape(-1)
    # Summed log-probs (|sum| ~ 10-60) differ across CPUs' kernels by ~2e-7 relative (1.1e-5 on
    # -54.8 measured on an AVX2-only CPU): relative tolerances. The DPO loss and reward margin
    # carry beta (0.1) times those log-probs' rounding, ~1e-7 x (|chosen| + |rejected|) at most.
    for ours, ref in zip(pairs, std_pairs, strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref)[order], rtol=1e-5)
    np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
    logps_scale = abs(float(m_s["chosen_logps"])) + abs(float(m_s["rejected_logps"]))
    for key in ("reward_margin", "sft_loss", "kl", "chosen_logps"):
        np.testing.assert_allclose(m_p[key], m_s[key], rtol=1e-5, atol=1e-7 * logps_scale)
    rel = _max_rel_diff(grads_p, grads_s)
    print(f"S={pairs_per_row} share={share_prefix}: loss {float(loss_p):.6f}, grad rel {rel:.1e}")
    assert rel < 1e-5
    assert float(m_s["kl"]) > 0  # not vacuous: the policy differs from the reference


def test_paired_scoring_refuses_packed_rows():
    """paired_token_logprobs reads chosen_*/rejected_* rows: a packed batch gets a ValueError
    naming the function that scores both layouts, not a KeyError from inside the pass."""
    host = collate_shared_prefix(
        _examples(2, seed=5), 0, BUCKETS, pairs_per_row=2, share_prefix=True
    )
    with pytest.raises(ValueError, match="call batch_logprobs.token_logprobs"):
        batch_logprobs.paired_token_logprobs(None, None, host, 8)


def test_packed_accumulation_and_precomputed_reference(standard):
    graphdef, params, ref_params, examples, (_, _, m_s, _) = standard
    # Reference log-probs scored on packed rows, attached to the examples, collated again.
    packed = ts.shard_batch(collate_shared_prefix(examples, 0, BUCKETS, pairs_per_row=2), None)
    ref_c, ref_r = ts.make_ref_logps_step(graphdef, 8)(ref_params, packed)
    order = np.asarray(packed["pair_order"]).reshape(-1)
    ref_by_example = np.zeros((8, 2), np.float32)
    ref_by_example[order] = np.stack([np.asarray(ref_c), np.asarray(ref_r)], axis=1)
    with_ref = [
        dataclasses.replace(e, ref_logps=(float(c), float(r)))
        for e, (c, r) in zip(examples, ref_by_example, strict=True)
    ]
    batch = ts.shard_batch(collate_shared_prefix(with_ref, 0, BUCKETS, pairs_per_row=2), None)
    assert batch["ref_chosen_logps"].shape == (4, 2)
    settings = ts.DPOSettings(logprob_chunk_size=8, sft_coef=0.1)

    def grad_fn(p, mb):
        loss_fn = lambda p_, b_: ts.dpo_loss_fn(  # noqa: E731
            p_, b_, graphdef=graphdef, ref_params=None, settings=settings
        )
        return jax.value_and_grad(loss_fn, has_aux=True)(p, mb)

    # Two micro-batches of 2 rows x 2 pairs: each must reduce over its own pairs only.
    accumulate = jax.jit(lambda p, b: accumulate_gradients(grad_fn, p, split_microbatches(b, 2)))
    _, (loss_acc, metrics) = accumulate(params, batch)
    # Against the standard layout's DPO and SFT terms (its total also has a KL term).
    np.testing.assert_allclose(loss_acc, m_s["dpo_loss"] + 0.1 * m_s["sft_loss"], rtol=1e-5)
    # The margin (~3e-3) is a difference of summed log-probs: its rounding scales with them.
    logps_scale = abs(float(m_s["chosen_logps"])) + abs(float(m_s["rejected_logps"]))
    np.testing.assert_allclose(
        metrics["reward_margin"], m_s["reward_margin"], rtol=1e-4, atol=1e-7 * logps_scale
    )
    counts = ts.batch_token_counts(batch)
    std_counts = ts.batch_token_counts(collate_pairs(examples, 0, BUCKETS))
    assert float(counts["response_tokens"]) == float(std_counts["response_tokens"])
    assert float(counts["tokens"]) < float(std_counts["tokens"])  # each prompt once


@pytest.mark.slow  # ~26 s; test_layouts_match_the_standard_one checks the step by default
def test_trainer_with_prefix_sharing_and_packing_matches_standard(tmp_path, monkeypatch):
    import shutil

    from flux_jax import FluxTrainer
    from flux_jax.data import packing
    from flux_jax.sharding import mesh_from_config
    from flux_jax.trainer import DEMO_TRAIN
    from tests.test_trainer import _config

    data = str(tmp_path / "pairs.jsonl")  # not the demo path: no automatic eval split
    shutil.copyfile(DEMO_TRAIN, data)
    # Two devices; max_length 128 over ~48-token shared pairs: 8 pairs in 4 rows of 2.
    mesh = mesh_from_config({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.devices()[:2])
    rows_seen = []
    collate = packing.collate_shared_prefix

    def recording_collate(*args, **kwargs):
        batch = collate(*args, **kwargs)
        rows_seen.append(batch["pair_order"].shape)
        return batch

    monkeypatch.setattr(packing, "collate_shared_prefix", recording_collate)
    losses, tokens = {}, {}
    for name, flags in {
        "standard": {"prefix_sharing": False},
        "packed": {"prefix_sharing": True, "packing": True},
    }.items():
        # Same batches in both layouts: length grouping would sort by each layout's own length.
        overrides = {"data.max_length": 128, "data.group_by_length": False}
        overrides.update({f"model.{k}": v for k, v in flags.items()})
        config = _config(tmp_path / name, num_steps=3, **overrides)
        trainer = FluxTrainer(config, mesh=mesh)
        result = trainer.fit(prompts=data)
        losses[name] = [h["loss"] for h in result.history]
        tokens[name] = [h["tokens"] for h in result.history]
    print(f"losses {losses}, real tokens {tokens}")
    # DPO losses carry beta (0.1) times the rounding of the summed log-probs (~1e-6 relative).
    logps_scale = max(abs(h["chosen_logps"]) + abs(h["rejected_logps"]) for h in result.history)
    np.testing.assert_allclose(losses["packed"], losses["standard"], atol=1e-7 * logps_scale)
    assert all(p < s for p, s in zip(tokens["packed"], tokens["standard"], strict=True))
    assert len(set(np.round(losses["standard"], 6))) == 3  # the steps differ: it trains
    assert set(rows_seen) == {(4, 2)}  # 4 rows of 2 pairs
