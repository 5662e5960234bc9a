"""The `flux-jax` command: thin argument parsing over importable functions.

flux-jax train [--config FILE.py|FILE.yaml] [--config.algorithm.beta=0.2 ...] [--data F]
flux-jax demo                                   (= train with no config: the embedded default)
flux-jax eval --checkpoint DIR --data FILE [--json OUT]
flux-jax data check FILE --tokenizer DIR [--format F] [--max-length N] [--max-prompt-length N]
flux-jax export --checkpoint OUTPUT_DIR/best --out HF_DIR [--dtype bfloat16] [--adapter-only]
flux-jax generate --checkpoint DIR (--prompt TEXT ... | --prompts FILE) [--compare-base]
flux-jax plan --config FILE [--device h100] [--devices N]
flux-jax plot OUTPUT_DIR

Errors the user can fix (flux_jax.errors: a bad config or command line, a missing or malformed
data file, model dir or checkpoint, an output_dir another run holds, a run stopped by a NaN loss)
print one `flux-jax: error: ...` message, without a traceback, and exit with 2 (command line or
config) or 1 (the run could not start or stopped). Anything else is a bug and keeps its traceback.
`--debug` (anywhere on the line) or FLUX_DEBUG=1 shows the traceback of every error. Path
arguments have `~` and `$VARS` expanded, as in a shell, also when quoted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from flux_jax import errors
from flux_jax.config_schema import SCHEMA

log = logging.getLogger("flux_jax.cli")

CONFIG_OVERRIDE = "--config."
DEBUG_FLAG = "--debug"
# `data check` and --format follow the config: its defaults and its list of formats.
DATA_DEFAULTS = SCHEMA["data"]
DATA_FORMATS = DATA_DEFAULTS["format"].choices
# argparse destinations holding file system paths: `~` and `$VAR` are expanded in them.
PATH_ARGS = (
    "config",
    "data",
    "eval_data",
    "checkpoint",
    "out",
    "prompts",
    "json",
    "output_dir",
    "file",
    "tokenizer",
    "base_model",
)


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """ml_collections-style `--config.a.b=v` (or `--config.a.b v`) flags, and the rest."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(CONFIG_OVERRIDE):
            key_value = arg[len(CONFIG_OVERRIDE) :]
            if "=" not in key_value:
                if i + 1 >= len(argv):
                    raise errors.UsageError(f"{arg} needs a value")
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
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help="show the traceback of errors (or FLUX_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with DPO (no --config: the embedded tiny demo)")
    train.add_argument("--config", help="a configs/*.py (get_config) or a YAML file")
    train.add_argument("--data", help="training pairs (overrides data.train_path)")
    train.add_argument("--eval-data", help="held-out pairs (overrides data.eval_path)")
    train.add_argument("--format", choices=DATA_FORMATS)
    sub.add_parser("demo", help="the embedded default run (tiny model, bundled data)")

    ev = sub.add_parser("eval", help="preference metrics of a checkpoint on held-out pairs")
    ev.add_argument("--checkpoint", required=True, help="OUTPUT_DIR/best or a checkpoint dir")
    ev.add_argument("--data", required=True)
    ev.add_argument("--format", choices=DATA_FORMATS)
    ev.add_argument("--json", help="write the metrics here (default: CHECKPOINT/eval.json)")
    ev.add_argument("--base-model", help="the reference model, if not the run's model_path")

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate a preference file and report lengths")
    check.add_argument("file")
    check.add_argument("--tokenizer", required=True, help="tokenizer dir, or builtin:tiny-qwen3")
    check.add_argument("--format", default=DATA_DEFAULTS["format"].default)
    check.add_argument("--max-length", type=int, default=DATA_DEFAULTS["max_length"].default)
    check.add_argument(
        "--max-prompt-length", type=int, default=DATA_DEFAULTS["max_prompt_length"].default
    )
    check.add_argument("--max-record-bytes", type=int, help="longest JSONL line read (bytes)")
    check.add_argument(
        "--tokenization",
        choices=DATA_DEFAULTS["tokenization"].choices,
        default=DATA_DEFAULTS["tokenization"].default,
        help="token lengths as data.tokenization counts them",
    )
    check.add_argument(
        "--columns", help="the data's columns, as data.columns: prompt=question,chosen=good,..."
    )

    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face model")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--max-shard-size", default="5GB")
    export.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA checkpoint: write a PEFT adapter dir instead of the merged model",
    )
    export.add_argument("--base-model", help="LoRA: the base model, if not the run's model_path")

    gen = sub.add_parser("generate", help="sample completions from a checkpoint")
    gen.add_argument("--checkpoint", required=True)
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", help="a file with one prompt per line")
    gen.add_argument("--compare-base", action="store_true", help="also print the base model's")
    gen.add_argument("--base-model", help="with --compare-base: the base, if not model_path")
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


def _debug_requested(argv: list[str]) -> bool:
    flag = os.environ.get("FLUX_DEBUG", "").strip().lower()
    return DEBUG_FLAG in argv or flag not in ("", "0", "false", "no", "off")


def _expand_paths(args: argparse.Namespace) -> None:
    """`~` and `$VAR` in path arguments expanded in place; an unset variable is a usage error."""
    from flux_jax.config import expand_path

    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            try:
                setattr(args, name, expand_path(value))
            except ValueError as e:
                flag = name if name == "output_dir" else "--" + name.replace("_", "-")
                raise errors.UsageError(f"{flag}: {e}") from None


def _say_what_trains(config, args: argparse.Namespace) -> None:
    """One line when the run uses the builtin model or the bundled data: friendly for the demo
    (no --config), a warning when a config file left model_path or the data unset."""
    from flux_jax.model_setup import is_builtin

    data = args.data or config.data.train_path
    builtin = is_builtin(config.model_path)
    if args.config is None:
        if not builtin:
            return
        which = "flux-jax demo" if args.command == "demo" else "flux-jax train (no --config)"
        steps = f"{config.num_steps} step{'s' if config.num_steps != 1 else ''}"
        print(
            f"{which}: training the builtin tiny Qwen3 ({config.model_path}, random weights, "
            f"nothing downloaded) on {data or 'the bundled demo pairs'} for {steps}; output in "
            f"{config.output_dir}. "
            f"For your own model and data: flux-jax train --config FILE (see configs/)",
            flush=True,
        )
        return
    if builtin:
        log.warning(
            "%s: model_path is %s (the default when a config sets none): training the builtin "
            "tiny Qwen3 with random weights, not a real model; set model_path to an HF model "
            "directory or hub id",
            args.config,
            config.model_path,
        )
    if not data:
        log.warning(
            "%s: no training data (data.train_path, or --data): training on the bundled demo "
            "pairs (and evaluating on their bundled eval split unless data.eval_path is set)",
            args.config,
        )


def _library_tracebacks_off(record: logging.LogRecord) -> bool:
    """Keeps a library's log record but drops its traceback (--debug keeps them).

    A failed background save (disk full) makes orbax's and tensorstore's threads log hundreds of
    traceback lines; the cause reaches the user as our one `flux-jax: error:` line instead.
    """
    if not record.name.startswith("flux_jax"):
        record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def main(argv: list[str] | None = None) -> int:
    """Runs one `flux-jax` command; returns its exit code (errors: see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    # Our own progress at INFO; libraries (absl/orbax, jax) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flux_jax").setLevel(logging.INFO)
    if not debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_library_tracebacks_off)
    try:
        return _run_command(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("flux-jax: interrupted", file=sys.stderr, flush=True)
        return errors.EXIT_INTERRUPTED
    except Exception as error:
        if debug or not errors.is_user_error(error):
            raise
        print(errors.error_message(error), file=sys.stderr, flush=True)
        return errors.exit_code_of(error)


def _run_command(argv: list[str]) -> int:
    overrides, argv = _split_overrides(argv)
    args = _parser().parse_args(argv)
    if overrides and args.command not in ("train", "demo", "plan"):
        raise errors.UsageError(
            f"flux-jax {args.command}: --config.* only applies to train, demo, plan"
        )
    _expand_paths(args)
    from flux_jax import commands

    if args.command in ("train", "demo"):
        if args.command == "demo":
            args.config = args.data = args.eval_data = args.format = None
        config = _load_config(args.config, overrides)
        _say_what_trains(config, args)
        result = commands.train(
            config, data=args.data, eval_data=args.eval_data, data_format=args.format
        )
        if result.final_loss != result.final_loss:
            raise errors.UserError("the run finished without a single finite loss")
        return 0
    if args.command == "eval":
        metrics = commands.evaluate(
            args.checkpoint, args.data, args.format, args.json, base_model=args.base_model
        )
        print(json.dumps(metrics, indent=2))
        return 0
    if args.command == "data":
        report, ok = commands.data_check(args)
        print(report)
        return 0 if ok else 1  # bad records or no pairs: fail a data pipeline's check step
    if args.command == "export":
        print(
            commands.export(
                args.checkpoint,
                args.out,
                args.dtype,
                args.max_shard_size,
                adapter_only=args.adapter_only,
                base_model=args.base_model,
            )
        )
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
