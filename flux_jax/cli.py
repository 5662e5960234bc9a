"""The `flux-jax` command: thin argument parsing over importable functions.

flux-jax train [--config FILE.py|FILE.yaml] [--config.algorithm.beta=0.2 ...] [--data F]
flux-jax demo                                   (= train with no config: the embedded default)
flux-jax eval --checkpoint DIR --data FILE [--json OUT]
flux-jax data check FILE --tokenizer DIR [--format F] [--max-length N] [--max-prompt-length N]
flux-jax export --checkpoint OUTPUT_DIR/best --out HF_DIR [--dtype bfloat16]
flux-jax generate --checkpoint DIR (--prompt TEXT ... | --prompts FILE) [--compare-base]
flux-jax plan --config FILE [--device h100] [--devices N]
flux-jax plot OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys

CONFIG_OVERRIDE = "--config."


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """ml_collections-style `--config.a.b=v` (or `--config.a.b v`) flags, and the rest."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(CONFIG_OVERRIDE):
            key_value = arg[len(CONFIG_OVERRIDE) :]
            if "=" not in key_value:
                if i + 1 >= len(argv):
                    raise SystemExit(f"flux-jax: {arg} needs a value")
                key_value, i = f"{key_value}={argv[i + 1]}", i + 1
            overrides.append(key_value)
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def _load_config(path: str | None, overrides: list[str]):
    from flux_jax.config import FluxConfig
    from flux_jax.demo import demo_config

    config = FluxConfig.from_file(path) if path else demo_config()
    return config.apply_overrides(overrides) if overrides else config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-jax", description="DPO for Qwen in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with DPO (no --config: the embedded tiny demo)")
    train.add_argument("--config", help="a configs/*.py (get_config) or a YAML file")
    train.add_argument("--data", help="training pairs (overrides data.train_path)")
    train.add_argument("--eval-data", help="held-out pairs (overrides data.eval_path)")
    train.add_argument("--format", choices=["preferences", "conversational", "implicit_prompt"])
    sub.add_parser("demo", help="the embedded default run (tiny model, bundled data)")

    ev = sub.add_parser("eval", help="preference metrics of a checkpoint on held-out pairs")
    ev.add_argument("--checkpoint", required=True, help="OUTPUT_DIR/best or a checkpoint dir")
    ev.add_argument("--data", required=True)
    ev.add_argument("--format", choices=["preferences", "conversational", "implicit_prompt"])
    ev.add_argument("--json", help="write the metrics here (default: CHECKPOINT/eval.json)")

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate a preference file and report lengths")
    check.add_argument("file")
    check.add_argument("--tokenizer", required=True, help="tokenizer dir, or builtin:tiny-qwen3")
    check.add_argument("--format", default="preferences")
    check.add_argument("--max-length", type=int, default=1024)
    check.add_argument("--max-prompt-length", type=int, default=512)

    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face model")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--max-shard-size", default="5GB")

    gen = sub.add_parser("generate", help="sample completions from a checkpoint")
    gen.add_argument("--checkpoint", required=True)
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", help="a file with one prompt per line")
    gen.add_argument("--compare-base", action="store_true", help="also print the base model's")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)

    plan = sub.add_parser("plan", help="per-device memory plan for a config")
    plan.add_argument("--config", help="a configs/*.py or YAML file (default: the demo)")
    plan.add_argument("--device", help="e.g. h100, v5e, v5p: say whether it fits")
    plan.add_argument("--devices", type=int, help="device count (default: this machine's)")

    plot = sub.add_parser("plot", help="PNG of the training curves of an output_dir")
    plot.add_argument("output_dir")
    plot.add_argument("--out")
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    # Our own progress at INFO; libraries (absl/orbax, jax) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flux_jax").setLevel(logging.INFO)
    overrides, argv = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(argv)
    if overrides and args.command not in ("train", "demo", "plan"):
        raise SystemExit(f"flux-jax {args.command}: --config.* only applies to train, demo, plan")
    from flux_jax import commands

    if args.command in ("train", "demo"):
        config = _load_config(getattr(args, "config", None), overrides)
        result = commands.train(
            config,
            data=getattr(args, "data", None),
            eval_data=getattr(args, "eval_data", None),
            data_format=getattr(args, "format", None),
        )
        return 0 if result.final_loss == result.final_loss else 1  # NaN loss fails the command
    if args.command == "eval":
        metrics = commands.evaluate(args.checkpoint, args.data, args.format, args.json)
        print(json.dumps(metrics, indent=2))
        return 0
    if args.command == "data":
        print(commands.data_check(args))
        return 0
    if args.command == "export":
        print(commands.export(args.checkpoint, args.out, args.dtype, args.max_shard_size))
        return 0
    if args.command == "generate":
        commands.generate(args)
        return 0
    if args.command == "plan":
        print(commands.plan(_load_config(args.config, overrides), args.device, args.devices))
        return 0
    if args.command == "plot":
        from flux_jax.plot import plot_metrics

        print(plot_metrics(args.output_dir, args.out))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
