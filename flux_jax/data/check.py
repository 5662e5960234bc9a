"""The data-check report behind `flux-jax data check FILE --tokenizer DIR`: what a data file holds
and what loading it for training would do, before any training starts.

Bad records are counted as with on_bad_record="skip". Lengths are in tokens of the untruncated
pairs (the completions include their eos); truncation counts apply the training convention at the
given max_length and max_prompt_length.

The report's "ok" is false when training with on_bad_record="error" would stop or have nothing to
train on: any bad record, any damaged shard, or no valid pair. `flux-jax data check` then exits 1
(after printing the whole report), so it can guard a data pipeline before a long run. Duplicate
and identical pairs are reported but do not fail the check.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from flux_jax.data.loading import load_text_pairs
from flux_jax.data.records import DEFAULT_MAX_RECORD_BYTES
from flux_jax.data.sources import resolve_source
from flux_jax.data.tokenization import check_lengths, tokenize_pairs, truncate_example

PERCENTILES = (50, 90, 99)


def data_check_report(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_format: str,
    max_length: int,
    max_prompt_length: int,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    columns: Mapping[str, str] | None = None,
    tokenization: str = "separate",
) -> dict[str, Any]:
    """Counts, length percentiles and would-be truncation of the data at `path`, as plain JSON,
    with "ok" and the "problems" that make it false. Tokens counted by `tokenization`
    (data.tokenization)."""
    check_lengths(max_length, max_prompt_length)
    files = resolve_source(path).files
    pairs, stats = load_text_pairs(
        path,
        tokenizer,
        data_format=data_format,
        on_bad_record="skip",
        max_record_bytes=max_record_bytes,
        columns=columns,
        tokenization=tokenization,
    )
    examples = tokenize_pairs(pairs, tokenizer, tokenization)
    truncations = [truncate_example(e, max_length, max_prompt_length)[1] for e in examples]
    problems = []
    if stats.bad_records:
        problems.append(f"{stats.bad_records} bad record(s)")
    if stats.shards_cut_short:
        problems.append(f"{stats.shards_cut_short} damaged shard(s)")
    if not examples:
        problems.append("no valid pairs")
    return {
        "path": str(path),
        "files": len(files),
        "data_format": data_format,
        "tokenization": tokenization,
        "ok": not problems,
        "problems": problems,
        "records": stats.records_read,
        "pairs": len(examples),
        "bad_records": stats.bad_records,
        "bad_record_examples": stats.bad_record_examples,
        "shards_cut_short": stats.shards_cut_short,
        "shard_errors": stats.shard_errors,
        "identical_pairs": stats.identical_pairs,
        "duplicate_pairs": stats.duplicate_pairs,
        "duplicate_pair_examples": stats.duplicate_pair_examples,
        "tokens": {
            "prompt": length_summary([len(e.prompt_ids) for e in examples]),
            "chosen": length_summary([len(e.chosen_ids) for e in examples]),
            "rejected": length_summary([len(e.rejected_ids) for e in examples]),
            "longest_sequence": length_summary([e.longest_sequence for e in examples]),
        },
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "would_truncate": {
            "pairs": sum(t.any for t in truncations),
            "prompts": sum(t.prompt for t in truncations),
            "responses": sum(t.chosen + t.rejected for t in truncations),
        },
    }


def length_summary(lengths: list[int]) -> dict[str, int]:
    """p50/p90/p99/max. A percentile is nearest-rank: the smallest observed length that at least
    that share of the pairs does not exceed (p90 = 9: 90% have at most 9 tokens). 0 for no data."""
    if not lengths:
        return {**{f"p{p}": 0 for p in PERCENTILES}, "max": 0}
    values = np.asarray(lengths)
    summary = {f"p{p}": int(np.percentile(values, p, method="inverted_cdf")) for p in PERCENTILES}
    summary["max"] = int(values.max())
    return summary


def format_data_check_report(report: dict[str, Any]) -> str:
    """The report as aligned text for a terminal."""
    pairs = report["pairs"]
    lines = [
        f"{report['path']} ({report['files']} file(s), format {report['data_format']}, "
        f"tokenization {report.get('tokenization', 'separate')})",
        f"  records          {report['records']}",
        f"  valid pairs      {pairs}",
        f"  bad records      {report['bad_records']}",
    ]
    lines += [f"    {example}" for example in report["bad_record_examples"]]
    if report["shards_cut_short"]:
        lines.append(f"  damaged shards   {report['shards_cut_short']} (their rest is unreadable)")
        lines += [f"    {error}" for error in report["shard_errors"]]
    if report["identical_pairs"]:
        lines.append(f"  chosen==rejected {report['identical_pairs']}")
    if report["duplicate_pairs"]:
        repeats = report["duplicate_pairs"]
        lines.append(f"  duplicate pairs  {repeats} (same text as an earlier pair; kept)")
        lines += [f"    {where}" for where in report["duplicate_pair_examples"]]
    lines.append("  tokens             p50     p90     p99     max")
    for name, summary in report["tokens"].items():
        values = "".join(f"{summary[key]:>8}" for key in ("p50", "p90", "p99", "max"))
        lines.append(f"    {name:<16}{values}")
    cut = report["would_truncate"]
    lines.append(
        f"  at max_length={report['max_length']}, max_prompt_length="
        f"{report['max_prompt_length']}: {cut['pairs']} of {pairs} pairs would be truncated "
        f"({cut['prompts']} prompts, {cut['responses']} responses)"
    )
    if report["ok"]:
        lines.append("data check: OK")
    else:
        lines.append(f"data check: FAILED ({', '.join(report['problems'])})")
    return "\n".join(lines)
