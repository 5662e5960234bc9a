"""From a data path to this process's tokenised, truncated preference examples, with stats.

Order of work, and why:
1. every process reads, validates and renders every record to text (cheap next to tokenising),
   so all processes fail on the same bad record and agree on the list of valid pairs;
2. the valid pairs are cut to a multiple of process_count and each process takes
   pairs[process_index::process_count], so every process has the same number of pairs;
3. each process tokenises and truncates only its share.
With drop_truncated=True the shares can end up a few pairs apart; multi-host runs should then
stop on a step count (num_epochs=None), not on the end of the data.

With on_bad_record="skip", a bad record is skipped and counted, and a damaged shard (see
`flux_jax.data.records.ShardReadError`) loses its unreadable rest, counted as a shard cut short;
with "error" either stops loading. Pairs repeating an earlier one's text exactly are kept (some
datasets repeat pairs on purpose) but counted and warned about.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from flux_jax.data.chat import check_chat_template, render_chat_pair, template_roles
from flux_jax.data.formats import CHAT_ROLES, ChatPair, TextPair, check_data_format, parse_record
from flux_jax.data.records import (
    DEFAULT_MAX_RECORD_BYTES,
    DataError,
    ShardReadError,
    read_records,
)
from flux_jax.data.stats import MAX_EXAMPLES, DataStats
from flux_jax.data.tokenization import (
    PreferenceExample,
    check_lengths,
    tokenize_pairs,
    truncate_example,
)

logger = logging.getLogger(__name__)

BAD_RECORD_POLICIES = ("error", "skip")

T = TypeVar("T")


def load_preference_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_format: str,
    max_length: int,
    max_prompt_length: int,
    drop_truncated: bool = False,
    on_bad_record: str = "error",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[list[PreferenceExample], DataStats]:
    """This process's share of the pairs at `path`, tokenised and truncated, in file order."""
    check_lengths(max_length, max_prompt_length)
    text_pairs, stats = load_text_pairs(
        path,
        tokenizer,
        data_format=data_format,
        on_bad_record=on_bad_record,
        max_record_bytes=max_record_bytes,
    )
    share = process_share(text_pairs, process_index, process_count)
    examples = []
    for example in tokenize_pairs(share, tokenizer):
        example, truncation = truncate_example(example, max_length, max_prompt_length)
        stats.pairs_seen += 1
        stats.prompts_truncated += truncation.prompt
        stats.responses_truncated += truncation.chosen + truncation.rejected
        stats.pairs_truncated += truncation.any
        if truncation.any and drop_truncated:
            stats.pairs_dropped += 1
            continue
        examples.append(example)
    stats.pairs_kept = len(examples)
    if stats.pairs_truncated:
        logger.info(
            "%s: %d of %d pairs truncated (%d prompts, %d responses)%s",
            path,
            stats.pairs_truncated,
            stats.pairs_seen,
            stats.prompts_truncated,
            stats.responses_truncated,
            "; dropped them" if drop_truncated else "",
        )
    return examples, stats


def load_text_pairs(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_format: str,
    on_bad_record: str = "error",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> tuple[list[TextPair], DataStats]:
    """Every valid record at `path` as text (chat data rendered), and the read counts."""
    check_data_format(data_format)
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(
            f"unknown on_bad_record {on_bad_record!r}; valid: {', '.join(BAD_RECORD_POLICIES)}"
        )
    roles = CHAT_ROLES
    if data_format != "preferences":
        check_chat_template(tokenizer)
        roles = template_roles(tokenizer)
    stats = DataStats()
    pairs: list[TextPair] = []
    first_index: dict[int, int] = {}  # hash of a pair's texts -> index of its first occurrence
    for item in read_records(path, max_record_bytes):
        if isinstance(item, ShardReadError):
            if on_bad_record == "error":
                raise item
            note_shard_cut_short(stats, item)
            continue
        stats.records_read += 1
        try:
            if isinstance(item, DataError):
                raise item
            pair = parse_record(item, data_format, roles)
            if isinstance(pair, ChatPair):
                pair = render_chat_pair(pair, tokenizer)
        except DataError as err:
            if on_bad_record == "error":
                raise
            note_bad_record(stats, err)
            continue
        if pair.chosen == pair.rejected:
            stats.identical_pairs += 1
            if stats.identical_pairs <= MAX_EXAMPLES:
                logger.warning("%s:%d: chosen and rejected are identical", pair.source, pair.line)
        note_if_duplicate(stats, pair, pairs, first_index)
        pairs.append(pair)
    stats.pairs_valid = len(pairs)
    log_summary(path, stats)
    return pairs, stats


def note_if_duplicate(
    stats: DataStats, pair: TextPair, pairs: list[TextPair], first_index: dict[int, int]
) -> None:
    """Counts `pair` if an earlier one in `pairs` has the same texts, else remembers it. Only a
    hash per pair is kept; a hash match is confirmed on the texts, so nothing is miscounted."""
    texts = (pair.prompt, pair.chosen, pair.rejected)
    index = first_index.setdefault(hash(texts), len(pairs))
    if index == len(pairs):
        return
    first = pairs[index]
    if (first.prompt, first.chosen, first.rejected) != texts:
        return  # a hash collision, not a duplicate
    stats.duplicate_pairs += 1
    if len(stats.duplicate_pair_examples) < MAX_EXAMPLES:
        stats.duplicate_pair_examples.append(
            f"{pair.source}:{pair.line} (= {first.source}:{first.line})"
        )


def log_summary(path: str | Path, stats: DataStats) -> None:
    if stats.bad_records:
        logger.warning(
            "%s: skipped %d bad records; the first at %s",
            path,
            stats.bad_records,
            ", ".join(stats.bad_record_lines),
        )
    if stats.shards_cut_short:
        logger.warning(
            "%s: skipped the unreadable rest of %d damaged shard(s): %s",
            path,
            stats.shards_cut_short,
            "; ".join(stats.shard_errors),
        )
    if stats.duplicate_pairs:
        logger.warning(
            "%s: %d pairs repeat an earlier pair's prompt, chosen and rejected exactly; the first "
            "at %s",
            path,
            stats.duplicate_pairs,
            ", ".join(stats.duplicate_pair_examples[:3]),
        )


def note_bad_record(stats: DataStats, err: DataError) -> None:
    stats.bad_records += 1
    if len(stats.bad_record_examples) < MAX_EXAMPLES:
        stats.bad_record_examples.append(str(err))
        logger.warning("skipping bad record: %s", err)


def note_shard_cut_short(stats: DataStats, err: ShardReadError) -> None:
    stats.shards_cut_short += 1
    if len(stats.shard_errors) < MAX_EXAMPLES:
        stats.shard_errors.append(str(err))
        logger.warning("skipping the rest of a damaged shard: %s", err)


def process_share(items: list[T], process_index: int, process_count: int) -> list[T]:
    """items[process_index::process_count] of the first multiple-of-process_count items, so every
    process gets the same number (up to process_count - 1 trailing items go unused)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index=}, {process_count=}"
        )
    usable = len(items) - len(items) % process_count
    return items[process_index:usable:process_count]
