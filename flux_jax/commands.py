"""What each `flux-jax` subcommand does, as importable functions (cli.py only parses arguments)."""

from __future__ import annotations

import os
from typing import Any

from flux_jax.config import FluxConfig


def train(config: FluxConfig, *, data=None, eval_data=None, data_format=None):
    from flux_jax.trainer import FluxTrainer

    trainer = FluxTrainer(config)
    return trainer.fit(prompts=data, data_format=data_format, eval_prompts=eval_data)


def _saved_config(checkpoint: str, meta: dict[str, Any]) -> FluxConfig:
    if "flux_config" not in meta:
        raise ValueError(f"{checkpoint}: no flux_config in its metadata (not from flux_jax?)")
    return FluxConfig.from_dict(meta["flux_config"])


def _tokenizer_source(checkpoint: str, meta: dict[str, Any], config: FluxConfig) -> str:
    """Where the checkpoint's tokenizer is: the run's model_assets (checkpoints since they were
    kept), else the tokenizer_path / model_path of its config."""
    from flux_jax.checkpoint import model_assets_dir

    return model_assets_dir(checkpoint, meta) or config.tokenizer_path or config.model_path


def _require_base_model(model_path: str, checkpoint: str, purpose: str) -> None:
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


def trainer_from_checkpoint(checkpoint: str, *, base_model: str | None = None):
    """A FluxTrainer built from the config saved with a checkpoint, holding its parameters.

    It loads the base model (model_path, or `base_model` if given) as the reference, so the base
    weights must exist; the tokenizer comes from the run's saved model_assets.
    """
    from flux_jax.checkpoint import read_metadata
    from flux_jax.trainer import FluxTrainer

    meta = read_metadata(checkpoint)
    config = _saved_config(checkpoint, meta)
    if base_model:
        config.model_path = base_model
    _require_base_model(config.model_path, checkpoint, "eval (scoring against the reference)")
    config.tokenizer_path = _tokenizer_source(checkpoint, meta, config)
    trainer = FluxTrainer(config)
    trainer.load_checkpoint(checkpoint)
    return trainer


class CheckpointModel:
    """A checkpoint's policy, ready to generate: built from the saved config and model_assets,
    so neither the base weights nor the original model_path are needed."""

    def __init__(self, checkpoint: str):
        import jax
        from flax import nnx

        from flux_jax.checkpoint import load_params, read_metadata
        from flux_jax.distributed import initialize_distributed
        from flux_jax.hf_io import as_dtype
        from flux_jax.model_setup import ModelOptions, load_tokenizer, param_shardings
        from flux_jax.models.qwen.config import QwenConfig
        from flux_jax.models.qwen.model import build_model
        from flux_jax.sharding import batch_sharding, mesh_from_config

        self.checkpoint = checkpoint
        meta = read_metadata(checkpoint)
        self.config = _saved_config(checkpoint, meta)
        initialize_distributed()
        self.mesh = mesh_from_config(self.config.mesh)
        self.options = ModelOptions.from_config(self.config)
        self.tokenizer = load_tokenizer(_tokenizer_source(checkpoint, meta, self.config))
        abstract = build_model(
            QwenConfig.from_hf_config(meta["hf_config"]),
            param_dtype=as_dtype(self.options.param_dtype),
            compute_dtype=as_dtype(self.options.compute_dtype),
            attention_impl=self.options.attention_impl,
            activation_sharding=batch_sharding(self.mesh),
            abstract=True,
        )
        self.graphdef, abstract_params = nnx.split(abstract)
        target = jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            nnx.to_pure_dict(abstract_params),
            param_shardings(abstract, self.mesh),
        )
        self.params = load_params(checkpoint, target)

    def generate(self, prompts: list[str], *, params=None, **sampling: Any) -> list[str]:
        """Completions of the checkpoint's policy (or of `params`); defaults from
        config.generation."""
        from flax import nnx

        from flux_jax.generation import generate_text

        options = {**self.config.generation.to_dict(), **sampling}
        model = nnx.merge(self.graphdef, self.params if params is None else params)
        return generate_text(model, self.tokenizer, prompts, mesh=self.mesh, **options)

    def base_params(self, base_model: str | None = None):
        """The weights the run started from (model_path, or `base_model`): they must exist."""
        from flux_jax import train_step as ts
        from flux_jax.model_setup import load_model

        model_path = base_model or self.config.model_path
        _require_base_model(model_path, self.checkpoint, "--compare-base")
        return ts.split_model(load_model(model_path, self.options, self.mesh))[1]


def evaluate(
    checkpoint: str,
    data: str,
    data_format: str | None,
    json_out: str | None,
    *,
    base_model: str | None = None,
) -> dict:
    """Preference metrics of a checkpoint against its base model, printed and written as JSON."""
    from flux_jax.preference_eval import format_eval_table, write_eval_json

    trainer = trainer_from_checkpoint(checkpoint, base_model=base_model)
    metrics = trainer.evaluate(data, data_format)
    print(format_eval_table(metrics))
    write_eval_json(
        json_out or os.path.join(checkpoint, "eval.json"), metrics, checkpoint=checkpoint, data=data
    )
    return metrics


def data_check(args: Any) -> tuple[str, bool]:
    """The data-check report as text, and whether the data passed (no bad records or damaged
    shards, at least one valid pair); the CLI exits 1 when it did not."""
    from flux_jax.data import data_check_report, format_data_check_report
    from flux_jax.data.records import DEFAULT_MAX_RECORD_BYTES
    from flux_jax.model_setup import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    report = data_check_report(
        args.file,
        tokenizer,
        data_format=args.format,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_record_bytes=getattr(args, "max_record_bytes", None) or DEFAULT_MAX_RECORD_BYTES,
    )
    return format_data_check_report(report), report["ok"]


def export(checkpoint: str, out_dir: str, dtype: str | None, max_shard_size: str) -> str:
    """Writes a checkpoint's parameters as an HF model dir, without building a trainer."""
    import jax
    from flax import nnx

    from flux_jax.checkpoint import load_params, model_assets_dir, read_metadata
    from flux_jax.hf_io import save_pretrained
    from flux_jax.model_setup import is_builtin, load_tokenizer, resolve_model_dir
    from flux_jax.models.qwen.config import QwenConfig
    from flux_jax.models.qwen.model import build_model

    meta = read_metadata(checkpoint)
    assets = model_assets_dir(checkpoint, meta)
    qwen_config = QwenConfig.from_hf_config(meta["hf_config"])
    graphdef, abstract_state = nnx.split(build_model(qwen_config, abstract=True))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.to_pure_dict(abstract_state),
    )
    params = load_params(checkpoint, abstract)
    model = nnx.merge(graphdef, params)
    # The run's saved tokenizer and generation config; older checkpoints: the original dirs.
    tokenizer_path = assets or meta.get("tokenizer_path") or meta.get("model_path", "")
    source = None if is_builtin(tokenizer_path) else resolve_model_dir(tokenizer_path)
    save_pretrained(
        model, out_dir, tokenizer_from=source, dtype=dtype, max_shard_size=max_shard_size
    )
    if source is None:
        load_tokenizer(tokenizer_path).save_pretrained(out_dir)
    return out_dir


def generate(args: Any) -> None:
    """Completions of a checkpoint's policy (and of its base model with --compare-base)."""
    model = CheckpointModel(args.checkpoint)
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = args.prompt
    sampling = {
        k: v
        for k, v in {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    trained = model.generate(prompts, **sampling)
    base = None
    if args.compare_base:
        base_params = model.base_params(getattr(args, "base_model", None))
        base = model.generate(prompts, params=base_params, **sampling)
    for i, prompt in enumerate(prompts):
        print(f"### prompt\n{prompt}\n### trained\n{trained[i]}")
        if base is not None:
            print(f"### base\n{base[i]}")
        print()


def plan(config: FluxConfig, device: str | None, devices: int | None) -> str:
    from flux_jax.memory_plan import format_memory_plan, plan_from_config

    report = plan_from_config(config, num_devices=devices)
    return format_memory_plan(report, device=device)
