"""Measure the preference-data pipeline's throughput in pairs per second; prints JSON.

Three inputs, written to a temporary directory:
  demo_repeated   the bundled demo pairs repeated (short pairs, ~40 tokens), preferences format
  demo_chat       the same pairs as chat messages (conversational format: template rendering)
  long_generated  longer generated pairs (several demo answers joined, ~150-350 tokens)

For each: `load_s` is reading + validating + rendering + tokenising + truncating everything
(`load_preference_examples`), `batch_s` is one pass of the grain iterator that shuffles and pads
those pairs into batches, `total_pairs_per_s` covers both.

    python tools/bench_data.py                        # the tiny tokenizer
    python tools/bench_data.py --tokenizer DIR        # a local Hugging Face tokenizer directory

Start-up at scale (issue 19: "a 1M-pair dataset starts training in seconds with flat memory"):

    python tools/bench_data.py --startup-pairs 1000000 --startup-source parquet

writes that many synthetic demo pairs (JSONL or a Parquet directory), then, each in a fresh
process, times the trainer's data set-up (`train_data.load_examples` and the batch plan,
`train_batches.one_process_batches`) up to its first batch (`first_batch_s`) and reports that
process's peak RSS (`peak_rss_mb`) and its RSS before loading (`base_rss_mb`), so the growth with
the dataset is `peak_rss_mb - base_rss_mb`. Three start-ups (`--startup-modes`):
  memory   data.token_cache=false: every pair tokenised in this process (the old path)
  cold     data.token_cache=true, no store yet: the store is built (`--tokenize-workers`)
  warm     data.token_cache=true again: the store is memory-mapped
Run it at two sizes to see whether memory is flat.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flux_jax.data import load_preference_examples, make_preference_iterator
from flux_jax.tiny_tokenizer import DEMO_DATA, build_tiny_tokenizer


def demo_records() -> list[dict[str, str]]:
    with DEMO_DATA.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def long_records(num_pairs: int, seed: int) -> list[dict[str, str]]:
    """Pairs several demo answers long, so tokenising and padding dominate over JSON parsing."""
    rng = random.Random(seed)
    demo = demo_records()
    records = []
    for _ in range(num_pairs):
        parts = rng.sample(demo, rng.randint(4, 10))
        records.append(
            {
                "prompt": " ".join(p["prompt"].strip() for p in parts[:3]) + "\n",
                "chosen": " ".join(p["chosen"] for p in parts),
                "rejected": " ".join(p["rejected"] for p in parts),
            }
        )
    return records


def as_chat(record: dict[str, str]) -> dict:
    return {
        "prompt": [{"role": "user", "content": record["prompt"]}],
        "chosen": {"role": "assistant", "content": record["chosen"]},
        "rejected": {"role": "assistant", "content": record["rejected"]},
    }


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def bench(path: Path, tokenizer, *, data_format: str, max_length: int, batch_size: int) -> dict:
    options = dict(
        data_format=data_format, max_length=max_length, max_prompt_length=max_length // 2
    )
    start = time.perf_counter()
    examples, stats = load_preference_examples(path, tokenizer, **options)
    load_s = time.perf_counter() - start

    iterator, _ = make_preference_iterator(
        path, tokenizer, batch_size=batch_size, seed=0, num_epochs=1, **options
    )
    # Time only the batching pass: loading was measured above.
    start = time.perf_counter()
    num_batches = sum(1 for _ in iterator)
    batch_s = time.perf_counter() - start
    pairs = len(examples)
    return {
        "pairs": pairs,
        "file_mb": round(path.stat().st_size / 1e6, 2),
        "mean_longest_tokens": round(sum(e.longest_sequence for e in examples) / pairs, 1),
        "pairs_truncated": stats.pairs_truncated,
        "load_s": round(load_s, 3),
        "load_pairs_per_s": round(pairs / load_s),
        "batches": num_batches,
        "batch_s": round(batch_s, 3),
        "batch_pairs_per_s": round(num_batches * batch_size / batch_s),
        "total_pairs_per_s": round(pairs / (load_s + batch_s)),
    }


def write_startup_data(num_pairs: int, source: str, directory: Path) -> Path:
    """`num_pairs` demo pairs (cycled, numbered so none repeats) as JSONL or Parquet shards."""
    demo = demo_records()
    records = (
        {**demo[i % len(demo)], "prompt": f"{i}: {demo[i % len(demo)]['prompt']}"}
        for i in range(num_pairs)
    )
    if source == "jsonl":
        path = directory / "pairs.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = directory / "parquet"
    path.mkdir()
    shard_pairs = 100_000
    for shard, start in enumerate(range(0, num_pairs, shard_pairs)):
        chunk = [next(records) for _ in range(min(shard_pairs, num_pairs - start))]
        pq.write_table(pa.Table.from_pylist(chunk), path / f"train-{shard:05d}.parquet")
    return path


def measure_startup(
    path: str, tokenizer_dir: str | None, batch_size: int, cache_dir: str, workers: int
) -> dict:
    """Time to the first batch of the trainer's data set-up and peak RSS of this process (run
    it in a fresh one); `cache_dir` '' = data.token_cache=false."""
    from flux_jax import train_batches, train_data
    from flux_jax.config import FluxConfig
    from flux_jax.data.pipeline import pad_token_id

    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = build_tiny_tokenizer()
    config = FluxConfig()
    config.batch_size = batch_size
    config.data.max_length, config.data.max_prompt_length = 128, 64
    config.data.token_cache = bool(cache_dir)
    config.data.token_cache_dir = cache_dir
    config.data.tokenize_workers = workers
    base_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    examples, stats = train_data.load_examples(config, tokenizer, path, "preferences", shard=True)
    loaded_s = time.perf_counter() - start
    _, batches = train_batches.one_process_batches(config, examples, pad_id=pad_token_id(tokenizer))
    batches[0]
    return {
        "pairs": stats.pairs_kept,
        "load_s": round(loaded_s, 2),
        "first_batch_s": round(time.perf_counter() - start, 2),
        "base_rss_mb": round(base_rss_mb),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def startup_report(args: argparse.Namespace) -> dict:
    report: dict = {"source": args.startup_source, "tokenize_workers": args.tokenize_workers}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = write_startup_data(args.startup_pairs, args.startup_source, Path(tmp))
        report["write_s"] = round(time.perf_counter() - start, 1)
        cache = str(Path(tmp) / "token_cache")
        for mode in args.startup_modes.split(","):
            command = [sys.executable, __file__, "--measure-startup", str(path)]
            command += ["--batch-size", str(args.batch_size), "--cache-dir"]
            command += ["" if mode == "memory" else cache]
            command += ["--tokenize-workers", str(args.tokenize_workers)]
            if args.tokenizer:
                command += ["--tokenizer", args.tokenizer]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            report[mode] = json.loads(done.stdout.splitlines()[-1])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="local tokenizer directory (default: tiny tokenizer)")
    parser.add_argument("--repeat", type=int, default=40, help="copies of the 300 demo pairs")
    parser.add_argument("--long-pairs", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--startup-pairs", type=int, help="measure start-up at this many pairs")
    parser.add_argument("--startup-source", choices=("jsonl", "parquet"), default="jsonl")
    parser.add_argument(
        "--startup-modes",
        default="memory,cold,warm",
        help="start-ups to time, in order: memory, cold, warm (see the module docstring)",
    )
    parser.add_argument(
        "--tokenize-workers", type=int, default=0, help="data.tokenize_workers for cold"
    )
    parser.add_argument("--measure-startup", help=argparse.SUPPRESS)  # the fresh process's job
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_startup:
        result = measure_startup(
            args.measure_startup,
            args.tokenizer,
            args.batch_size,
            args.cache_dir,
            args.tokenize_workers,
        )
        print(json.dumps(result))
        return
    if args.startup_pairs:
        print(json.dumps(startup_report(args), indent=2))
        return
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = build_tiny_tokenizer()

    demo = demo_records() * args.repeat
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {
            "demo_repeated": ("preferences", 64, write_jsonl(demo, Path(tmp) / "demo.jsonl")),
            "demo_chat": (
                "conversational",
                128,
                write_jsonl([as_chat(r) for r in demo], Path(tmp) / "chat.jsonl"),
            ),
            "long_generated": (
                "preferences",
                512,
                write_jsonl(long_records(args.long_pairs, seed=0), Path(tmp) / "long.jsonl"),
            ),
        }
        for name, (data_format, max_length, path) in inputs.items():
            results[name] = bench(
                path,
                tokenizer,
                data_format=data_format,
                max_length=max_length,
                batch_size=args.batch_size,
            ) | {"data_format": data_format, "max_length": max_length}
    report = {
        "tokenizer": args.tokenizer or "tiny (flux_jax.tiny_tokenizer)",
        "batch_size": args.batch_size,
        "machine": platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
