"""Padded-token fraction and batch shapes of a training file under the trainer's batching; JSON.

    python tools/padding_report.py --data /tmp/mix-longtail/train.jsonl \
        --tokenizer /tmp/mix-longtail/model --batch 8 --steps 400
    python tools/padding_report.py ... --set data.group_by_length=false --set data.bucket_ratio=2 \
        --set data.bucket_multiple=64         # the old defaults: shuffled, powers of two

No model and no training: the file is tokenised and batched exactly as FluxTrainer would
(flux_jax.train_batches, one process, --mesh-devices data x fsdp devices) and the first --steps
batches are counted. Reported:
  padded_fraction      padded tokens / computed tokens over those batches (a row's padding, and
                       in the standard layout the shorter of chosen / rejected, count as padding)
  real_tokens_per_step, computed_tokens_per_step   means over the batches
  batch_shapes         {shape of the batch's token rows: number of batches}; each distinct shape
                       is one compiled train step (times the score-window variants)
Several --set settings can be compared in one call with --compare (a JSON list of override lists).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from typing import Any


def padding_report(config: Any, path: str, *, batch_multiple: int, steps: int) -> dict[str, Any]:
    from flux_jax.data.batching import real_and_computed_tokens
    from flux_jax.data.pipeline import pad_token_id
    from flux_jax.model_setup import load_tokenizer
    from flux_jax.train_batches import one_process_batches
    from flux_jax.train_data import load_examples

    tokenizer = load_tokenizer(config.model_path, config.tokenizer_path)
    examples, stats = load_examples(config, tokenizer, path, config.data.format)
    plan, dataset = one_process_batches(
        config, examples, pad_id=pad_token_id(tokenizer), batch_multiple=batch_multiple
    )
    real = computed = 0
    shapes: collections.Counter[str] = collections.Counter()
    for batch in itertools.islice(dataset, steps):
        r, c = real_and_computed_tokens(batch)
        real, computed = real + r, computed + c
        rows_key = "input_ids" if "input_ids" in batch else "chosen_input_ids"
        shapes["x".join(map(str, batch[rows_key].shape))] += 1
    data = config.data
    return {
        "data": path,
        "pairs": len(examples),
        "pairs_truncated": stats.pairs_truncated,
        "steps": steps,
        "batch_pairs": config.batch_size,
        "group_by_length": data.group_by_length,
        "bucket_lengths": list(plan.bucket_lengths),
        "layout": plan.layout,
        "pairs_per_row": plan.pairs_per_row,
        "padded_fraction": 1 - real / computed,
        "real_tokens_per_step": real / steps,
        "computed_tokens_per_step": computed / steps,
        "batch_shapes": dict(sorted(shapes.items())),
        "compiled_shapes": len(shapes),
    }


def make_config(args: argparse.Namespace, overrides: list[str]) -> Any:
    from flux_jax.config import FluxConfig

    config = FluxConfig.default()
    config.model_path = args.tokenizer
    config.batch_size = args.batch
    config.apply_overrides([*args.set, *overrides])
    return config.validate()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="JSONL file (or anything data paths take)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer / model dir")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=400, help="batches counted")
    parser.add_argument("--mesh-devices", type=int, default=1, help="data x fsdp devices")
    parser.add_argument("--set", action="append", default=[], help="a config override a.b=v")
    parser.add_argument(
        "--compare",
        default="",
        help='JSON list of override lists, e.g. [[], ["model.packing=true"]]',
    )
    args = parser.parse_args(argv)
    variants = json.loads(args.compare) if args.compare else [[]]
    reports = []
    for overrides in variants:
        config = make_config(args, overrides)
        report = padding_report(
            config, args.data, batch_multiple=args.mesh_devices, steps=args.steps
        )
        reports.append({"overrides": [*args.set, *overrides], **report})
    print(json.dumps(reports if args.compare else reports[0], indent=1))


if __name__ == "__main__":
    main()
