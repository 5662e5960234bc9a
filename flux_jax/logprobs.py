"""Sequence log-probabilities under a language-model head, without materialising [B, T, V] logits.

DPO only needs, per sequence, the log-probability of its response tokens. For Qwen the vocabulary
is 151,936 wide, so the full fp32 logits of a modest batch (16 x 2048 tokens) take ~19 GiB, and the
backward pass needs more of the same. Here the head is applied one sequence chunk at a time inside
a `jax.lax.scan`, and each chunk has a `jax.custom_vjp`: the forward keeps only the chunk's
per-token log-probs and [B, C] log-normaliser, and the backward recomputes one chunk's logits and
turns them into `d logits = g * (onehot - softmax)` in one fused pass. Peak head memory is about
two [B, chunk, V] fp32 buffers plus the fp32 [D, V] head gradient, at the cost of one extra head
matmul in the backward pass (`tools/logprob_memory.py` prints the compiled numbers).

Sharding: the target logit is picked with a one-hot compare, not a gather, so a head sharded over
V (tensor parallelism) only all-reduces [B, C] statistics, never the logits. With the batch sharded
over data-parallel devices, XLA all-reduces the head gradient once per chunk (it is a loop carry),
so fewer, larger chunks mean fewer of those reductions.

Convention (shared with the data pipeline and the train step):
  `loss_mask_BxT[b, t] = 1` means token `input_ids_BxT[b, t]` is a response token whose log-prob
  counts. It is scored from the logits at position t - 1, so position 0 can never be scored and its
  mask value is ignored. Internally `hidden[:, :-1]` predicts `input_ids[:, 1:]` under
  `loss_mask[:, 1:]`.

Numerics: the head matmul runs in `compute_dtype` (e.g. bf16) but accumulates into fp32
(`preferred_element_type=float32`), and the log-softmax is always taken in fp32.

Statistics (`token_logprobs_and_stats`, `HEAD_STATS`): the same pass can also return per-token
statistics of the head's distribution, computed from the chunk's logits while they exist and only
when asked for (none by default: no cost). They carry no gradient, as TRL's fused head marks them
non-differentiable: `log_sum_sq_probs` = log sum_v p_v^2 (WPO's weights) and `mean_logits` = the
mean logit over the vocabulary (TRL's `logits/chosen`, `logits/rejected` metrics).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

# Positions per LM-head chunk; also the config's model.logprob_chunk_size default (a run caps it
# by memory: flux_jax/logprob_chunk.py).
DEFAULT_CHUNK_SIZE = 512
# The per-token statistics the head can return beside the log-probs (TRL's names).
HEAD_STATS = ("log_sum_sq_probs", "mean_logits")


def _chunk_logits(
    hidden_BxCxD: jax.Array, lm_head_DxV: jax.Array, compute_dtype: DTypeLike
) -> jax.Array:
    batch, chunk, dim = hidden_BxCxD.shape
    # One 2-D matmul over the B * C positions (see layers.token_matmul: XLA:CPU handles the
    # backward of 3-D einsums through slow transposes).
    logits_MxV = jnp.matmul(
        hidden_BxCxD.reshape(batch * chunk, dim).astype(compute_dtype),
        lm_head_DxV.astype(compute_dtype),
        # Accumulate in fp32 even for bf16 inputs: log-softmax over 152k classes is sensitive to
        # logit rounding, and a bf16 logit is only good to ~3 significant digits.
        preferred_element_type=jnp.float32,
    )
    return logits_MxV.reshape(batch, chunk, -1)


def _is_target(targets_BxC: jax.Array, vocab: int) -> jax.Array:
    # A one-hot compare instead of a gather: XLA fuses it into the consuming reduction or
    # elementwise op (no [B, C, V] buffer), and with V sharded over a tensor-parallel axis it is a
    # local reduction plus an all-reduce of [B, C], with nothing for the partitioner to guess.
    vocab_ids_1x1xV = jax.lax.broadcasted_iota(jnp.int32, (1, 1, vocab), 2)
    return vocab_ids_1x1xV == targets_BxC[..., None]


def _head_stat(name: str, logits_BxCxV: jax.Array, lse_BxC: jax.Array) -> jax.Array:
    """One of `HEAD_STATS` per position, from the chunk's fp32 logits."""
    if name == "log_sum_sq_probs":  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
        return jax.nn.logsumexp(2.0 * logits_BxCxV, axis=-1) - 2.0 * lse_BxC
    if name == "mean_logits":
        return logits_BxCxV.sum(axis=-1) / logits_BxCxV.shape[-1]
    raise ValueError(f"unknown LM-head statistic {name!r}; known: {', '.join(HEAD_STATS)}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunk_token_logprobs(*chunk_args: Any) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Masked log p(target) for one chunk of positions, and the requested `stats` (each [B, C],
    no gradient); the only place logits exist. Arguments as `_chunk_fwd`'s (hidden_BxCxD,
    lm_head_DxV, targets_BxC, mask_BxC, compute_dtype, stats): a custom VJP's function and its
    forward rule take the same ones, so they are spelled out once.

    A custom VJP so that neither pass keeps logits beyond the chunk: the forward saves only the
    [B, C] log-normaliser, and the backward recomputes the chunk's logits and turns them into
    d logits = g * (onehot - softmax) in one fused elementwise pass.
    """
    return _chunk_fwd(*chunk_args)[0]


def _chunk_fwd(
    hidden_BxCxD: jax.Array,
    lm_head_DxV: jax.Array,
    targets_BxC: jax.Array,
    mask_BxC: jax.Array,
    compute_dtype: DTypeLike,
    stats: tuple[str, ...],
) -> tuple[tuple[jax.Array, tuple[jax.Array, ...]], tuple[jax.Array, ...]]:
    logits_BxCxV = _chunk_logits(hidden_BxCxD, lm_head_DxV, compute_dtype)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    is_target_BxCxV = _is_target(targets_BxC, logits_BxCxV.shape[-1])
    # Multiply rather than `where(..., 0.0)`: XLA hoists the loop-invariant [B, C, V] broadcast of
    # the 0.0 out of the scan's while loop and keeps it alive as a full extra buffer.
    target_logit_BxC = (logits_BxCxV * is_target_BxCxV).sum(axis=-1)
    # `where`, not multiply: a masked position contributes exactly 0 whatever its logits are.
    logps_BxC = jnp.where(mask_BxC, target_logit_BxC - lse_BxC, 0.0)
    stats_BxC = tuple(
        jnp.where(mask_BxC, _head_stat(name, logits_BxCxV, lse_BxC), 0.0) for name in stats
    )
    return (logps_BxC, stats_BxC), (hidden_BxCxD, lm_head_DxV, targets_BxC, mask_BxC, lse_BxC)


def _chunk_bwd(
    compute_dtype: DTypeLike,
    stats: tuple[str, ...],
    residuals: tuple[jax.Array, ...],
    g: tuple[jax.Array, tuple[jax.Array, ...]],
) -> tuple[jax.Array | None, ...]:
    hidden_BxCxD, lm_head_DxV, targets_BxC, mask_BxC, lse_BxC = residuals
    g_BxC, _ = g  # the statistics' cotangents are dropped: they carry no gradient (as TRL's)
    logits_BxCxV = _chunk_logits(hidden_BxCxD, lm_head_DxV, compute_dtype)
    g_BxC = jnp.where(mask_BxC, g_BxC, 0.0)
    is_target_BxCxV = _is_target(targets_BxC, logits_BxCxV.shape[-1])
    softmax_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
    dlogits_BxCxV = (g_BxC[..., None] * (is_target_BxCxV - softmax_BxCxV)).astype(compute_dtype)
    batch, chunk, dim = hidden_BxCxD.shape
    dlogits_MxV = dlogits_BxCxV.reshape(batch * chunk, -1)
    dhidden_BxCxD = jnp.matmul(
        dlogits_MxV, lm_head_DxV.astype(compute_dtype).T, preferred_element_type=jnp.float32
    ).reshape(batch, chunk, dim)
    dlm_head_DxV = jnp.matmul(
        hidden_BxCxD.reshape(batch * chunk, dim).astype(compute_dtype).T,
        dlogits_MxV,
        preferred_element_type=jnp.float32,
    )
    # Integer targets and the mask get no cotangent (None is JAX's symbolic zero).
    return (
        dhidden_BxCxD.astype(hidden_BxCxD.dtype),
        dlm_head_DxV.astype(lm_head_DxV.dtype),
        None,
        None,
    )


_chunk_token_logprobs.defvjp(_chunk_fwd, _chunk_bwd)


def token_logprobs(
    hidden_BxTxD: jax.Array,
    lm_head_DxV: jax.Array,
    input_ids_BxT: jax.Array,
    loss_mask_BxT: jax.Array,
    **options: Any,
) -> jax.Array:
    """Per-token fp32 log-probs of `input_ids`, aligned with `input_ids`, zero where not scored:
    `token_logprobs_and_stats` without statistics (its arguments, its first output)."""
    return token_logprobs_and_stats(
        hidden_BxTxD, lm_head_DxV, input_ids_BxT, loss_mask_BxT, **options
    )[0]


def token_logprobs_and_stats(
    hidden_BxTxD: jax.Array,
    lm_head_DxV: jax.Array,
    input_ids_BxT: jax.Array,
    loss_mask_BxT: jax.Array,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    compute_dtype: DTypeLike = jnp.float32,
    source_index_BxT: jax.Array | None = None,
    scored_positions_BxW: jax.Array | None = None,
    stats: tuple[str, ...] = (),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token fp32 log-probs of `input_ids`, aligned with `input_ids`, zero where not scored.

    Args:
      hidden_BxTxD: final hidden states (after the last norm), any float dtype.
      lm_head_DxV: the output projection. For tied embeddings pass `embedding_VxD.T`. Pass the
        fp32 master weight, not a bf16 copy: its gradient is summed over chunks in this dtype.
      input_ids_BxT: token ids; `input_ids[:, t]` is scored from `hidden[:, t - 1]`.
      loss_mask_BxT: 1 (or True) where `input_ids[:, t]` is a response token to score. Column 0 is
        ignored (nothing predicts the first token) unless `source_index_BxT` is given.
      chunk_size: sequence positions per head application. `None` applies the head to the whole
        sequence at once (the unchunked reference path; O(B x T x V) memory). A chunk larger than
        the sequence is clamped to it. T - 1 need not be a multiple of it: positions are padded.
      compute_dtype: dtype the hidden states and head are cast to for the matmul.
      source_index_BxT: optional int [B, T]: token t is scored from `hidden[:, source_index[t]]`
        instead of `hidden[:, t - 1]`. Shared-prefix rows need it: the first rejected token is
        predicted by the last prompt token, not by the token before it in the row. The loss mask
        is then taken as is, column 0 included.
      scored_positions_BxW: optional int [B, W]: the columns of the scored tokens of each row,
        left-aligned and padded with -1 (flux_jax.data.batching.scored_positions). The head then
        runs on those W positions only instead of all T: a prompt's positions cost no LM-head
        work. Tokens outside the list are not scored even where `loss_mask` is 1.
      stats: names from `HEAD_STATS` to compute in the same pass (see the module docstring).

    Returns:
      `(logps_BxT, stats)`: `logps_BxT` float32, `logps[b, t] = log p(input_ids[b, t] |
      input_ids[b, :t])` where `loss_mask[b, t]` (t >= 1), else 0; summing over T gives
      `sequence_logprobs`. `stats` maps each requested name to a float32 [B, T] aligned the same
      way (the statistic of the distribution that scores token t), 0 where not scored, no gradient.
    """
    stats = tuple(stats)
    unknown = [name for name in stats if name not in HEAD_STATS]
    if unknown:
        raise ValueError(f"unknown LM-head statistics {unknown}; known: {', '.join(HEAD_STATS)}")
    batch, seq_len, _ = hidden_BxTxD.shape
    if input_ids_BxT.shape != (batch, seq_len) or loss_mask_BxT.shape != (batch, seq_len):
        raise ValueError(
            f"hidden {hidden_BxTxD.shape}, input_ids {input_ids_BxT.shape} and loss_mask "
            f"{loss_mask_BxT.shape} must agree on [B, T]"
        )
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
    if scored_positions_BxW is not None:
        return _windowed_token_logprobs(
            hidden_BxTxD,
            lm_head_DxV,
            input_ids_BxT,
            loss_mask_BxT,
            scored_positions_BxW,
            source_index_BxT,
            chunk_size=chunk_size,
            compute_dtype=compute_dtype,
            stats=stats,
        )
    if source_index_BxT is not None:
        if source_index_BxT.shape != (batch, seq_len):
            raise ValueError(
                f"source_index {source_index_BxT.shape} must be [B, T] = {batch, seq_len}"
            )
        # Gather the predicting hidden state of every token; the gather's transpose is a
        # scatter-add, so a hidden state that predicts two tokens (the last prompt token predicts
        # the first chosen and the first rejected token) gets both gradients.
        source_BxTxD = jnp.take_along_axis(
            hidden_BxTxD, source_index_BxT.astype(jnp.int32)[:, :, None], axis=1
        )
        logps_BxT, stats_BxT = _aligned_token_logprobs(
            source_BxTxD,
            lm_head_DxV,
            input_ids_BxT,
            loss_mask_BxT.astype(bool),
            chunk_size=chunk_size,
            compute_dtype=compute_dtype,
            stats=stats,
        )
        return logps_BxT, dict(zip(stats, stats_BxT, strict=True))

    # Shift once: position s of these predicts token s + 1.
    logps_BxS, stats_BxS = _aligned_token_logprobs(
        hidden_BxTxD[:, :-1],
        lm_head_DxV,
        input_ids_BxT[:, 1:],
        loss_mask_BxT[:, 1:].astype(bool),
        chunk_size=chunk_size,
        compute_dtype=compute_dtype,
        stats=stats,
    )

    def realign(values_BxS: jax.Array) -> jax.Array:  # column 0 (never scored) is 0
        return jnp.pad(values_BxS, ((0, 0), (1, 0)))

    return realign(logps_BxS), {n: realign(v) for n, v in zip(stats, stats_BxS, strict=True)}


def _windowed_token_logprobs(
    hidden_BxTxD: jax.Array,
    lm_head_DxV: jax.Array,
    input_ids_BxT: jax.Array,
    loss_mask_BxT: jax.Array,
    scored_positions_BxW: jax.Array,
    source_index_BxT: jax.Array | None,
    *,
    chunk_size: int | None,
    compute_dtype: DTypeLike,
    stats: tuple[str, ...],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`token_logprobs_and_stats` with the head applied only at the listed scored positions."""
    batch, seq_len, _ = hidden_BxTxD.shape
    if scored_positions_BxW.ndim != 2 or scored_positions_BxW.shape[0] != batch:
        raise ValueError(f"scored_positions {scored_positions_BxW.shape} must be [B={batch}, W]")
    listed_BxW = scored_positions_BxW >= 0
    target_BxW = jnp.maximum(scored_positions_BxW, 0).astype(jnp.int32)
    if source_index_BxT is None:
        source_BxW = jnp.maximum(target_BxW - 1, 0)
        listed_BxW = listed_BxW & (target_BxW >= 1)  # column 0 is never scored
    else:
        source_BxW = jnp.take_along_axis(source_index_BxT.astype(jnp.int32), target_BxW, axis=1)
    # As with source_index: the gather's transpose is a scatter-add, so a hidden state that
    # predicts two listed tokens gets both gradients.
    source_BxWxD = jnp.take_along_axis(hidden_BxTxD, source_BxW[:, :, None], axis=1)
    targets_BxW = jnp.take_along_axis(input_ids_BxT, target_BxW, axis=1)
    mask_BxW = jnp.take_along_axis(loss_mask_BxT, target_BxW, axis=1).astype(bool) & listed_BxW
    logps_BxW, stats_BxW = _aligned_token_logprobs(
        source_BxWxD,
        lm_head_DxV,
        targets_BxW,
        mask_BxW,
        chunk_size=chunk_size,
        compute_dtype=compute_dtype,
        stats=stats,
    )
    # Back to input_ids' columns. Padding entries (-1, clamped to column 0) add exactly 0.
    rows_Bx1 = jnp.arange(batch, dtype=jnp.int32)[:, None]

    def scatter(values_BxW: jax.Array) -> jax.Array:
        return jnp.zeros((batch, seq_len), jnp.float32).at[rows_Bx1, target_BxW].add(values_BxW)

    return scatter(logps_BxW), {n: scatter(v) for n, v in zip(stats, stats_BxW, strict=True)}


def _aligned_token_logprobs(
    hidden_BxSxD: jax.Array,
    lm_head_DxV: jax.Array,
    targets_BxS: jax.Array,
    mask_BxS: jax.Array,
    *,
    chunk_size: int | None,
    compute_dtype: DTypeLike,
    stats: tuple[str, ...] = (),
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Masked log p(targets[:, s] | hidden[:, s]) [B, S], the head applied chunk by chunk, and
    the requested `stats` [B, S] each."""
    batch, num_pos, _ = hidden_BxSxD.shape
    # The head goes into the scan uncast: its gradient is accumulated across chunks in the head's
    # own dtype, which should be the fp32 master weight's, not bf16. (XLA hoists the
    # loop-invariant cast to compute_dtype out of the loop anyway.)
    if chunk_size is None or num_pos == 0:
        return _chunk_token_logprobs(
            hidden_BxSxD, lm_head_DxV, targets_BxS, mask_BxS, compute_dtype, stats
        )

    chunk = min(chunk_size, num_pos)
    num_chunks = -(-num_pos // chunk)
    pad = num_chunks * chunk - num_pos
    # Padded positions get hidden 0, target 0 and mask 0: finite logits, zero contribution.
    hidden_BxPxD = jnp.pad(hidden_BxSxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxP = jnp.pad(targets_BxS, ((0, 0), (0, pad)))
    mask_BxP = jnp.pad(mask_BxS, ((0, 0), (0, pad)))

    def to_chunks(x_BxP: jax.Array) -> jax.Array:
        x_BxNxC = x_BxP.reshape(batch, num_chunks, chunk, *x_BxP.shape[2:])
        return jnp.swapaxes(x_BxNxC, 0, 1)  # scan walks the leading (chunk) axis

    # No jax.checkpoint needed: the custom VJP's residuals are the chunk's inputs and its [B, C]
    # log-normaliser, so the scan stacks nothing of size V.
    def body(carry: None, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[None, Any]:
        hidden_BxCxD, targets_BxC, mask_BxC = xs
        return carry, _chunk_token_logprobs(
            hidden_BxCxD, lm_head_DxV, targets_BxC, mask_BxC, compute_dtype, stats
        )

    _, (logps_NxBxC, stats_NxBxC) = jax.lax.scan(
        body, None, (to_chunks(hidden_BxPxD), to_chunks(targets_BxP), to_chunks(mask_BxP))
    )

    def from_chunks(x_NxBxC: jax.Array) -> jax.Array:
        return jnp.swapaxes(x_NxBxC, 0, 1).reshape(batch, num_chunks * chunk)[:, :num_pos]

    return from_chunks(logps_NxBxC), tuple(from_chunks(x) for x in stats_NxBxC)


def sequence_logprobs(
    hidden_BxTxD: jax.Array,
    lm_head_DxV: jax.Array,
    input_ids_BxT: jax.Array,
    loss_mask_BxT: jax.Array,
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
    """Summed fp32 log-prob of each sequence's response tokens, and how many tokens were scored.

    Arguments and `options` (chunk_size, compute_dtype) as for `token_logprobs`. Returns
    `(logps_B float32, token_counts_B int32)`, where `token_counts_B = loss_mask[:, 1:].sum(-1)`.
    A caller that also needs per-token log-probs (the KL regulariser) should call
    `token_logprobs` once and sum it over T instead.
    """
    logps_BxT = token_logprobs(hidden_BxTxD, lm_head_DxV, input_ids_BxT, loss_mask_BxT, **options)
    return logps_BxT.sum(axis=-1), token_counts(loss_mask_BxT)


def token_counts(loss_mask_BxT: jax.Array) -> jax.Array:
    """Number of scored tokens per sequence (column 0 can never be scored), int32 [B]."""
    return loss_mask_BxT[:, 1:].astype(jnp.int32).sum(axis=-1)
