"""From a config's model_path to a tokenizer and a policy model placed on the mesh.

`model_path` is a local HF model directory, a Hugging Face hub id such as "Qwen/Qwen3-8B"
(downloaded once through huggingface_hub's cache: safetensors, config and tokenizer files only;
see model_source.py for which spellings are hub ids), or "builtin:NAME" for a randomly
initialised preset shape (the tiny demo model, benchmark shapes), whose parameters are created
directly on their shardings.

The model-specific placement helpers live here too: `split_model` (graphdef + a plain parameter
dict) and `shard_params_like`, which places a Qwen parameter dict built outside the model (a
reference copy, host weights) on the shardings model.py's logical axes give it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from flux_jax.hf_io import as_dtype, load_pretrained
from flux_jax.model_source import resolve_model_dir
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.models.qwen.model import QwenForCausalLM, build_model
from flux_jax.models.qwen.presets import BUILTIN_PREFIX, PRESETS, config_of_shape
from flux_jax.quantization import BaseQuantization, quantize_base
from flux_jax.sharding import batch_sharding, logical_sharding, state_shardings


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to build the model: the `model` section of FluxConfig, as plain values."""

    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    seed: int = 0
    # Shared-prefix / packed rows need the branch mask, which the splash kernel cannot express.
    branch_masks: bool = False
    moe_impl: str = "auto"  # Qwen3-MoE experts: dense, grouped or auto (models/qwen/moe.py)
    # QLoRA: the frozen base's projections as int8 / NF4 codes (flux_jax/quantization.py).
    base_quantization: BaseQuantization = BaseQuantization()

    @classmethod
    def from_config(cls, config: Any) -> ModelOptions:
        """The options of a config. With LoRA the model's parameters are the frozen base, stored
        in model.lora.base_dtype ('' = the compute dtype: bf16 halves its memory)."""
        param_dtype = config.model.param_dtype
        quantization = BaseQuantization()
        if config.model.lora.rank:
            param_dtype = config.model.lora.base_dtype or config.model.compute_dtype
            quantization = BaseQuantization.from_config(config.model.lora)
        return cls(
            param_dtype=param_dtype,
            compute_dtype=config.model.compute_dtype,
            remat=config.model.remat,
            attention=config.model.attention,
            seed=config.seed,
            # prefix_sharing "auto" shares prefixes only with attention "xla", which this flag
            # (it steers attention "auto") never meets: an explicit true is what counts here.
            branch_masks=config.model.prefix_sharing is True or config.model.packing,
            moe_impl=config.model.moe_impl,
            base_quantization=quantization,
        )

    @property
    def attention_impl(self) -> str | None:
        """The model's attention_impl. "auto": the splash kernel on TPU for standard rows; on
        GPUs JAX's choice (cuDNN flash attention where it applies, XLA otherwise); on CPU (and for
        shared-prefix rows on TPU) our "xla" GQA einsums, faster on XLA:CPU than jax.nn's."""
        backend = jax.default_backend()
        if self.attention == "auto":
            if backend == "gpu":
                return None
            return "splash" if backend == "tpu" and not self.branch_masks else "xla"
        if self.attention == "splash" and backend != "tpu":
            raise ValueError(
                f"model.attention='splash' is the Pallas TPU kernel; this backend is {backend!r}. "
                "Use 'xla', or 'auto' (cuDNN flash attention on NVIDIA GPUs)."
            )
        return self.attention


def is_builtin(model_path: str) -> bool:
    return model_path.startswith(BUILTIN_PREFIX)


def load_tokenizer(model_path: str, tokenizer_path: str = "") -> PreTrainedTokenizerBase:
    source = tokenizer_path or model_path
    if is_builtin(source):
        from flux_jax.tiny_tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    setting = "tokenizer_path" if tokenizer_path else "model_path"
    return AutoTokenizer.from_pretrained(resolve_model_dir(source, setting))


def _builtin_preset(model_path: str):
    name = model_path[len(BUILTIN_PREFIX) :]
    if name not in PRESETS:
        raise ValueError(
            f"model_path {model_path!r}: unknown builtin model; available: "
            + ", ".join(BUILTIN_PREFIX + n for n in sorted(PRESETS))
        )
    return PRESETS[name]


def param_shardings(model: QwenForCausalLM, mesh: Mesh) -> dict:
    """A pure dict (same tree as the parameters) of NamedShardings from the logical axes."""
    return nnx.to_pure_dict(state_shardings(nnx.state(model, nnx.Param), mesh))


def load_model(model_path: str, options: ModelOptions, mesh: Mesh | None) -> QwenForCausalLM:
    """The policy model, its parameters on their shardings over `mesh` (if given).

    With `options.base_quantization` (a QLoRA base) the projection kernels are then replaced by
    their quantised codes and scales, sharded like them, one kernel at a time (the dense kernel
    is freed as soon as its codes exist).
    """
    model = _load_dense_model(model_path, options, mesh)
    if not options.base_quantization.enabled:
        return model
    graphdef, params = split_model(model)
    del model
    return nnx.merge(
        graphdef, quantize_base(params, options.base_quantization, delete_originals=True)
    )


def _load_dense_model(model_path: str, options: ModelOptions, mesh: Mesh | None) -> QwenForCausalLM:
    param_dtype = as_dtype(options.param_dtype)
    compute_dtype = as_dtype(options.compute_dtype)
    if not is_builtin(model_path):
        return load_pretrained(
            resolve_model_dir(model_path),
            dtype=param_dtype,
            compute_dtype=compute_dtype,
            mesh=mesh,
            remat=options.remat,
            attention_impl=options.attention_impl,
            moe_impl=options.moe_impl,
        )

    def make() -> QwenForCausalLM:
        return build_model(
            _builtin_preset(model_path),
            seed=options.seed,
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            remat=options.remat,
            attention_impl=options.attention_impl,
            activation_sharding=batch_sharding(mesh) if mesh is not None else None,
            moe_impl=options.moe_impl,
        )

    abstract = nnx.eval_shape(make)
    graphdef, _ = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh) if mesh is not None else None
    # Initialise inside jit with output shardings: each device creates only its own slice.
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())), out_shardings=shardings)()
    return nnx.merge(graphdef, params)


def split_model(model: QwenForCausalLM) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """The model's static structure and its parameters as a plain nested dict of arrays."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


# ----------------------------------------------------------------------------------------------
# Placing a parameter tree built outside the model


def shard_params_like(
    params: Any, mesh: Mesh, *, dtype: Any = None, copy: bool = False
) -> dict[str, Any]:
    """A Qwen parameter dict (as from `nnx.to_pure_dict`) placed on its shardings over `mesh`.

    For a tree built outside the model, such as a reference copy in another dtype or weights read
    on the host. The logical axes come from the model itself (model.py's annotations, for the
    architecture the shapes describe), so this cannot drift from what `state_shardings` gives.
    Host (numpy) leaves are placed with `jax.make_array_from_callback`, so on a multi-host run a
    process copies only the blocks its devices hold. `dtype` casts (e.g. bf16 for the frozen
    reference). Where neither placement nor dtype changes, the result may share buffers with
    `params`: pass `copy=True` when `params` will be donated (e.g. the policy's parameters that
    the train step updates in place) and the result must outlive that.
    """
    axes_tree = qwen_logical_axes(params)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731

    def place(axes: tuple[str | None, ...], x: Any) -> jax.Array:
        target = logical_sharding(mesh, axes, x.shape)
        out_dtype = np.dtype(dtype if dtype is not None else x.dtype)
        if not isinstance(x, jax.Array):
            host = np.asarray(x)
            return jax.make_array_from_callback(
                host.shape, target, lambda index: host[index].astype(out_dtype), dtype=out_dtype
            )
        out = jax.device_put(x, target)
        if out.dtype != out_dtype:
            return out.astype(out_dtype)  # elementwise: keeps the sharding, new buffers
        return jax.numpy.copy(out) if copy and out is x else out

    return jax.tree.map(place, axes_tree, params, is_leaf=is_axes)


def qwen_logical_axes(params: Any) -> dict[str, Any]:
    """The logical axes of every parameter of a Qwen parameter dict, same tree, from model.py."""
    abstract = build_model(_architecture_of(params), abstract=True)
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    axes: dict[str, Any] = {}
    for path, var in flat:
        node = axes
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(var.get_metadata()["logical_axes"])
    got = jax.tree.structure(jax.tree.map(lambda _: 0, params))
    want = jax.tree.structure(
        jax.tree.map(lambda _: 0, axes, is_leaf=lambda x: isinstance(x, tuple))
    )
    if got != want:
        raise ValueError(
            f"not a Qwen parameter dict of the shape model.py builds:\n  got  {got}\n  want {want}"
        )
    return axes


def _architecture_of(params: Any) -> QwenConfig:
    """The QwenConfig whose parameter shapes these are (numerics fields left at defaults)."""
    try:
        vocab, hidden = params["embed_tokens"]["embedding"].shape
        attn = params["layers"]["self_attn"]
        layers, _, heads, head_dim = attn["q_proj"]["kernel"].shape
        kv_heads = attn["k_proj"]["kernel"].shape[2]
        dense_layers, mlp = 0, 1
        if "mlp" in params["layers"]:
            dense_layers, _, mlp = params["layers"]["mlp"]["gate_proj"]["kernel"].shape
        fields: dict[str, Any] = {"model_type": "qwen2" if "bias" in attn["q_proj"] else "qwen3"}
        if "moe" in params["layers"]:
            # Qwen3-MoE: only the counts of dense and sparse layers show in the shapes, so the
            # dense ones are put first; the axes and shapes are what callers use this for.
            _, experts, _, moe_mlp = params["layers"]["moe"]["experts"]["gate_proj"]["kernel"].shape
            fields = dict(
                model_type="qwen3_moe",
                num_experts=experts,
                num_experts_per_tok=1,
                moe_intermediate_size=moe_mlp,
                mlp_only_layers=tuple(range(dense_layers)),
            )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a Qwen parameter dict (as from nnx.to_pure_dict): {e!r}") from e
    tied = "lm_head" not in params
    return config_of_shape(
        vocab, hidden, mlp, layers, heads, kv_heads, head_dim, tied=tied, **fields
    )
