"""What each `flux-jax` subcommand does, as importable functions (cli.py only parses arguments)."""

from __future__ import annotations

import os
from typing import Any

from flux_jax.config import FluxConfig


def train(config: FluxConfig, *, data=None, eval_data=None, data_format=None):
    from flux_jax.trainer import FluxTrainer

    trainer = FluxTrainer(config)
    return trainer.fit(prompts=data, data_format=data_format, eval_prompts=eval_data)


def trainer_from_checkpoint(checkpoint: str):
    """A FluxTrainer built from the config saved with a checkpoint, holding its parameters."""
    from flux_jax.checkpoint import read_metadata
    from flux_jax.trainer import FluxTrainer

    meta = read_metadata(checkpoint)
    if "flux_config" not in meta:
        raise ValueError(f"{checkpoint}: no flux_config in its metadata (not from flux_jax?)")
    trainer = FluxTrainer(FluxConfig.from_dict(meta["flux_config"]))
    trainer.load_checkpoint(checkpoint)
    return trainer


def evaluate(checkpoint: str, data: str, data_format: str | None, json_out: str | None) -> dict:
    """Preference metrics of a checkpoint against its base model, printed and written as JSON."""
    from flux_jax.preference_eval import format_eval_table, write_eval_json

    trainer = trainer_from_checkpoint(checkpoint)
    metrics = trainer.evaluate(data, data_format)
    print(format_eval_table(metrics))
    write_eval_json(
        json_out or os.path.join(checkpoint, "eval.json"), metrics, checkpoint=checkpoint, data=data
    )
    return metrics


def data_check(args: Any) -> str:
    from flux_jax.data import data_check_report, format_data_check_report
    from flux_jax.model_setup import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    report = data_check_report(
        args.file,
        tokenizer,
        data_format=args.format,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )
    return format_data_check_report(report)


def export(checkpoint: str, out_dir: str, dtype: str | None, max_shard_size: str) -> str:
    """Writes a checkpoint's parameters as an HF model dir, without building a trainer."""
    import jax
    from flax import nnx

    from flux_jax.checkpoint import load_params, read_metadata
    from flux_jax.hf_io import save_pretrained
    from flux_jax.model_setup import is_builtin, load_tokenizer, resolve_model_dir
    from flux_jax.models.qwen.config import QwenConfig
    from flux_jax.models.qwen.model import build_model

    meta = read_metadata(checkpoint)
    qwen_config = QwenConfig.from_hf_config(meta["hf_config"])
    graphdef, abstract_state = nnx.split(build_model(qwen_config, abstract=True))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.to_pure_dict(abstract_state),
    )
    params = load_params(checkpoint, abstract)
    model = nnx.merge(graphdef, params)
    tokenizer_path = meta.get("tokenizer_path") or meta.get("model_path", "")
    source = None if is_builtin(tokenizer_path) else resolve_model_dir(tokenizer_path)
    save_pretrained(
        model, out_dir, tokenizer_from=source, dtype=dtype, max_shard_size=max_shard_size
    )
    if source is None:
        load_tokenizer(tokenizer_path).save_pretrained(out_dir)
    return out_dir


def generate(args: Any) -> None:
    from flax import nnx

    trainer = trainer_from_checkpoint(args.checkpoint)
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
    trained = trainer.generate(prompts, **sampling)
    base = None
    if args.compare_base:
        trained_params = trainer.params
        trainer.params = trainer.base_params()
        base = trainer.generate(prompts, **sampling)
        trainer.params = trained_params
        trainer.model = nnx.merge(trainer.graphdef, trained_params)
    for i, prompt in enumerate(prompts):
        print(f"### prompt\n{prompt}\n### trained\n{trained[i]}")
        if base is not None:
            print(f"### base\n{base[i]}")
        print()


def plan(config: FluxConfig, device: str | None, devices: int | None) -> str:
    from flux_jax.memory_plan import format_memory_plan, plan_from_config

    report = plan_from_config(config, num_devices=devices)
    return format_memory_plan(report, device=device)
