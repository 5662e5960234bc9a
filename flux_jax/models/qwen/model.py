"""The Qwen decoder as a Flax NNX module with stacked, scanned layers.

Every layer's parameters are stored stacked along a leading `layers` axis and applied with
`jax.lax.scan`, so compile time does not grow with depth. Parameter paths mirror HF's module names
(`layers/self_attn/q_proj/kernel`), which keeps the weight table in params.py short. Every
parameter carries `logical_axes` metadata (vocab, embed, heads, kv_heads, head_dim, mlp, layers,
expert) that sharding.py maps onto a device mesh. Qwen3-MoE's sparse blocks are stacked over the
sparse layers (`layers/moe/...`) and the dense MLPs over the dense ones; layer_stack.py scans runs
of one kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.models.qwen import layer_stack, moe, splash
from flux_jax.models.qwen import layers as qwen_layers
from flux_jax.models.qwen.config import QwenConfig

if TYPE_CHECKING:
    from flux_jax.lora import ActiveAdapters

# Attention implementations served by the splash kernel rather than `layers.attention_core`.
SPLASH_IMPLS = ("splash", "splash_interpret")

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    # Recompute everything in the backward pass: least memory, ~1.33x compute.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap elementwise work in between.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_init_normal = jax.nn.initializers.normal(stddev=0.02)


def _param(
    rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any, init: str
) -> nnx.Param:
    if init == "normal":
        value = _init_normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, logical_axes=axes)


class Projection(nnx.Module):
    """A kernel (and optional bias) stacked over layers; HF's nn.Linear, transposed."""

    def __init__(self, shape, axes, *, bias_shape=None, bias_axes=None, dtype, rngs):
        self.kernel = _param(rngs, shape, axes, dtype, "normal")
        if bias_shape is not None:
            self.bias = _param(rngs, bias_shape, bias_axes, dtype, "zeros")


class RMSNorm(nnx.Module):
    def __init__(self, shape, axes, *, dtype):
        self.scale = _param(None, shape, axes, dtype, "ones")


class Attention(nnx.Module):
    def __init__(self, cfg: QwenConfig, *, dtype, rngs):
        L, D, N, K, H = (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        bias = cfg.qkv_bias

        def proj(heads: int, heads_axis: str) -> Projection:
            return Projection(
                (L, D, heads, H),
                ("layers", "embed", heads_axis, "head_dim"),
                bias_shape=(L, heads, H) if bias else None,
                bias_axes=("layers", heads_axis, "head_dim"),
                dtype=dtype,
                rngs=rngs,
            )

        self.q_proj = proj(N, "heads")
        self.k_proj = proj(K, "kv_heads")
        self.v_proj = proj(K, "kv_heads")
        self.o_proj = Projection(
            (L, N, H, D), ("layers", "heads", "head_dim", "embed"), dtype=dtype, rngs=rngs
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm((L, H), ("layers", "head_dim"), dtype=dtype)
            self.k_norm = RMSNorm((L, H), ("layers", "head_dim"), dtype=dtype)


class MLP(nnx.Module):
    """The dense SwiGLU MLPs, stacked over the L dense layers."""

    def __init__(self, cfg: QwenConfig, L: int, *, dtype, rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Projection((L, D, F), ("layers", "embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Projection((L, D, F), ("layers", "embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Projection((L, F, D), ("layers", "mlp", "embed"), dtype=dtype, rngs=rngs)


class Experts(nnx.Module):
    """The routed SwiGLU experts of the L sparse layers: [L, E, ...] kernels."""

    def __init__(self, cfg: QwenConfig, L: int, *, dtype, rngs):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        in_axes = ("layers", "expert", "embed", "mlp")
        out_axes = ("layers", "expert", "mlp", "embed")
        self.gate_proj = Projection((L, E, D, F), in_axes, dtype=dtype, rngs=rngs)
        self.up_proj = Projection((L, E, D, F), in_axes, dtype=dtype, rngs=rngs)
        self.down_proj = Projection((L, E, F, D), out_axes, dtype=dtype, rngs=rngs)


class SparseMoe(nnx.Module):
    """Qwen3-MoE's sparse block over the L sparse layers: a router (HF `mlp.gate`), the experts."""

    def __init__(self, cfg: QwenConfig, L: int, *, dtype, rngs):
        shape = (L, cfg.hidden_size, cfg.num_experts)
        self.router = Projection(shape, ("layers", "embed", None), dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg, L, dtype=dtype, rngs=rngs)


class DecoderLayers(nnx.Module):
    """All decoder layers, each parameter stacked along a leading `layers` axis: attention and
    norms over every layer, `mlp` over the dense layers, `moe` over the sparse ones."""

    def __init__(self, cfg: QwenConfig, *, dtype, rngs):
        L, D = cfg.num_hidden_layers, cfg.hidden_size
        self.input_layernorm = RMSNorm((L, D), ("layers", "embed"), dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm((L, D), ("layers", "embed"), dtype=dtype)
        sparse = sum(cfg.sparse_layers)
        if L - sparse:
            self.mlp = MLP(cfg, L - sparse, dtype=dtype, rngs=rngs)
        if sparse:
            self.moe = SparseMoe(cfg, sparse, dtype=dtype, rngs=rngs)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, rngs):
        self.embedding = _param(rngs, (vocab, dim), ("vocab", "embed"), dtype, "normal")


class QwenForCausalLM(nnx.Module):
    """Qwen2/Qwen3 causal LM.

    Args:
      config: the architecture.
      param_dtype: dtype the parameters are stored in (fp32 master weights for training).
      compute_dtype: dtype of activations and matmuls; parameters are cast to it at use.
      remat: "none", "full" or "dots": rematerialisation policy applied to each layer.
      attention_impl: "xla" (layers.grouped_query_attention), "cudnn" or None (JAX chooses)
        for jax.nn.dot_product_attention, "splash" (the Pallas TPU kernel, models/qwen/splash.py)
        or "splash_interpret" (the same kernel through the Pallas interpreter, for CPU tests).
      activation_sharding: where the [B, T, D] hidden states live between layers, e.g.
        `sharding.batch_sharding(mesh)` (batch over data x fsdp). None leaves it to GSPMD, which
        under FSDP may gather the whole batch onto every device instead of gathering the weights.
        Its mesh's `expert` axis, if > 1, splits the experts (models/qwen/expert_parallel.py).
      moe_impl: how a Qwen3-MoE model runs its experts: "dense" (every expert on every token, the
        reference), "grouped" (jax.lax.ragged_dot over the routed tokens) or "auto" (= grouped).
    """

    def __init__(
        self,
        config: QwenConfig,
        *,
        param_dtype: Any = jnp.float32,
        compute_dtype: Any = jnp.float32,
        remat: str = "none",
        attention_impl: str | None = "xla",
        activation_sharding: jax.sharding.Sharding | None = None,
        moe_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; valid: {', '.join(REMAT_POLICIES)}")
        self.config = config
        self.compute_dtype = compute_dtype
        self.remat = remat
        self.attention_impl = attention_impl
        self.activation_sharding = activation_sharding
        # The experts follow the activations' mesh: an `expert` axis > 1 splits them over it.
        self.moe_spec = moe.moe_spec_of(
            config, moe_impl, mesh=getattr(activation_sharding, "mesh", None)
        )
        self.embed_tokens = Embedding(
            config.vocab_size, config.hidden_size, dtype=param_dtype, rngs=rngs
        )
        self.layers = DecoderLayers(config, dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm((config.hidden_size,), ("embed",), dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Projection(
                (config.hidden_size, config.vocab_size),
                ("embed", "vocab"),
                dtype=param_dtype,
                rngs=rngs,
            )

    def _attention(
        self, segment_ids_BxT: jax.Array, branch_ids_BxT: jax.Array | None
    ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        """attend(q, k, v) with this batch's mask bound: splash over the segment ids, or
        `attention_core` over the dense causal-segment (or shared-prefix branch) mask."""
        if self.attention_impl in SPLASH_IMPLS:
            if branch_ids_BxT is not None:
                raise ValueError(
                    "splash attention cannot express the shared-prefix (branch) mask; "
                    "use attention 'xla' or 'cudnn' with prefix sharing"
                )
            interpret = self.attention_impl == "splash_interpret"
            return lambda q, k, v: splash.splash_attention(
                q,
                k,
                v,
                segment_ids_BxT,
                activation_sharding=self.activation_sharding,
                interpret=interpret,
            )
        if branch_ids_BxT is None:
            mask = qwen_layers.causal_segment_mask(segment_ids_BxT)
        else:
            mask = qwen_layers.branch_segment_mask(segment_ids_BxT, branch_ids_BxT)
        return lambda q, k, v: qwen_layers.attention_core(q, k, v, mask, self.attention_impl)

    def lm_head_weight(self) -> jax.Array:
        """The [D, V] output projection (the transposed embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding.get_value().T
        return self.lm_head.kernel.get_value()

    def __call__(
        self,
        input_ids_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        *,
        segment_ids_BxT: jax.Array | None = None,
        attention_mask_BxT: jax.Array | None = None,
        branch_ids_BxT: jax.Array | None = None,
        return_hidden: bool = False,
        return_layer_outputs: bool = False,
        return_router_logits: bool = False,
        lora: ActiveAdapters | None = None,
    ) -> jax.Array | tuple[jax.Array, ...]:
        """Logits [B, T, V] in fp32, or the final normed hidden states [B, T, D].

        Attention is causal within segments: pass `segment_ids_BxT` (0 = padding; packed rows use
        1, 2, ...) or an HF-style `attention_mask_BxT` (1 = token, 0 = padding). Positions default
        to 0..T-1; packed rows must pass positions that restart per segment.
        `branch_ids_BxT` (0 = prompt, 1 = chosen, 2 = rejected; with `segment_ids_BxT`) selects the
        shared-prefix mask (`layers.branch_segment_mask`): both responses of a pair attend to its
        prompt, never to each other. Positions must then restart at the prompt length for the
        rejected branch (see flux_jax.data.packing).
        `return_layer_outputs` also returns every layer's output [L, B, T, D] (for parity checks).
        `return_router_logits` (MoE models only) also returns the sparse layers' router logits
        [L_sparse, B, T, E] in the compute dtype, last in the tuple (for the load-balancing loss).
        `lora` (flux_jax.lora.ActiveAdapters) adds the LoRA adapter path to the projections it
        targets, with dropout when it carries a dropout key; None is the plain (base) model.
        """
        cfg = self.config
        dtype = self.compute_dtype
        if segment_ids_BxT is None:
            if attention_mask_BxT is None:
                segment_ids_BxT = jnp.ones_like(input_ids_BxT)
            else:
                segment_ids_BxT = attention_mask_BxT.astype(jnp.int32)
        elif attention_mask_BxT is not None:
            raise ValueError("pass either segment_ids_BxT or attention_mask_BxT, not both")
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(
                jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape
            )
        x_BxTxD = jnp.take(self.embed_tokens.embedding.get_value(), input_ids_BxT, axis=0).astype(
            dtype
        )
        x_BxTxD = self._constrain(x_BxTxD)
        sin, cos = qwen_layers.rope_tables(positions_BxT, cfg.head_dim, cfg.rope_theta, dtype)
        attend = self._attention(segment_ids_BxT, branch_ids_BxT)

        if return_router_logits and self.moe_spec is None:
            raise ValueError("return_router_logits=True: this model has no mixture-of-experts")
        eps = cfg.rms_norm_eps

        def layer_step(x, layer_params, dropout_key, run):
            adapter = None
            if lora is not None:
                settings = lora.settings
                adapter = qwen_layers.AdapterCall(settings.scale, settings.dropout, dropout_key)
            router_logits = None
            if run.sparse:
                q, k, v = qwen_layers.layer_qkv(
                    layer_params, x, sin, cos, eps=eps, dtype=dtype, adapter=adapter
                )
                x, router_logits = moe.layer_residual_and_moe(
                    layer_params, x, attend(q, k, v), eps=eps, spec=self.moe_spec, dtype=dtype
                )
            else:
                x = qwen_layers.decoder_layer(
                    layer_params, x, sin, cos, attend, eps=eps, dtype=dtype, adapter=adapter
                )
            x = self._constrain(x)
            return x, (x if return_layer_outputs else None, router_logits)

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            layer_step = jax.checkpoint(
                layer_step, policy=policy, prevent_cse=False, static_argnums=(3,)
            )
        stacked = nnx.to_pure_dict(nnx.state(self.layers, nnx.Param))
        dropout_keys_L = None
        if lora is not None:
            stacked = _with_adapters(stacked, lora.adapters["layers"])
            if lora.dropout_rng is not None and lora.settings.dropout > 0:
                dropout_keys_L = jax.random.split(lora.dropout_rng, cfg.num_hidden_layers)
        runs = layer_stack.layer_runs(cfg.sparse_layers)
        x_BxTxD, outputs = layer_stack.scan_runs(
            layer_step, x_BxTxD, stacked, runs, per_layer=dropout_keys_L
        )
        layer_outputs_LxBxTxD = layer_stack.concat_runs(
            [ys[0] for ys in outputs], runs, sparse_only=False
        )
        hidden_BxTxD = qwen_layers.rms_norm(x_BxTxD, self.norm.scale.get_value(), cfg.rms_norm_eps)
        if return_hidden:
            out = hidden_BxTxD
        else:
            out = jnp.einsum(
                "BTD,DV->BTV",
                hidden_BxTxD,
                self.lm_head_weight().astype(dtype),
                preferred_element_type=jnp.float32,
            )
        extra = (layer_outputs_LxBxTxD,) if return_layer_outputs else ()
        if return_router_logits:
            extra += (layer_stack.concat_runs([ys[1] for ys in outputs], runs, sparse_only=True),)
        return (out, *extra) if extra else out

    def _constrain(self, x_BxTxD: jax.Array) -> jax.Array:
        if self.activation_sharding is None:
            return x_BxTxD
        try:
            self.activation_sharding.shard_shape(x_BxTxD.shape)
        except ValueError:  # a batch that does not divide over the devices: leave it to GSPMD
            return x_BxTxD
        return jax.lax.with_sharding_constraint(x_BxTxD, self.activation_sharding)


def _with_adapters(stacked: dict[str, Any], adapters: dict[str, Any]) -> dict[str, Any]:
    """The stacked layer parameters with each LoRA pair beside its kernel
    (`self_attn/q_proj/{kernel, lora_a, lora_b}`), so the layer scan slices both together."""
    out = dict(stacked)
    for group, projections in adapters.items():
        out[group] = dict(out.get(group, {}))
        for name, pair in projections.items():
            if name not in out[group]:
                raise ValueError(f"LoRA adapters for layers/{group}/{name}: no such projection")
            out[group][name] = {**out[group][name], **pair}
    return out


def build_model(
    config: QwenConfig, *, seed: int = 0, abstract: bool = False, **model_options: Any
) -> QwenForCausalLM:
    """A random model, or (abstract=True) one whose parameters are ShapeDtypeStructs.

    `model_options` go to `QwenForCausalLM` as they are (param_dtype, compute_dtype, remat,
    attention_impl, activation_sharding, moe_impl), so its signature holds the one set of defaults.
    """

    def make() -> QwenForCausalLM:
        return QwenForCausalLM(config, **model_options, rngs=nnx.Rngs(seed))

    return nnx.eval_shape(make) if abstract else make()
