"""Chunked sequence log-probs: against a float64 NumPy reference and plain autodiff, chunked vs
unchunked, masking, bf16 inputs, sharded inputs, and the compiled memory saving at Qwen's
vocabulary size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from flux_jax import logprobs
from flux_jax.logprob_chunk import capped_chunk_size, lm_head_chunk_size
from flux_jax.logprobs import token_counts

# Jitted once per static configuration: eager op-by-op dispatch would dominate the test time.
_STATIC = ("chunk_size", "compute_dtype")
sequence_logprobs = jax.jit(logprobs.sequence_logprobs, static_argnames=_STATIC)
token_logprobs = jax.jit(logprobs.token_logprobs, static_argnames=_STATIC)
B, T, D, V = 3, 14, 16, 50  # T - 1 = 13 scored positions: prime, so most chunk sizes need padding


def _inputs(seed: int = 0, batch: int = B, vocab: int = V):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, T, D)).astype(np.float32)
    w = (rng.normal(size=(D, vocab)) / np.sqrt(D)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(batch, T)).astype(np.int32)
    # Prompt then response then padding, with per-row boundaries, like real DPO rows.
    pos = np.arange(T)[None, :]
    start = rng.integers(1, 6, size=(batch, 1))
    end = rng.integers(8, T + 1, size=(batch, 1))
    mask = ((pos >= start) & (pos < end)).astype(np.int32)
    return jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(ids), jnp.asarray(mask)


def _numpy_reference(hidden, w, ids, mask):
    """Float64 log_softmax + gather, written from the definition (no shared code)."""
    hidden, w, ids, mask = (np.asarray(x) for x in (hidden, w, ids, mask))
    logits = hidden.astype(np.float64) @ w.astype(np.float64)  # [B, T, V]
    logits = logits - logits.max(-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token = np.zeros(ids.shape)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                token[b, t] = log_softmax[b, t - 1, ids[b, t]]
    return token, token.sum(-1), mask[:, 1:].sum(-1)


def _autodiff_reference(hidden, w, ids, mask):
    """The textbook jnp version (full logits, gather), differentiated by plain JAX autodiff."""
    log_softmax = jax.nn.log_softmax(hidden[:, :-1] @ w, axis=-1)
    picked = jnp.take_along_axis(log_softmax, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(mask[:, 1:].astype(bool), picked, 0.0).sum(-1)


def test_matches_numpy_reference():
    hidden, w, ids, mask = _inputs()
    ref_token, ref_seq, ref_counts = _numpy_reference(hidden, w, ids, mask)
    for chunk in (None, 4):
        logps, counts = sequence_logprobs(hidden, w, ids, mask, chunk_size=chunk)
        assert logps.dtype == jnp.float32 and logps.shape == (B,)
        np.testing.assert_allclose(logps, ref_seq, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(counts, ref_counts)
        tok = token_logprobs(hidden, w, ids, mask, chunk_size=chunk)
        np.testing.assert_allclose(tok, ref_token, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 13, 100])
def test_chunked_equals_unchunked_values_and_grads(chunk):
    hidden, w, ids, mask = _inputs(1)
    weights = jnp.asarray([0.7, -1.3, 2.0])  # a non-uniform cotangent per sequence

    def objective(hidden, w, chunk_size):
        logps, _ = logprobs.sequence_logprobs(hidden, w, ids, mask, chunk_size=chunk_size)
        return (logps * weights).sum()

    grad_fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)), static_argnums=2)
    val_ref, (gh_ref, gw_ref) = grad_fn(hidden, w, None)
    val, (gh, gw) = grad_fn(hidden, w, chunk)
    np.testing.assert_allclose(val, val_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gh, gh_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-5)
    # The gradient is real: not all zero, and zero on hidden rows that predict nothing.
    assert float(jnp.abs(gw).max()) > 1e-3
    predicts_nothing = np.asarray(mask[:, 1:]) == 0
    assert np.all(np.asarray(gh)[:, :-1][predicts_nothing] == 0)
    assert np.all(np.asarray(gh)[:, -1] == 0)  # the last position predicts no token


def test_custom_vjp_matches_plain_autodiff():
    hidden, w, ids, mask = _inputs(6)
    weights = jnp.asarray([1.5, -0.4, 0.9])

    def ours(hidden, w):
        return (logprobs.sequence_logprobs(hidden, w, ids, mask, chunk_size=5)[0] * weights).sum()

    def reference(hidden, w):
        return (_autodiff_reference(hidden, w, ids, mask) * weights).sum()

    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(hidden, w)
    want = jax.jit(jax.grad(reference, argnums=(0, 1)))(hidden, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_masked_tokens_do_not_contribute():
    hidden, w, ids, mask = _inputs(2)
    scramble = jnp.asarray(np.random.default_rng(3).integers(0, V, size=ids.shape), jnp.int32)
    ids_changed = jnp.where(mask.astype(bool), ids, scramble)
    assert not np.array_equal(ids_changed, ids)
    mask_col0 = mask.at[:, 0].set(1)  # position 0 is never scored, whatever the mask says
    for chunk in (None, 4):
        logps, _ = sequence_logprobs(hidden, w, ids, mask, chunk_size=chunk)
        changed, _ = sequence_logprobs(hidden, w, ids_changed, mask_col0, chunk_size=chunk)
        np.testing.assert_array_equal(logps, changed)
        tok = token_logprobs(hidden, w, ids, mask, chunk_size=chunk)
        assert np.all(np.asarray(tok)[np.asarray(mask) == 0] == 0)
    # And a masked-in token does count: dropping one changes the sum.
    b, t = 0, int(np.argmax(np.asarray(mask[0])))
    fewer, counts = sequence_logprobs(hidden, w, ids, mask.at[b, t].set(0), chunk_size=4)
    assert float(fewer[0]) != float(logps[0])
    np.testing.assert_array_equal(counts, token_counts(mask) - jnp.asarray([1, 0, 0]))


def test_bf16_inputs_accumulate_in_fp32():
    hidden, w, ids, mask = _inputs(4)
    hidden_bf, w_bf = hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    logps_bf, _ = sequence_logprobs(
        hidden_bf, w_bf, ids, mask, chunk_size=4, compute_dtype=jnp.bfloat16
    )
    assert logps_bf.dtype == jnp.float32
    # Same bf16 values upcast to fp32: bf16 x bf16 products are exact in fp32, so an fp32
    # accumulation matches to fp32 rounding. Rounding the logits to bf16 would miss this by ~1e-2.
    logps_exact, _ = sequence_logprobs(
        hidden_bf.astype(jnp.float32), w_bf.astype(jnp.float32), ids, mask, chunk_size=None
    )
    np.testing.assert_allclose(logps_bf, logps_exact, rtol=1e-5, atol=1e-4)
    # Against the unrounded fp32 inputs the only error is the bf16 input rounding (relative 2^-9
    # per element): with logits ~ N(0, 1) that is well inside 0.02 per token over <= 13 tokens.
    logps_fp32, _ = sequence_logprobs(hidden, w, ids, mask, chunk_size=None)
    np.testing.assert_allclose(logps_bf, logps_fp32, atol=0.02 * 13)
    grads = jax.jit(
        jax.grad(
            lambda h: logprobs.sequence_logprobs(
                h, w_bf, ids, mask, chunk_size=4, compute_dtype=jnp.bfloat16
            )[0].sum()
        )
    )(hidden_bf)
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads)))


def test_batch_and_vocab_sharded_inputs():
    # Data-parallel batch and a tensor-parallel head (V split 4 ways), as sharding.py lays them out.
    hidden, w, ids, mask = _inputs(5, batch=4, vocab=64)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    data = NamedSharding(mesh, PartitionSpec("data"))
    args = (
        jax.device_put(hidden, data),
        jax.device_put(w, NamedSharding(mesh, PartitionSpec(None, "tensor"))),
        jax.device_put(ids, data),
        jax.device_put(mask, data),
    )

    def objective(hidden, w, ids, mask):
        return logprobs.sequence_logprobs(hidden, w, ids, mask, chunk_size=4)[0].sum()

    fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    val, (gh, gw) = fn(*args)
    want_val, (want_gh, want_gw) = jax.value_and_grad(
        lambda h, w: _autodiff_reference(h, w, ids, mask).sum(), argnums=(0, 1)
    )(hidden, w)
    np.testing.assert_allclose(val, want_val, rtol=1e-5)
    np.testing.assert_allclose(gh, want_gh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, want_gw, rtol=1e-5, atol=1e-6)
    # Tensor parallelism over V must not gather the logits (or the head) back together.
    assert "all-gather" not in fn.lower(*args).compile().as_text()


def test_rejects_bad_shapes_and_chunk():
    hidden, w, ids, mask = _inputs()
    with pytest.raises(ValueError, match="must agree"):
        logprobs.sequence_logprobs(hidden, w, ids[:, 1:], mask)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs.sequence_logprobs(hidden, w, ids, mask, chunk_size=0)


def _peak_temp_bytes(batch, seq, dim, vocab, chunk_size, dtype=jnp.float32):
    def objective(hidden, w, ids, mask):
        logps, _ = logprobs.sequence_logprobs(
            hidden, w, ids, mask, chunk_size=chunk_size, compute_dtype=dtype
        )
        return logps.sum()

    args = (
        jax.ShapeDtypeStruct((batch, seq, dim), dtype),
        jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(objective, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunking_cuts_compiled_memory_at_qwen_vocab():
    batch, seq, dim, vocab, chunk = 2, 512, 64, 151_936, 64
    unchunked = _peak_temp_bytes(batch, seq, dim, vocab, None)
    chunked = _peak_temp_bytes(batch, seq, dim, vocab, chunk)
    logits_bytes = batch * (seq - 1) * vocab * 4
    print(
        f"\nlog-prob + grad temp memory, B={batch} T={seq} D={dim} V={vocab}: "
        f"unchunked {unchunked / 2**20:.1f} MiB, chunk={chunk} {chunked / 2**20:.1f} MiB "
        f"(full fp32 logits {logits_bytes / 2**20:.1f} MiB)"
    )
    assert unchunked >= logits_bytes  # the reference path really does hold the logits
    assert chunked < unchunked / 4
    assert chunked < logits_bytes / 2


@pytest.mark.parametrize(
    "chunk, rows, vocab, mib, expected",
    [
        # 256 MiB of fp32 logits over 8 rows of Qwen's vocab hold 55.2 positions: 48 (multiple of 8)
        (512, 8, 151_936, 256, 48),
        # a small vocabulary fits the whole chunk: the chunk stands
        (512, 8, 32_768, 256, 256),
        (128, 8, 32_768, 256, 128),
        # under 8 positions fit: no rounding down to 0, at least one position
        (512, 64, 151_936, 16, 1),
        (512, 4096, 151_936, 1, 1),
        # no cap, or no chunking: as given
        (512, 8, 151_936, 0, 512),
        (None, 8, 151_936, 256, None),
    ],
)
def test_capped_chunk_size(chunk, rows, vocab, mib, expected):
    capped = capped_chunk_size(chunk, rows, vocab, mib)
    assert capped == expected
    if capped is not None and mib > 0 and capped > 1:
        assert 4 * rows * capped * vocab <= mib * 2**20  # one chunk's fp32 logits fit the cap


@pytest.mark.parametrize(
    "mesh_shape, pairs, accum, vocab, expected_rows, expected_vocab",
    [
        # 8 pairs = 16 rows, one micro-batch, split over data x fsdp = 8: 2 rows per device
        ({"data": 1, "fsdp": 8, "tensor": 1}, 8, 1, 151_936, 2, 151_936),
        ({"data": 2, "fsdp": 2, "tensor": 2}, 8, 2, 151_936, 2, 75_968),
        # more devices than rows, and a vocabulary that does not divide: both round up
        ({"data": 1, "fsdp": 8, "tensor": 3}, 2, 1, 1000, 1, 334),
    ],
)
def test_lm_head_chunk_size_caps_for_one_device_s_rows(
    mesh_shape, pairs, accum, vocab, expected_rows, expected_vocab
):
    """The trainer's, the memory plan's and the bench's chunk: capped_chunk_size of the rows and
    the vocabulary one device holds of a micro-batch."""
    got = lm_head_chunk_size(
        512,
        max_chunk_mib=256,
        rows_per_step=2 * pairs,
        grad_accum_steps=accum,
        mesh_shape=mesh_shape,
        vocab_size=vocab,
    )
    assert got == capped_chunk_size(512, expected_rows, expected_vocab, 256)
    # 0 means unchunked, whatever the cap.
    unchunked = lm_head_chunk_size(
        0,
        max_chunk_mib=256,
        rows_per_step=2 * pairs,
        grad_accum_steps=accum,
        mesh_shape=mesh_shape,
        vocab_size=vocab,
    )
    assert unchunked is None
