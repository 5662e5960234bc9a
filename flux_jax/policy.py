"""Policy: a model ready for inference, with everything that serves it and nothing that trains it.

    policy = Policy.from_checkpoint("outputs/dpo/best")
    print(policy.generate(["Hello there"]))
    policy.export("hf_out")

A Policy is the graphdef, the parameters, the tokenizer, the mesh and the run's config. It serves
`flux-jax eval`, `generate` and `export`, and FluxTrainer's generate/export/evaluate; none of them
builds a trainer. A checkpoint's policy needs only the checkpoint and its run's model_assets (the
saved config and tokenizer); the base weights are loaded only where they are the point (`eval`'s
reference, `generate --compare-base`), after a clear error if they are gone.

A LoRA policy is the frozen base (`params`) plus its adapters (`adapters`, `lora`): a LoRA
checkpoint holds only the adapters, so loading one loads its base (checked against the
fingerprint the checkpoint recorded), and generate / eval / export run on the merged weights.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from flux_jax import logprob_chunk, train_batches, train_data
from flux_jax.config import FluxConfig
from flux_jax.data.pipeline import pad_token_id
from flux_jax.dpo import DPOSettings
from flux_jax.lora import LoraSettings, adapter_shapes, merge
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.models.qwen.model import QwenForCausalLM

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity, never by its weights
class Policy:
    """A model's graphdef and parameters with its tokenizer, mesh and config.

    `tokenizer_source`: where `export` copies tokenizer files from (a run's model_assets, an HF
    directory or hub id, or a "builtin:" name). `checkpoint`: the checkpoint it was loaded from,
    if any, named in errors about its base model. With LoRA, `params` is the frozen base and
    `adapters` (with its `lora` settings) what was trained on it; `trainable` is whichever of the
    two a training state holds.
    """

    graphdef: nnx.GraphDef
    params: PyTree
    tokenizer: PreTrainedTokenizerBase
    mesh: Mesh | None
    config: FluxConfig
    model_config: QwenConfig
    tokenizer_source: str
    checkpoint: str | None = None
    adapters: PyTree | None = None
    lora: LoraSettings | None = None

    def __post_init__(self) -> None:
        if len(self.tokenizer) > self.model_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is "
                f"{self.model_config.vocab_size}: token ids would index past the embedding"
            )

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: QwenForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        mesh: Mesh | None,
        config: FluxConfig,
    ) -> Policy:
        """The policy of a loaded model (FluxTrainer's), its tokenizer from config's paths."""
        graphdef, state = nnx.split(model)
        return cls(
            graphdef=graphdef,
            params=nnx.to_pure_dict(state),
            tokenizer=tokenizer,
            mesh=mesh,
            config=config,
            model_config=model.config,
            tokenizer_source=config.tokenizer_path or config.model_path,
        )

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str, *, single_device: bool = False, base_model: str | None = None
    ) -> Policy:
        """The policy saved in `checkpoint` (`output_dir/best` or a step directory).

        Built from the config and model_assets the run saved, so neither the base weights nor
        the original model_path are needed -- except for a LoRA checkpoint, whose adapters are
        loaded on top of the base at model_path (or `base_model`, if it moved), checked against
        the fingerprint the run recorded. The parameters go on the run's mesh, or with
        `single_device` on one device (export: any machine can write the HF files).
        """
        from flux_jax.adapter_checkpoint import saved_settings
        from flux_jax.best_checkpoint import load_params
        from flux_jax.checkpoint import model_assets_dir, read_metadata
        from flux_jax.distributed import initialize_distributed
        from flux_jax.hf_io import as_dtype
        from flux_jax.model_setup import ModelOptions, load_tokenizer, param_shardings
        from flux_jax.models.qwen.model import build_model
        from flux_jax.sharding import batch_sharding, mesh_from_config

        meta = read_metadata(checkpoint)
        if "flux_config" not in meta:
            raise ValueError(f"{checkpoint}: no flux_config in its metadata (not from flux_jax?)")
        config = FluxConfig.from_dict(meta["flux_config"])
        initialize_distributed()
        mesh = None if single_device else mesh_from_config(config.mesh)
        if saved_settings(meta) is not None:
            return cls._from_adapter_checkpoint(checkpoint, meta, config, mesh, base_model)
        options = ModelOptions.from_config(config)
        model_config = QwenConfig.from_hf_config(meta["hf_config"])
        abstract = build_model(
            model_config,
            param_dtype=as_dtype(options.param_dtype),
            compute_dtype=as_dtype(options.compute_dtype),
            attention_impl=options.attention_impl,
            activation_sharding=batch_sharding(mesh) if mesh is not None else None,
            abstract=True,
        )
        graphdef, abstract_state = nnx.split(abstract)
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(abstract_state))
        else:
            shardings = param_shardings(abstract, mesh)
        target = jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            nnx.to_pure_dict(abstract_state),
            shardings,
        )
        # The run's saved tokenizer; checkpoints older than model_assets: its config's paths.
        tokenizer_source = (
            model_assets_dir(checkpoint, meta) or config.tokenizer_path or config.model_path
        )
        return cls(
            graphdef=graphdef,
            params=load_params(checkpoint, target),
            tokenizer=load_tokenizer(tokenizer_source),
            mesh=mesh,
            config=config,
            model_config=model_config,
            tokenizer_source=tokenizer_source,
            checkpoint=checkpoint,
        )

    @classmethod
    def _from_adapter_checkpoint(
        cls,
        checkpoint: str,
        meta: dict[str, Any],
        config: FluxConfig,
        mesh: Mesh | None,
        base_model: str | None,
    ) -> Policy:
        """A LoRA checkpoint's policy: its base loaded (and fingerprint-checked), then its
        adapters on the base's layout."""
        from flux_jax.adapter_checkpoint import BaseModel, check_matches, saved_settings
        from flux_jax.best_checkpoint import load_params
        from flux_jax.checkpoint import model_assets_dir
        from flux_jax.model_setup import ModelOptions, load_model, load_tokenizer

        settings = saved_settings(meta)
        model_path = base_model or config.model_path
        require_base_model(model_path, checkpoint, "loading its LoRA adapters")
        base = BaseModel.of(model_path, config.seed, config.model.lora)
        check_matches(meta, checkpoint, settings=settings, base=base, action="load")
        model = load_model(model_path, ModelOptions.from_config(config), mesh)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda s: s.update(sharding=s.sharding or device),
            adapter_shapes(nnx.to_pure_dict(nnx.state(model)), settings),
        )
        tokenizer_source = (
            model_assets_dir(checkpoint, meta) or config.tokenizer_path or config.model_path
        )
        policy = cls.from_model(model, load_tokenizer(tokenizer_source), mesh, config)
        return dataclasses.replace(
            policy,
            tokenizer_source=tokenizer_source,
            checkpoint=checkpoint,
            adapters=load_params(checkpoint, target),
            lora=settings,
        )

    def with_params(self, params: PyTree) -> Policy:
        """The same policy with other parameters (a training state's, the base model's);
        adapters are dropped (the base model's policy)."""
        return dataclasses.replace(self, params=params, adapters=None, lora=None)

    def with_adapters(self, adapters: PyTree, settings: LoraSettings) -> Policy:
        """This policy's parameters as the frozen base, with LoRA adapters on top."""
        return dataclasses.replace(self, adapters=adapters, lora=settings)

    @property
    def trainable(self) -> PyTree:
        """What training updates: the adapters of a LoRA policy, else the parameters."""
        return self.adapters if self.lora is not None else self.params

    def with_trainable(self, trainable: PyTree) -> Policy:
        """The same policy with other trained values (adapters, or parameters)."""
        if self.lora is not None:
            return dataclasses.replace(self, adapters=trainable)
        return dataclasses.replace(self, params=trainable)

    def serving_params(self) -> PyTree:
        """The weights generate / eval / export run on: the base with the adapters merged in
        (a new copy of the targeted kernels), or the parameters."""
        if self.lora is None:
            return self.params
        return merge(self.params, self.adapters, self.lora)

    @property
    def model(self) -> QwenForCausalLM:
        """The model on `serving_params()` (for LoRA: merges on every access)."""
        return nnx.merge(self.graphdef, self.serving_params())

    def dpo_settings(self) -> DPOSettings:
        """The DPO settings of the config, with the LM-head chunk the run uses
        (flux_jax.logprob_chunk.lm_head_chunk_size: model.logprob_chunk_size, capped by the
        memory of one chunk's logits on one device)."""
        cfg = self.config
        chunk = logprob_chunk.lm_head_chunk_size(
            cfg.model.logprob_chunk_size,
            max_chunk_mib=cfg.model.logprob_chunk_mib,
            rows_per_step=2 * cfg.batch_size,  # chosen + rejected rows
            grad_accum_steps=cfg.grad_accum_steps,
            mesh_shape=self.mesh.shape if self.mesh is not None else None,
            vocab_size=self.model_config.vocab_size,
        )
        return DPOSettings.from_config(cfg, logprob_chunk_size=chunk)

    # -- serving -----------------------------------------------------------------------------------

    def generate(self, prompts: str | list[str], **sampling: Any) -> str | list[str]:
        """Completions of the policy; sampling defaults come from config.generation."""
        from flux_jax.generation import generate_text

        options = {**self.config.generation.to_dict(), **sampling}
        return generate_text(self.model, self.tokenizer, prompts, mesh=self.mesh, **options)

    def export(self, out_dir: str, *, dtype: str | None = None, max_shard_size: str = "5GB") -> str:
        """Writes the policy as a Hugging Face model directory (with its tokenizer files)."""
        from flux_jax.distributed import is_main_process
        from flux_jax.hf_io import save_pretrained
        from flux_jax.model_setup import is_builtin, resolve_model_dir
        from flux_jax.quantization import dequantize_base

        source = (
            None if is_builtin(self.tokenizer_source) else resolve_model_dir(self.tokenizer_source)
        )
        # A QLoRA base's kernels are written dequantised (the ones the adapters were merged into
        # and the others): the merged weights carry the base's quantisation error, as PEFT's
        # merge_and_unload of a 4-bit model does.
        model = nnx.merge(self.graphdef, dequantize_base(self.serving_params()))
        out = save_pretrained(
            model, out_dir, tokenizer_from=source, dtype=dtype, max_shard_size=max_shard_size
        )
        if source is None and is_main_process():  # a builtin tokenizer has no files to copy
            self.tokenizer.save_pretrained(out_dir)
        return out

    def evaluate(
        self, examples: list, *, reference: PyTree | None, settings: DPOSettings
    ) -> dict[str, float]:
        """DPO metrics over `examples` (the first eval.max_batches batches, if set) against the
        `reference` parameters (None: reference-free, or log-probs precomputed into examples)."""
        from flux_jax.data.unpaired import is_unpaired
        from flux_jax.preference_eval import evaluate_examples

        if is_unpaired(examples) or settings.unpaired:
            raise ValueError(
                "evaluation of unpaired data / KTO (data.format unpaired) is not supported yet"
            )
        batch_size = train_data.eval_batch_size(self.config, self.mesh)
        if self.config.eval.max_batches:
            examples = examples[: self.config.eval.max_batches * batch_size]
        return evaluate_examples(
            self.graphdef,
            self.serving_params(),
            reference,
            examples,
            pad_id=pad_token_id(self.tokenizer),
            bucket_lengths=train_batches.bucket_ladder(self.config.data),
            batch_size=batch_size,
            settings=settings,
            mesh=self.mesh,
        )

    def evaluate_file(
        self,
        path: str,
        data_format: str | None,
        *,
        reference: PyTree | None,
        settings: DPOSettings,
    ) -> dict[str, float]:
        """`evaluate` over every pair at `path`, read as for training, plus `pairs_truncated`."""
        fmt = data_format or self.config.data.format
        examples, stats = train_data.load_examples(self.config, self.tokenizer, path, fmt)
        metrics = self.evaluate(examples, reference=reference, settings=settings)
        return metrics | {"pairs_truncated": float(stats.pairs_truncated)}

    def base_params(self, base_model: str | None = None, *, purpose: str) -> PyTree:
        """The weights the run started from (config.model_path, or `base_model`), on the mesh.

        For a checkpoint's policy they must still exist: a clear error names the path and the
        `purpose` (e.g. "--compare-base") otherwise.
        """
        from flux_jax.model_setup import ModelOptions, load_model

        if self.lora is not None:
            return self.params  # the frozen base (from `base_model`, if given, at load)
        model_path = base_model or self.config.model_path
        if self.checkpoint is not None:
            require_base_model(model_path, self.checkpoint, purpose)
        base = load_model(model_path, ModelOptions.from_config(self.config), self.mesh)
        return nnx.to_pure_dict(nnx.split(base)[1])


def as_reference(params: PyTree, compute_dtype: str) -> PyTree:
    """A copy of `params` in the compute dtype, as the frozen DPO reference (bf16 halves its
    memory). A copy, so donating the policy's buffers to the train step never frees it."""
    return _copy_as(params, jnp.dtype(compute_dtype))


@functools.partial(jax.jit, static_argnums=1)
def _copy_as(params: PyTree, dtype: Any) -> PyTree:
    # One executable for the whole tree, not one per leaf shape: op-by-op copies compiled ~a dozen
    # tiny programs at every start. Each leaf keeps its sharding (jit propagates it).
    return jax.tree.map(lambda x: jnp.copy(x.astype(dtype)), params)


def require_base_model(model_path: str, checkpoint: str, purpose: str) -> None:
    """Raises FileNotFoundError, naming the path, if the base weights of a checkpoint are gone.

    The run's model_assets hold its config and tokenizer, not the base weights (a copy of the
    whole model per run); only a local directory can be missing (hub ids are downloaded).
    """
    from flux_jax.model_setup import is_builtin
    from flux_jax.model_source import is_hub_id

    if is_builtin(model_path) or os.path.isdir(model_path) or is_hub_id(model_path):
        return
    raise FileNotFoundError(
        f"{checkpoint}: {purpose} needs the base model the run started from, model_path "
        f"{model_path!r}, which does not exist any more. Put the base model back at that path, "
        "or pass its new location with --base-model (checkpoints keep the config and tokenizer, "
        "not the base weights)."
    )
