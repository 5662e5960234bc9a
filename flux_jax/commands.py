"""What each `flux-jax` subcommand does, as importable functions (cli.py only parses arguments)."""

from __future__ import annotations

import os
from typing import Any

from flux_jax import errors
from flux_jax.config import FluxConfig


def train(config: FluxConfig, *, data=None, eval_data=None, data_format=None):
    from flux_jax.trainer import FluxTrainer

    trainer = FluxTrainer(config)
    return trainer.fit(prompts=data, data_format=data_format, eval_prompts=eval_data)


def evaluate(
    checkpoint: str,
    data: str,
    data_format: str | None,
    json_out: str | None,
    *,
    base_model: str | None = None,
) -> dict:
    """Preference metrics of a checkpoint against its base model, printed and written as JSON.

    The policy comes from the checkpoint alone; the reference is the base model the run started
    from (model_path, or `base_model`), which must still exist unless the run was reference-free.
    """
    from flux_jax.policy import Policy, as_reference
    from flux_jax.preference_eval import format_eval_table, write_eval_json

    policy = Policy.from_checkpoint(checkpoint, base_model=base_model)
    config = policy.config
    settings = policy.dpo_settings()
    reference = None
    if not settings.reference_free:
        base = policy.base_params(base_model, purpose="eval (scoring against the reference)")
        # LoRA: the reference is the policy's own frozen base (already in its dtype), no copy.
        reference = base if policy.lora else as_reference(base, config.model.compute_dtype)
    metrics = policy.evaluate_file(data, data_format, reference=reference, settings=settings)
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
    from flux_jax.data.sources import parse_columns
    from flux_jax.model_setup import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    report = data_check_report(
        args.file,
        tokenizer,
        data_format=args.format,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_record_bytes=getattr(args, "max_record_bytes", None) or DEFAULT_MAX_RECORD_BYTES,
        columns=parse_columns(getattr(args, "columns", None) or ""),
        tokenization=getattr(args, "tokenization", None) or "separate",
    )
    return format_data_check_report(report), report["ok"]


def export(
    checkpoint: str,
    out_dir: str,
    dtype: str | None,
    max_shard_size: str,
    *,
    adapter_only: bool = False,
    base_model: str | None = None,
) -> str:
    """Writes a checkpoint as an HF model dir, on one device, without a trainer.

    A LoRA checkpoint is written merged (the adapters folded into its base's weights; a QLoRA
    base is dequantised first, so the merged weights carry its quantisation error, as PEFT's
    merge_and_unload does), or with `adapter_only` as a PEFT adapter directory, which needs
    neither the base weights nor a merge.
    """
    if adapter_only:
        return export_adapter(checkpoint, out_dir, dtype or "float32")
    from flux_jax.policy import Policy

    policy = Policy.from_checkpoint(checkpoint, single_device=True, base_model=base_model)
    policy.export(out_dir, dtype=dtype, max_shard_size=max_shard_size)
    return out_dir


def export_adapter(checkpoint: str, out_dir: str, dtype: str) -> str:
    """A LoRA checkpoint's adapters as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, out_dir)` loads.

    Reads only the checkpoint: the adapter shapes come from the architecture its metadata records.
    """
    import jax
    from flax import nnx

    from flux_jax.adapter_checkpoint import saved_settings
    from flux_jax.best_checkpoint import load_params
    from flux_jax.checkpoint import read_metadata
    from flux_jax.lora import adapter_shapes
    from flux_jax.models.qwen.config import QwenConfig
    from flux_jax.models.qwen.model import build_model
    from flux_jax.peft_io import save_peft_adapter

    meta = read_metadata(checkpoint)
    settings = saved_settings(meta)
    if settings is None:
        raise errors.UserError(
            f"{checkpoint}: --adapter-only needs a LoRA checkpoint (a run with model.lora.rank > "
            "0); this run trained every weight: export it without --adapter-only"
        )
    model_config = QwenConfig.from_hf_config(meta["hf_config"])
    abstract_base = nnx.to_pure_dict(nnx.state(build_model(model_config, abstract=True)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda s: s.update(sharding=device), adapter_shapes(abstract_base, settings)
    )
    adapters = load_params(checkpoint, target)
    base_name = FluxConfig.from_dict(meta["flux_config"]).model_path
    return save_peft_adapter(out_dir, adapters, settings, model_config, base_name, dtype=dtype)


def generate(args: Any) -> None:
    """Completions of a checkpoint's policy (and of its base model with --compare-base)."""
    from flux_jax.policy import Policy

    policy = Policy.from_checkpoint(args.checkpoint, base_model=getattr(args, "base_model", None))
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
    trained = policy.generate(prompts, **sampling)
    base = None
    if args.compare_base:
        base_params = policy.base_params(
            getattr(args, "base_model", None), purpose="--compare-base"
        )
        base = policy.with_params(base_params).generate(prompts, **sampling)
    for i, prompt in enumerate(prompts):
        print(f"### prompt\n{prompt}\n### trained\n{trained[i]}")
        if base is not None:
            print(f"### base\n{base[i]}")
        print()


def plan(config: FluxConfig, device: str | None, devices: int | None) -> str:
    from flux_jax.memory_plan import plan_from_config
    from flux_jax.memory_report import format_memory_plan

    report = plan_from_config(config, num_devices=devices)
    return format_memory_plan(report, device=device)
