"""End-to-end speed of `FluxTrainer.fit` on a JSONL file and an HF model directory; prints JSON.

    python tools/make_length_mix.py --mix fixed --out /tmp/mix-fixed --model qwen3-40m
    python tools/bench_file.py --data /tmp/mix-fixed/train.jsonl --model-dir /tmp/mix-fixed/model \
        --batch 8 --steps 16 --reference model
    python tools/bench_file.py ... --reference precomputed
    python tools/bench_file.py ... --set data.group_by_length=false   # any config override
    /tmp/trl-venv/bin/python tools/bench_trl.py --data ... --model-dir ... --batch 8 --steps 16

The run is what `flux-jax train` does: tokenising the file, the batch plan (flux_jax.train_batches:
buckets, length grouping), the reference (online or precomputed up front), the jitted steps, one
checkpoint at the end. fp32, one process, the mesh over every local device (--cpu-devices N fakes
N CPU devices). The compilation cache is a fresh directory per run unless --compile-cache DIR
(reuse it to measure a warm start) or --compile-cache off.

Reported (times in seconds):
  init_s                 FluxTrainer(config): tokenizer, model load, reference copy
  startup_s              init + fit() until the first train step is dispatched: data loading,
                         the reference precomputation, tracing, compiling (or loading from the
                         compilation cache) step 1's executable; the step's compute not included
  time_to_first_step_s   init + fit() until step 1's metrics reach the callback (data loading,
                         reference precomputation, the first compiles)
  step_time_s            median time between consecutive step callbacks of the --steps steps
                         after --warmup, over the intervals in which nothing compiled (metrics
                         arrive one step late, so the interval ending at step i's callback is
                         about step i + 1's time; a new shape's compile lands in the interval
                         before its step)
  compiles               XLA compilations during fit() (JAX's backend-compile events), and
                         compile_s their total; cache_hits: executables loaded from the cache
  compiled_shapes        distinct training batch shapes in the steps run
  tokens_per_step        real tokens of the standard layout (prompt + chosen, prompt + rejected),
                         the mean over the timed steps; a layout that computes a shared prompt
                         once still counts it twice, so layouts compare on equal terms (bench.py)
  tokens_per_s           tokens_per_step / step_time_s
  end_to_end_tokens_per_s  all steps' tokens / (fit start to the last step's callback)
  padded_fraction        padded tokens / computed tokens over the steps run (standard rows: the
                         shorter of chosen / rejected pads too)
The batches are rebuilt on the side (the plan is a pure function of config and data) to count
tokens and shapes without touching the training loop.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import tempfile
import time
from typing import Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="JSONL file (preferences format)")
    parser.add_argument("--model-dir", required=True, help="HF model dir with tokenizer files")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=16, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--reference", default="model", choices=["model", "precomputed"])
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--compile-cache", default="", help="DIR, or off; '' = a fresh dir")
    parser.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices")
    parser.add_argument("--set", action="append", default=[], help="config override a.b=v")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (step 1 has no interval to time)")
    return args


def make_config(args: argparse.Namespace, work: str) -> Any:
    from flux_jax.config import FluxConfig

    config = FluxConfig.default()
    overrides = {
        "model_path": args.model_dir,
        "data.train_path": args.data,
        "output_dir": os.path.join(work, "run"),
        "seed": args.seed,
        "num_steps": args.warmup + args.steps,
        "batch_size": args.batch,
        "learning_rate": 1e-6,
        "data.max_length": args.max_length,
        "data.max_prompt_length": args.max_prompt_length,
        "algorithm.precompute_ref_logps": args.reference == "precomputed",
        "checkpoint.save_steps": args.warmup + args.steps,
        "checkpoint.async_save": False,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "logging.every_steps": args.warmup + args.steps,
        "compile_cache.enabled": args.compile_cache != "off",
        "compile_cache.dir": args.compile_cache
        if args.compile_cache not in ("", "off")
        else os.path.join(work, "xla"),
    }
    config.apply_overrides([f"{k}={v}" for k, v in overrides.items()] + args.set)
    return config.validate()


def replay_batches(config: Any, steps: int) -> list[dict[str, Any]]:
    """Per training step (as the trainer builds them): real standard-layout tokens, real and
    computed tokens of the batch, its token-row shape."""
    import numpy as np

    from flux_jax.data.batching import real_and_computed_tokens
    from flux_jax.data.pipeline import pad_token_id
    from flux_jax.model_setup import load_tokenizer
    from flux_jax.train_batches import one_process_batches
    from flux_jax.train_data import load_examples

    tokenizer = load_tokenizer(config.model_path, config.tokenizer_path)
    examples, _ = load_examples(config, tokenizer, config.data.train_path, config.data.format)
    _, dataset = one_process_batches(config, examples, pad_id=pad_token_id(tokenizer))
    out = []
    for batch in itertools.islice(dataset, steps):
        real, computed = real_and_computed_tokens(batch)
        if "branch_ids" in batch:  # a shared prompt counts twice in the standard layout
            shared = (batch["branch_ids"] == 0) & (batch["segment_ids"] > 0)
            standard = real + int(np.count_nonzero(shared))
            shape = batch["input_ids"].shape
        else:
            standard, shape = real, batch["chosen_input_ids"].shape
        out.append({"standard": standard, "real": real, "computed": computed, "shape": shape})
    return out


class CompileEvents:
    """Times at which XLA compilations finished, their durations, and cache hits."""

    def __init__(self) -> None:
        import jax

        self.compiles: list[tuple[float, float]] = []
        self.cache_hits = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, name: str, seconds: float, **_: Any) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            self.compiles.append((time.perf_counter(), seconds))

    def _on_event(self, name: str, **_: Any) -> None:
        if name == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def between(self, start: float, end: float) -> int:
        return sum(1 for t, _ in self.compiles if start < t <= end)


def record_first_dispatch() -> list[float]:
    """A list that receives the time at which the trainer's first train-step call returns.

    JAX dispatches asynchronously, so that call returns once the step is traced and its
    executable compiled (or loaded from the cache), before the step computes: the time to it
    is the start-up a run pays before training, which the compilation cache can shorten.
    """
    from flux_jax import train_step

    times: list[float] = []
    make = train_step.make_train_step

    def make_timed(*args: Any, **kwargs: Any) -> Any:
        step = make(*args, **kwargs)

        def timed(*step_args: Any) -> Any:
            out = step(*step_args)
            if not times:
                times.append(time.perf_counter())
            return out

        return timed

    train_step.make_train_step = make_timed
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from flux_jax import FluxTrainer

    work = tempfile.mkdtemp(prefix="bench_file_")
    os.environ.setdefault("FLUX_JAX_CACHE", os.path.join(work, "cache"))  # no stale ref log-probs
    config = make_config(args, work)
    num_steps = args.warmup + args.steps
    batches = replay_batches(config, num_steps)

    events = CompileEvents()
    first_dispatch = record_first_dispatch()
    start = time.perf_counter()
    trainer = FluxTrainer(config)
    init_s = time.perf_counter() - start
    callbacks: list[tuple[int, float, float]] = []  # (step, time, loss)

    @trainer.add_step_callback
    def record(result):
        callbacks.append((result.step, time.perf_counter(), result.metrics["loss"]))

    fit_start = time.perf_counter()
    compiles_before = len(events.compiles)
    result = trainer.fit(prompts=args.data)
    if [s for s, _, _ in callbacks] != list(range(1, num_steps + 1)):
        raise RuntimeError(f"expected step callbacks 1..{num_steps}, got {callbacks}")

    times = [t for _, t, _ in callbacks]
    timed, skipped = [], 0
    for i in range(args.warmup, len(times)):  # interval i ~ step i + 1 (batches[i])
        if events.between(times[i - 1], times[i]):
            skipped += 1
            continue
        timed.append((i, times[i] - times[i - 1]))
    if not timed:
        raise RuntimeError("every timed step interval had a compile: raise --steps")
    step_time = statistics.median(d for _, d in timed)
    tokens_per_step = statistics.mean(batches[i]["standard"] for i, _ in timed)
    fit_compiles = events.compiles[compiles_before:]
    shapes = collections.Counter("x".join(map(str, b["shape"])) for b in batches)
    real = sum(b["real"] for b in batches)
    computed = sum(b["computed"] for b in batches)
    return {
        "tool": "flux_jax bench_file",
        "data": args.data,
        "model_dir": args.model_dir,
        "reference": args.reference,
        "overrides": args.set,
        "batch_pairs": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "devices": len(jax.devices()),
        "backend": jax.devices()[0].platform,
        "init_s": init_s,
        "startup_s": first_dispatch[0] - start,
        "time_to_first_step_s": callbacks[0][1] - start,
        "fit_to_first_step_s": callbacks[0][1] - fit_start,
        "step_time_s": step_time,
        "timed_steps": len(timed),
        "intervals_skipped_for_compiles": skipped,
        "step_intervals_s": [round(b - a, 4) for a, b in zip(times, times[1:], strict=False)],
        "compiles": len(fit_compiles),
        "compile_s": sum(s for _, s in fit_compiles),
        "cache_hits": events.cache_hits,
        "compiled_shapes": len(shapes),
        "batch_shapes": dict(sorted(shapes.items())),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / step_time,
        "end_to_end_tokens_per_s": sum(b["standard"] for b in batches) / (times[-1] - fit_start),
        "padded_fraction": 1 - real / computed,
        "pairs_per_s": args.batch / step_time,
        "losses": [loss for _, _, loss in callbacks],
        "final_loss": result.final_loss,
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> None:
    from flux_jax.devices import fake_cpu_devices

    args = parse_args(argv)
    fake_cpu_devices(args.cpu_devices)  # before run() starts JAX
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
