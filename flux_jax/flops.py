"""Analytic FLOP counts of a Qwen decoder and of one DPO train step, for MFU reporting.

Pure functions of a QwenConfig and token counts; nothing here imports jax, so the TRL comparison
(tools/bench_trl.py, another virtualenv) counts with the same formula. A multiply-add is 2 FLOPs.
Only matmuls are counted (projections, attention scores and values, LM head); norms, RoPE,
softmax, SiLU and the optimiser are left out, as is usual for MFU (XLA's own count, which includes
them, is within ~5% for a toy shape and closer for real ones: tests/test_flops.py).

Forward FLOPs of one sequence of n tokens (L layers, hidden D, N query / K key-value heads of size
H, MLP width F, vocabulary V):

    per token, per layer:   2*D*(N*H + 2*K*H)   q, k, v projections
                          + 2*N*H*D             output projection
                          + 2*3*D*F             SwiGLU gate, up, down
                            (Qwen3-MoE sparse layer: 2*D*E router + k*2*3*D*F_moe, the k routed
                            experts only: MFU on active parameters)
    per (query, key) pair, per layer:  4*N*H    q.k scores (2*N*H) and the weighted sum of v (2*N*H)
    per token:              2*D*V               LM head

Two counts of one train step over R = 2 x pairs rows (chosen and rejected) padded to length T:

  model_flops (for "mfu"): the useful work on real tokens only. Each row of n real tokens does n
    tokens of layers and head and n*(n+1)/2 causal attention pairs. Policy forward + backward is
    3x forward; a reference model adds 1x forward; precomputed or no reference adds nothing.
    The head is counted on every real token (the usual 6 x params x tokens convention), not only
    on the response tokens DPO scores.
  hardware_flops (for "hardware_flops_utilisation"): what the compiled step actually multiplies:
    every row is T padded tokens, attention is the full T x T score matrix (XLA's dense
    attention computes the masked half too), and the head runs on T - 1 positions (or on the W
    positions of a scored-position window, which leaves out the prompt). The head's
    custom VJP (flux_jax.logprobs) recomputes the logits in the backward pass: with more than
    one chunk that is forward + recompute + 2 gradient matmuls = 4x head forward; with a single
    chunk (unchunked, or a chunk >= T - 1) XLA merges the recompute with the forward (3x, and the
    full logits stay alive instead). Rematerialisation adds its recomputation: "full" one more
    forward of the layers except the MLP down projection (its output is not needed by the
    backward pass), "dots" one more forward of the attention score/value matmuls (they have batch
    dimensions, so the "dots" policy does not save them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from flux_jax.models.qwen.config import QwenConfig

REFERENCE_MODES = ("model", "precomputed", "none")
REMAT_MODES = ("none", "full", "dots")


def layer_flops_per_token(cfg: QwenConfig) -> int:
    """Projection and MLP matmul FLOPs of one token through all layers (forward); a sparse
    layer counts its router and the token's top-k experts (the grouped path's work)."""
    d, n, k, h, f = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    attention = 2 * d * (n * h + 2 * k * h) + 2 * n * h * d
    sparse = sum(cfg.sparse_layers)
    routed = (
        2 * d * cfg.num_experts + cfg.num_experts_per_tok * 2 * 3 * d * cfg.moe_intermediate_size
    )
    dense_mlp = 2 * 3 * d * f
    return (
        cfg.num_hidden_layers * attention
        + (cfg.num_hidden_layers - sparse) * dense_mlp
        + (sparse * routed)
    )


def down_proj_flops_per_token(cfg: QwenConfig) -> int:
    """The MLP down projections' share of `layer_flops_per_token` (remat "full" skips them)."""
    sparse = sum(cfg.sparse_layers)
    dense = (cfg.num_hidden_layers - sparse) * 2 * cfg.intermediate_size * cfg.hidden_size
    return (
        dense + sparse * cfg.num_experts_per_tok * 2 * cfg.moe_intermediate_size * cfg.hidden_size
    )


def attention_flops_per_pair(cfg: QwenConfig) -> int:
    """Score and value FLOPs of one (query, key) pair through all layers (forward)."""
    return cfg.num_hidden_layers * 4 * cfg.num_attention_heads * cfg.head_dim


def lm_head_flops_per_token(cfg: QwenConfig) -> int:
    return 2 * cfg.hidden_size * cfg.vocab_size


def causal_pairs(lengths: Sequence[int]) -> int:
    """(query, key) pairs of causal attention within each sequence: sum of n * (n + 1) / 2."""
    return sum(n * (n + 1) // 2 for n in lengths)


def forward_flops(cfg: QwenConfig, *, tokens: int, attention_pairs: int, head_tokens: int) -> int:
    """Forward FLOPs: `tokens` through the layers, `attention_pairs` scored, `head_tokens` heads."""
    return (
        tokens * layer_flops_per_token(cfg)
        + attention_pairs * attention_flops_per_pair(cfg)
        + head_tokens * lm_head_flops_per_token(cfg)
    )


def head_chunk_count(padded_length: int, chunk_size: int | None) -> int:
    """Chunks `flux_jax.logprobs.token_logprobs` splits the T - 1 scored positions into."""
    positions = padded_length - 1
    if not chunk_size or positions <= 0:
        return 1
    chunk = min(chunk_size, positions)
    return -(-positions // chunk)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    model_flops: int  # useful work on real tokens (see the module docstring)
    hardware_flops: int  # what the compiled step computes on padded rows, recomputation included


def dpo_step_flops(
    cfg: QwenConfig,
    real_lengths: Sequence[int],
    padded_length: int,
    *,
    reference: str = "model",
    remat: str = "none",
    head_chunks: int = 1,
    head_positions: int | None = None,
) -> StepFlops:
    """FLOPs of one DPO train step (all micro-batches together).

    Args:
      cfg: the architecture.
      real_lengths: the number of real (non-pad) tokens of every row, chosen and rejected.
      padded_length: T, the length every row is padded to.
      reference: "model" (a reference forward in the step), "precomputed" or "none".
      remat: the rematerialisation policy ("none", "full", "dots").
      head_chunks: how many chunks the LM head's log-prob scan has (1 when unchunked); see
        `head_chunk_count`.
      head_positions: positions per row the head runs on: T - 1 (the default), or the width W
        of the scored-position window (flux_jax.data.batching.score_window).
    """
    if reference not in REFERENCE_MODES:
        raise ValueError(f"reference={reference!r}; valid: {', '.join(REFERENCE_MODES)}")
    if remat not in REMAT_MODES:
        raise ValueError(f"remat={remat!r}; valid: {', '.join(REMAT_MODES)}")
    tokens = sum(real_lengths)
    useful_fwd = forward_flops(
        cfg, tokens=tokens, attention_pairs=causal_pairs(real_lengths), head_tokens=tokens
    )
    model = 3 * useful_fwd + (useful_fwd if reference == "model" else 0)

    rows, t = len(real_lengths), padded_length
    layers = rows * t * layer_flops_per_token(cfg)
    attention = rows * t * t * attention_flops_per_pair(cfg)
    head = (
        rows * (t - 1 if head_positions is None else head_positions) * lm_head_flops_per_token(cfg)
    )
    down_proj = rows * t * down_proj_flops_per_token(cfg)
    remat_extra = {"none": 0, "full": layers - down_proj + attention, "dots": attention}[remat]
    head_passes = 3 if head_chunks <= 1 else 4
    hardware = 3 * (layers + attention) + head_passes * head + remat_extra
    if reference == "model":
        hardware += layers + attention + head
    return StepFlops(model_flops=model, hardware_flops=hardware)
