"""What each `flux-jax` subcommand does, as importable functions (cli.py only parses arguments)."""

from __future__ import annotations

import os
from typing import Any

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

    policy = Policy.from_checkpoint(checkpoint)
    config = policy.config
    settings = policy.dpo_settings()
    reference = None
    if not settings.reference_free:
        base = policy.base_params(base_model, purpose="eval (scoring against the reference)")
        reference = as_reference(base, config.model.compute_dtype)
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
    """Writes a checkpoint's parameters as an HF model dir, on one device, without a trainer."""
    from flux_jax.policy import Policy

    policy = Policy.from_checkpoint(checkpoint, single_device=True)
    policy.export(out_dir, dtype=dtype, max_shard_size=max_shard_size)
    return out_dir


def generate(args: Any) -> None:
    """Completions of a checkpoint's policy (and of its base model with --compare-base)."""
    from flux_jax.policy import Policy

    policy = Policy.from_checkpoint(args.checkpoint)
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
    from flux_jax.memory_plan import format_memory_plan, plan_from_config

    report = plan_from_config(config, num_devices=devices)
    return format_memory_plan(report, device=device)
