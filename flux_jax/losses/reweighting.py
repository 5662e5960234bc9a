"""Transforms of the log-probs before a loss: f-DPO scores, LD-DPO weighting, WPO pair weights.

f-DPO (Wang et al. 2023, arXiv:2309.16240): DPO under an f-divergence regulariser replaces the
log-ratio `u = log(pi / ref)` in the implicit reward by `f'(exp(u))`:
  reverse_kl        u                            (standard DPO)
  forward_kl        1 - exp(-u)                  (f'(t) = -1/t, + 1: the constant cancels in h)
  js_divergence     log 2 + logsigmoid(u)        (f'(t) = log(2t / (1 + t)))
  alpha_divergence  (1 - exp(-alpha u)) / alpha  (f'(t) = (1 - t^-alpha) / alpha, alpha in (0, 1))
The alpha-divergence follows the paper (Table 1; TRL < 0.20 did too). TRL 1.16 computes
`(exp((alpha - 1) u) - 1) / (alpha - 1)`, which is the paper's formula at 1 - alpha: the same at
its default alpha = 0.5, different elsewhere.

LD-DPO (Liu et al. 2024, arXiv:2409.06411, eq. 9): each response's log-prob is split at the
shorter response's length; the tokens past it (the "verbose" tail of the longer one) count
`ld_alpha` times: `logp = sum_{t <= min(n_c, n_r)} logp_t + ld_alpha * sum_{t > min} logp_t`,
for the policy and the reference alike (as TRL).

WPO (Zhou et al. 2024, arXiv:2406.11827, eq. 2 with the sampling-aligned probabilities of sec.
3.2): each pair's loss is multiplied by `w_c * w_r`, `w = exp(mean_t(logp_t - log sum_v p_v^2))`,
without gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_LOG_F32_MAX = math.log(float(jnp.finfo(jnp.float32).max))


def f_divergence_scores(logratios: jax.Array, kind: str, alpha: float) -> jax.Array:
    """The f-DPO score `f'(exp(u))` of log-ratios `u` (see the module docstring for the table)."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - jnp.exp(jnp.minimum(-logratios, _LOG_F32_MAX))
    if kind == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(logratios)
    if kind == "alpha_divergence":
        # Capped below fp32 overflow (as TRL) so a far-off pair gives a large finite score.
        return (1 - jnp.exp(jnp.minimum(-alpha * logratios, _LOG_F32_MAX))) / alpha
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def response_positions(mask_NxT: jax.Array) -> jax.Array:
    """1-based position of each scored token within its response, 0 off-mask; column 0 is never
    scored (the standard layout's convention)."""
    scored_NxT = mask_NxT.astype(jnp.int32).at[:, 0].set(0)
    return jnp.cumsum(scored_NxT, axis=1) * scored_NxT


def ld_token_weights(mask_NxT: jax.Array, ld_alpha: float) -> jax.Array:
    """LD-DPO weight of every token of the paired rows [2B, T] (chosen rows first): 1 up to the
    pair's shorter response length, `ld_alpha` after it, 0 off-mask."""
    pos_NxT = response_positions(mask_NxT)
    lengths_N = pos_NxT.max(axis=1)
    chosen_B, rejected_B = jnp.split(lengths_N, 2)
    shared_N = jnp.tile(jnp.minimum(chosen_B, rejected_B), 2)
    in_shared = (pos_NxT > 0) & (pos_NxT <= shared_N[:, None])
    tail = pos_NxT > shared_N[:, None]
    return jnp.where(in_shared, 1.0, 0.0) + jnp.where(tail, ld_alpha, 0.0)


def wpo_log_weights(
    token_logps_NxT: jax.Array, log_sum_sq_probs_NxT: jax.Array, mask_NxT: jax.Array
) -> jax.Array:
    """`log w` per row [N]: the mean over its scored tokens of `logp_t - log sum_v p_v^2`
    (rows in the standard layout; column 0 is never scored)."""
    scored_NxT = mask_NxT.astype(bool).at[:, 0].set(False)
    aligned = jnp.where(scored_NxT, token_logps_NxT - log_sum_sq_probs_NxT, 0.0)
    counts = jnp.maximum(scored_NxT.sum(axis=1), 1).astype(aligned.dtype)
    return jax.lax.stop_gradient(aligned.sum(axis=1) / counts)


def wpo_pair_log_weights(
    aligned_sums_c: jax.Array,
    aligned_sums_r: jax.Array,
    counts_c: jax.Array,
    counts_r: jax.Array,
) -> jax.Array:
    """`log w` [2B] (chosen first) from per-pair sums of `logp_t - log sum_v p_v^2` over each
    response's tokens and their counts (the train step's form: any batch layout). No gradient."""
    sums = jnp.concatenate([aligned_sums_c, aligned_sums_r])
    counts = jnp.maximum(jnp.concatenate([counts_c, counts_r]), 1).astype(sums.dtype)
    return jax.lax.stop_gradient(sums / counts)
