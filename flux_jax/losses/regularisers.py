"""Two optional regularisers added to the preference loss (default off), as pure functions.

sft (`sft_coef`): mean over pairs of the chosen response's per-token NLL,
     `-chosen_logps / chosen_tokens`. RPO (Pang et al. 2024, arXiv:2404.19733) is `sigmoid`
     plus this; TRL's old `rpo_alpha` = `sft_coef` (TRL 1.16 writes RPO as
     `loss_type: [sigmoid, sft]`, whose `sft` is a token mean instead).
kl (`kl_coef`): mean over all response tokens (chosen and rejected) of the k3 estimator
     `exp(ref - pi) - (ref - pi) - 1` (>= 0 per token). k3 is an unbiased estimate of
     KL(pi||ref) only for tokens sampled from pi; our tokens come from the preference data, so
     this is a per-token "stay near the reference" penalty, not the exact KL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def upcast(x: jax.Array) -> jax.Array:
    """At least fp32 (bf16 log-probs would round away the small differences DPO is made of), but
    float64 stays float64 so finite-difference tests can run in x64 mode."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def per_token(logps_B: jax.Array, token_counts_B: jax.Array) -> jax.Array:
    """`logps / counts`; a pair with no response tokens has logps 0 and stays 0 (not NaN)."""
    return logps_B / jnp.maximum(token_counts_B, 1).astype(logps_B.dtype)


def sft_loss(chosen_logps: jax.Array, chosen_token_counts: jax.Array) -> jax.Array:
    """Mean over pairs of the chosen response's per-token NLL (each pair weighs the same)."""
    return -per_token(upcast(chosen_logps), chosen_token_counts).mean()


def kl_penalty(
    policy_token_logps_NxT: jax.Array,
    ref_token_logps_NxT: jax.Array,
    loss_mask_NxT: jax.Array,
) -> jax.Array:
    """k3 estimate `exp(ref - pi) - (ref - pi) - 1`, averaged over every response token.

    Args:
      policy_token_logps_NxT, ref_token_logps_NxT: per-token log-probs (`token_logprobs`) of the
        same N sequences; typically N = 2B, the chosen and rejected halves of a DPO batch.
      loss_mask_NxT: the mask those were computed with. Column 0 is ignored, as in `logprobs`.

    Tokens are weighted equally, so long responses weigh more than short ones. The result is >= 0
    and 0 iff pi == ref on every response token; see the module docstring for why it is only a
    regulariser here.
    """
    mask_NxT = loss_mask_NxT.astype(bool).at[:, 0].set(False)
    log_ratio_NxT = upcast(ref_token_logps_NxT) - upcast(policy_token_logps_NxT)
    # Zero the ratio off-mask before exp so padding can never overflow into inf * 0 = NaN.
    log_ratio_NxT = jnp.where(mask_NxT, log_ratio_NxT, 0.0)
    k3_NxT = jnp.exp(log_ratio_NxT) - log_ratio_NxT - 1.0
    num_tokens = jnp.maximum(mask_NxT.sum(), 1).astype(log_ratio_NxT.dtype)
    return jnp.where(mask_NxT, k3_NxT, 0.0).sum() / num_tokens
