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
"""

from __future__ import annotations

import argparse
import json
import platform
import random
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="local tokenizer directory (default: tiny tokenizer)")
    parser.add_argument("--repeat", type=int, default=40, help="copies of the 300 demo pairs")
    parser.add_argument("--long-pairs", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
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
