"""From a config's model_path to a tokenizer and a policy model placed on the mesh.

`model_path` is a local HF model directory, a Hugging Face hub id such as "Qwen/Qwen3-8B"
(downloaded once through huggingface_hub's cache: safetensors, config and tokenizer files only;
see model_source.py for which spellings are hub ids), or "builtin:NAME" for a randomly
initialised preset shape (the tiny demo model, benchmark shapes), whose parameters are created
directly on their shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from flux_jax.hf_io import as_dtype, load_pretrained
from flux_jax.model_source import resolve_model_dir
from flux_jax.models.qwen.model import QwenForCausalLM, build_model
from flux_jax.models.qwen.presets import PRESETS
from flux_jax.sharding import batch_sharding, state_shardings

BUILTIN_PREFIX = "builtin:"


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

    @classmethod
    def from_config(cls, config: Any) -> ModelOptions:
        return cls(
            param_dtype=config.model.param_dtype,
            compute_dtype=config.model.compute_dtype,
            remat=config.model.remat,
            attention=config.model.attention,
            seed=config.seed,
            branch_masks=bool(config.model.prefix_sharing or config.model.packing),
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
            + ", ".join(f"builtin:{n}" for n in sorted(PRESETS))
        )
    return PRESETS[name]


def param_shardings(model: QwenForCausalLM, mesh: Mesh) -> dict:
    """A pure dict (same tree as the parameters) of NamedShardings from the logical axes."""
    return nnx.to_pure_dict(state_shardings(nnx.state(model, nnx.Param), mesh))


def load_model(model_path: str, options: ModelOptions, mesh: Mesh | None) -> QwenForCausalLM:
    """The policy model, its parameters on their shardings over `mesh` (if given)."""
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
        )

    abstract = nnx.eval_shape(make)
    graphdef, _ = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh) if mesh is not None else None
    # Initialise inside jit with output shardings: each device creates only its own slice.
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())), out_shardings=shardings)()
    return nnx.merge(graphdef, params)
