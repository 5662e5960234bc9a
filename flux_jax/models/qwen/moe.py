"""The pure math of a Qwen3-MoE sparse block: router, top-k, routed SwiGLU experts, aux loss.

Functions take plain arrays (one layer's `moe` parameters as a dict), like layers.py, so the model
scans them over the stacked sparse layers and the KV-cache decoder reuses them. The numerics follow
transformers' `Qwen3MoeSparseMoeBlock`: router logits in the compute dtype, the softmax over experts
in fp32, top-k of the probabilities, renormalised to sum to 1 when `norm_topk_prob`, the weights
cast back to the compute dtype and applied to each expert's output. Qwen3 has no shared expert.

Two ways to run the experts, equal up to fp32 rounding:
  "dense"   every expert on every token, weighted by the top-k gates (zero elsewhere): E/k times
            the FLOPs, but plain einsums; the reference the fast path is tested against.
  "grouped" the token-slots (token, choice) sorted by expert and multiplied with
            `jax.lax.ragged_dot` (the grouped matmul MaxText and Tunix use), so each expert sees
            only its tokens. No capacity limit: no token is ever dropped.
Either runs inside expert_parallel.run_sharded when the mesh has an `expert` axis: each device
then holds E / expert of the experts and runs the same function on them.

Parameters of one layer: `router/kernel` [D, E] (HF's `mlp.gate.weight`, transposed) and
`experts/{gate,up,down}_proj/kernel` [E, D, F], [E, D, F], [E, F, D].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flux_jax.models.qwen import expert_parallel
from flux_jax.models.qwen.layers import AdapterCall, Params, attention_residual, rms_norm
from flux_jax.models.qwen.weights import kernel_value

MOE_IMPLS = ("dense", "grouped", "auto")


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """Static routing settings of the sparse layers (hashable: usable under jit)."""

    num_experts: int
    top_k: int
    norm_topk_prob: bool
    impl: str = "grouped"  # "dense" or "grouped" (resolve "auto" with `resolve_moe_impl`)
    # The device mesh when it has an `expert` axis of size > 1: experts are then split over it
    # and tokens exchanged (models/qwen/expert_parallel.py). None: one program over all experts.
    mesh: Mesh | None = None

    def __post_init__(self) -> None:
        if self.impl not in ("dense", "grouped"):
            raise ValueError(f"MoeSpec.impl={self.impl!r}; valid: 'dense', 'grouped'")

    @property
    def expert_parallel(self) -> bool:
        return self.mesh is not None and expert_parallel.expert_ways(self.mesh) > 1


def resolve_moe_impl(impl: str) -> str:
    """`model.moe_impl` -> the implementation run: "auto" is "grouped" on every backend."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"model.moe_impl={impl!r}; valid: {', '.join(MOE_IMPLS)}")
    return "grouped" if impl == "auto" else impl


def route(
    router_kernel_DxE: jax.Array, h_MxD: jax.Array, spec: MoeSpec, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits [M, E] (compute dtype), top-k weights [M, k] (compute dtype), experts [M, k].

    As `Qwen3MoeTopKRouter`: softmax in fp32, top-k of the probabilities, renormalised if
    `norm_topk_prob`, then cast to the logits' dtype.
    """
    logits_MxE = h_MxD.astype(dtype) @ kernel_value(router_kernel_DxE, dtype)
    probs_MxE = jax.nn.softmax(logits_MxE.astype(jnp.float32), axis=-1)
    weights_MxK, experts_MxK = jax.lax.top_k(probs_MxE, spec.top_k)
    if spec.norm_topk_prob:
        weights_MxK = weights_MxK / weights_MxK.sum(axis=-1, keepdims=True)
    return logits_MxE, weights_MxK.astype(logits_MxE.dtype), experts_MxK


def dense_experts(
    experts: Params, h_MxD: jax.Array, weights_MxK: jax.Array, experts_MxK: jax.Array, dtype: Any
) -> jax.Array:
    """Every expert on every token; outputs summed with the top-k gates (zero for the others)."""
    num_experts = experts["gate_proj"]["kernel"].shape[0]
    one_hot_MxKxE = jax.nn.one_hot(experts_MxK, num_experts, dtype=weights_MxK.dtype)
    gates_MxE = jnp.einsum("mk,mke->me", weights_MxK, one_hot_MxKxE)

    def kernel(name: str) -> jax.Array:
        return kernel_value(experts[name]["kernel"], dtype)

    gate_MxExF = jnp.einsum("md,edf->mef", h_MxD, kernel("gate_proj"))
    up_MxExF = jnp.einsum("md,edf->mef", h_MxD, kernel("up_proj"))
    act_MxExF = jax.nn.silu(gate_MxExF) * up_MxExF
    out_MxExD = jnp.einsum("mef,efd->med", act_MxExF, kernel("down_proj"))
    return jnp.einsum("med,me->md", out_MxExD, gates_MxE.astype(dtype))


def grouped_experts(
    experts: Params, h_MxD: jax.Array, weights_MxK: jax.Array, experts_MxK: jax.Array, dtype: Any
) -> jax.Array:
    """Only the routed experts: token-slots sorted by expert, one `ragged_dot` per projection.

    Slot s = m * k + j is token m's j-th choice. Sorting the slots by expert makes each expert's
    rows contiguous, which is the layout ragged_dot's `group_sizes` describe; a gather with the
    inverse permutation puts the outputs back, and each token sums its k weighted outputs.
    """
    num_tokens, top_k = experts_MxK.shape
    num_experts = experts["gate_proj"]["kernel"].shape[0]
    expert_of_slot_S = experts_MxK.reshape(-1)
    order_S = jnp.argsort(expert_of_slot_S, stable=True)
    group_sizes_E = jnp.bincount(expert_of_slot_S, length=num_experts).astype(jnp.int32)
    x_SxD = jnp.take(h_MxD, order_S // top_k, axis=0)

    def grouped(x: jax.Array, name: str) -> jax.Array:
        return jax.lax.ragged_dot(x, kernel_value(experts[name]["kernel"], dtype), group_sizes_E)

    act_SxF = jax.nn.silu(grouped(x_SxD, "gate_proj")) * grouped(x_SxD, "up_proj")
    out_SxD = grouped(act_SxF, "down_proj")
    out_SxD = out_SxD * jnp.take(weights_MxK.reshape(-1), order_S)[:, None].astype(dtype)
    unsorted_SxD = jnp.take(out_SxD, jnp.argsort(order_S), axis=0)
    return unsorted_SxD.reshape(num_tokens, top_k, -1).sum(axis=1)


def moe_block(
    moe: Params, h_BxTxD: jax.Array, spec: MoeSpec, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """The sparse block on normed hidden states: its output [B, T, D], router logits [B, T, E]."""
    batch, seq, dim = h_BxTxD.shape
    h_MxD = h_BxTxD.reshape(batch * seq, dim).astype(dtype)
    logits_MxE, weights_MxK, experts_MxK = route(moe["router"]["kernel"], h_MxD, spec, dtype)
    run = dense_experts if spec.impl == "dense" else grouped_experts
    if spec.expert_parallel:
        out_MxD = expert_parallel.run_sharded(
            run, moe["experts"], h_MxD, weights_MxK, experts_MxK, dtype, mesh=spec.mesh
        )
    else:
        out_MxD = run(moe["experts"], h_MxD, weights_MxK, experts_MxK, dtype)
    return out_MxD.reshape(batch, seq, dim), logits_MxE.reshape(batch, seq, -1)


def layer_residual_and_moe(
    layer: Params,
    x_BxTxD: jax.Array,
    attn_BxTxNxH: jax.Array,
    *,
    eps: float,
    spec: MoeSpec,
    dtype: Any,
    adapter: AdapterCall | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A sparse layer's second half, from the attention output: o_proj + residual, then the
    mixture of experts (layers.layer_residual_and_mlp is the dense one); also the router logits.

    `adapter` applies LoRA to o_proj as in a dense layer; the experts and router take no adapters.
    """
    x_BxTxD = attention_residual(layer, x_BxTxD, attn_BxTxNxH, dtype=dtype, adapter=adapter)
    h = rms_norm(x_BxTxD, layer["post_attention_layernorm"]["scale"], eps)
    out_BxTxD, logits_BxTxE = moe_block(layer["moe"], h, spec, dtype)
    return x_BxTxD + out_BxTxD, logits_BxTxE


def load_balancing_loss(
    router_logits_LxBxTxE: jax.Array, top_k: int, token_mask_BxT: jax.Array | None = None
) -> jax.Array:
    """The Switch-Transformer load-balancing loss, exactly as transformers'
    `load_balancing_loss_func` computes it for Qwen3-MoE.

    Over all L sparse layers and real tokens together (not a mean of per-layer losses):
    E * sum_e f_e * P_e, with f_e the fraction of (token, layer) rows whose top-k includes expert e
    (so sum_e f_e = k) and P_e the mean router probability of e. The counts carry no gradient;
    the probabilities do. `token_mask_BxT` (1 = real token) leaves padding out, as HF's
    attention-mask form does. fp32 throughout.
    """
    num_layers, batch, seq, num_experts = router_logits_LxBxTxE.shape
    probs_LxBxTxE = jax.nn.softmax(router_logits_LxBxTxE.astype(jnp.float32), axis=-1)
    _, selected_LxBxTxK = jax.lax.top_k(probs_LxBxTxE, top_k)
    counts_LxBxTxE = jax.nn.one_hot(selected_LxBxTxK, num_experts, dtype=jnp.float32).sum(axis=-2)
    if token_mask_BxT is None:
        token_mask_BxT = jnp.ones((batch, seq), jnp.float32)
    weight_1xBxTx1 = token_mask_BxT.astype(jnp.float32)[None, :, :, None]
    # Guarded so an all-padding micro-batch gives 0, not NaN (HF would divide by zero).
    rows = jnp.maximum(num_layers * token_mask_BxT.astype(jnp.float32).sum(), 1.0)
    tokens_per_expert_E = (counts_LxBxTxE * weight_1xBxTx1).sum(axis=(0, 1, 2)) / rows
    prob_per_expert_E = (probs_LxBxTxE * weight_1xBxTx1).sum(axis=(0, 1, 2)) / rows
    return num_experts * jnp.sum(tokens_per_expert_E * prob_per_expert_E)


def moe_spec_of(config: Any, impl: str, mesh: Mesh | None = None) -> MoeSpec | None:
    """The MoeSpec of a QwenConfig (None for a dense model); `impl` is `model.moe_impl`, `mesh`
    the mesh the model runs on (its `expert` axis, if > 1, must divide `num_experts`)."""
    if mesh is not None:
        expert_parallel.check_expert_mesh(config, expert_parallel.expert_ways(mesh))
    if not config.is_moe:
        return None
    return MoeSpec(
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        norm_topk_prob=config.norm_topk_prob,
        impl=resolve_moe_impl(impl),
        mesh=mesh if mesh is not None and expert_parallel.expert_ways(mesh) > 1 else None,
    )


def resolve_router_aux_loss_coef(configured: float, config: Any) -> float | None:
    """The aux-loss weight a run uses: `algorithm.router_aux_loss_coef`, where -1 means the
    model's own (config.json's `router_aux_loss_coef`); None for a dense model (no aux loss)."""
    if not config.is_moe:
        if configured != -1:
            raise ValueError(
                f"algorithm.router_aux_loss_coef={configured}: the model ({config.model_type}) "
                "has no mixture-of-experts layers; leave it at -1"
            )
        return None
    if configured == -1:
        return float(config.router_aux_loss_coef)
    if configured < 0:
        raise ValueError(
            f"algorithm.router_aux_loss_coef={configured}: must be >= 0, or -1 for the model's "
            f"own ({config.router_aux_loss_coef})"
        )
    return float(configured)
