"""The activation half of the memory plan: per-device bytes of what a DPO step keeps live.

`activation_terms` estimates, from the architecture alone, the activation memory one device needs
for a micro-batch; flux_jax/memory_plan.py adds it to the exact parameter, gradient, optimiser and
reference bytes (and flux_jax/lora_memory.py the terms LoRA adds).

Activations, per device (c = bytes of the compute dtype; t = the tensor axis size, dividing the
head and MLP widths when they divide; D hidden, N/K query/kv heads, H head_dim, F MLP width, L
layers, V vocab, T = max_length):

  rows   = 2 x micro_batch / (data x fsdp)       chosen + rejected rows of one micro-batch
  saved  = L x rows x T x s                      residuals kept for the backward pass, where s is
           remat "full": D x c                     (only each layer's input: the scan carry)
           remat "dots": (2D + (N+2K)H + 2F) x c   (input, q/k/v, o_proj, gate and up outputs)
           remat "none": (8D + (N+2K)H + 4NH + 3KH + 4F + 2NT) x c + NT
                                                   (norms' intermediates, q/k norm and RoPE
                                                   outputs, attention logits and probabilities,
                                                   the boolean mask, the MLP's elementwise terms)
  layer  = rows x T x s_none                     one layer's backward working set (the layer
                                                 recomputed under remat, or its gradient
                                                 temporaries); under "dots" less the saved
                                                 matmul outputs, (D + (N+2K)H + 2F) x c
  gather = 2 x one layer's weights / t x c       FSDP all-gathers a layer's weights before use
                                                 (XLA may overlap the next layer's gather)
  head   = 2 x rows x chunk x V/t x 4            chunked LM-head logits and their gradient (fp32;
                                                 chunk capped by model.logprob_chunk_mib),
           + D x V/t x (c + 4)                   the gathered head and its fp32 gradient carry
  other  = rows x T x D x (c + 4) + rows x T x T the embedding output, final norm and the mask

  activations = saved + layer + gather + head + other

The residual lists come from `print_saved_residuals` on one decoder layer. Against XLA's compiled
temp memory on CPU (fp32, tests/test_memory_plan.py, slow), after the 2-D token matmuls and the
folded GQA attention: remat none 12% low, dots 16% high, full within 1%. bf16 runs keep their
norm and softmax temporaries in fp32, so they use somewhat more than the c = 2 figures say.

The reference forward runs under stop_gradient and saves nothing, so it adds at most one layer's
working set while the policy's residuals are not yet live; it is not counted separately.
"""

from __future__ import annotations

from flux_jax.models.qwen.config import QwenConfig


def _split(size: int, ways: int) -> float:
    """A width divided over a mesh axis, or whole when it does not divide (as logical_to_spec)."""
    return size / ways if size % ways == 0 else size


def activation_terms(
    cfg: QwenConfig,
    *,
    rows: float,
    seq_len: int,
    tensor: int,
    compute_bytes: int,
    remat: str,
    chunk: int | None,
    fsdp: int = 1,
    frozen_head: bool = False,
    expert: int = 1,
) -> dict[str, float]:
    """The activation estimate's parts, in bytes per device (see the module docstring).
    `frozen_head`: the LM head takes no gradient (LoRA), so it has no fp32 gradient carry.
    `expert`: the mesh's expert axis (Qwen3-MoE: E / expert experts per device)."""
    c, t, T = compute_bytes, tensor, seq_len
    D, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    N, K, H, F = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    q, kv = _split(N, t) * H, _split(K, t) * H
    qkv, mlp, heads = q + 2 * kv, _split(F, t), _split(N, t)
    mlp_weights = 3 * D * mlp
    if cfg.is_moe:
        # Qwen3-MoE (grouped path): a token's k routed slots are k MLPs of width F_moe; FSDP
        # gathers the E / expert experts a device holds (plus the router). Expert parallelism
        # all-gathers the tokens of the `expert` shards (models/qwen/expert_parallel.py), so a
        # device's routed buffers cover `expert` x its own tokens.
        routed = expert * cfg.num_experts_per_tok * _split(cfg.moe_intermediate_size, t)
        local_experts = _split(cfg.num_experts, expert)
        sparse_weights = local_experts * 3 * D * _split(cfg.moe_intermediate_size, t)
        has_dense = not all(cfg.sparse_layers)
        mlp = max(mlp if has_dense else 0, routed + cfg.num_experts)
        mlp_weights = max(mlp_weights if has_dense else 0, sparse_weights + D * cfg.num_experts)
    # Bytes per token of one layer (see the module docstring); the mask is 1 byte per entry.
    per_token_none = (8 * D + qkv + 4 * q + 3 * kv + 4 * mlp + 2 * heads * T) * c + heads * T
    matmul_outputs = (D + qkv + 2 * mlp) * c  # q/k/v, o_proj, gate and up: what "dots" keeps
    per_token_saved = {
        "full": D * c,
        "dots": D * c + matmul_outputs,
        "none": per_token_none,
    }[remat]
    # Under "dots" the layer's backward reuses the saved matmul outputs instead of recomputing
    # them: only the rest of a layer's working set is new.
    per_token_layer = per_token_none - (matmul_outputs if remat == "dots" else 0)
    tokens = rows * T
    layer_weights = D * qkv + q * D + mlp_weights  # one layer's matmul weights, after tensor split
    head_v = _split(V, t)
    positions = T if chunk is None else min(chunk, T)
    terms = {
        "saved_residuals": L * tokens * per_token_saved,
        "layer_working_set": tokens * per_token_layer,
        "gathered_weights": (2 * layer_weights * c) if fsdp > 1 else 0.0,
        "lm_head": 2 * rows * positions * head_v * 4 + D * head_v * (c + (0 if frozen_head else 4)),
        "other": tokens * D * (c + 4) + rows * T * T,
    }
    return terms
