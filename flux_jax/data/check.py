"""The data-check report behind `flux-jax data check FILE --tokenizer DIR`: what a data file holds
and what loading it for training would do, before any training starts.

Bad records are counted as with on_bad_record="skip". Lengths are in tokens of the untruncated
pairs (the completions include their eos); truncation counts apply the training convention at the
given max_length and max_prompt_length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from flux_jax.data.loading import load_text_pairs
from flux_jax.data.records import resolve_data_files
from flux_jax.data.tokenization import check_lengths, tokenize_pairs, truncate_example

PERCENTILES = (50, 90, 99)


def data_check_report(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_format: str,
    max_length: int,
    max_prompt_length: int,
) -> dict[str, Any]:
    """Counts, length percentiles and would-be truncation of the data at `path`, as plain JSON."""
    check_lengths(max_length, max_prompt_length)
    files = resolve_data_files(path)
    pairs, stats = load_text_pairs(path, tokenizer, data_format=data_format, on_bad_record="skip")
    examples = tokenize_pairs(pairs, tokenizer)
    truncations = [truncate_example(e, max_length, max_prompt_length)[1] for e in examples]
    return {
        "path": str(path),
        "files": len(files),
        "data_format": data_format,
        "records": stats.records_read,
        "pairs": len(examples),
        "bad_records": stats.bad_records,
        "bad_record_examples": stats.bad_record_examples,
        "identical_pairs": stats.identical_pairs,
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
        f"{report['path']} ({report['files']} file(s), format {report['data_format']})",
        f"  records          {report['records']}",
        f"  valid pairs      {pairs}",
        f"  bad records      {report['bad_records']}",
    ]
    lines += [f"    {example}" for example in report["bad_record_examples"]]
    if report["identical_pairs"]:
        lines.append(f"  chosen==rejected {report['identical_pairs']}")
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
    return "\n".join(lines)
