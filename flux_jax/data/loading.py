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

`LoadSettings` holds every setting of a load (the keywords of `load_preference_examples`); the
token store (flux_jax.data.token_cache) takes the same object and keys its stores on it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from flux_jax.data.chat import check_chat_template, render_chat_pair, template_roles
from flux_jax.data.formats import CHAT_ROLES, ChatPair, TextPair, check_data_format, parse_record
from flux_jax.data.records import (
    DEFAULT_MAX_RECORD_BYTES,
    DataError,
    ShardReadError,
)
from flux_jax.data.sources import column_mapping, read_source_records
from flux_jax.data.stats import MAX_EXAMPLES, DataStats
from flux_jax.data.tokenization import (
    PreferenceExample,
    check_lengths,
    check_tokenization,
    tokenize_pairs,
    truncate_example,
)

logger = logging.getLogger(__name__)

BAD_RECORD_POLICIES = ("error", "skip")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class LoadSettings:
    """Everything a load of preference data depends on besides the data and the tokenizer:
    `load_preference_examples`' keywords. Built once per load and passed down (the token store,
    its builder process and its workers take it whole); `to_dict()` is what the token store's key
    and meta.json record. `columns` is held normalised (sources.column_mapping)."""

    data_format: str
    max_length: int
    max_prompt_length: int
    drop_truncated: bool = False
    on_bad_record: str = "error"
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    process_index: int = 0
    process_count: int = 1
    columns: Mapping[str, str] | None = None
    tokenization: str = "separate"

    def __post_init__(self) -> None:
        check_lengths(self.max_length, self.max_prompt_length)
        object.__setattr__(self, "columns", column_mapping(self.columns))

    @classmethod
    def of(cls, settings: LoadSettings | None, options: Mapping[str, Any]) -> LoadSettings:
        """`settings`, or the LoadSettings of `options` (its fields as keywords); not both."""
        if settings is None:
            return cls(**options)
        if options:
            raise TypeError(
                f"pass a LoadSettings or its fields as keywords, not both (got {sorted(options)})"
            )
        return settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_preference_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    settings: LoadSettings | None = None,
    **options: Any,
) -> tuple[list[PreferenceExample], DataStats]:
    """This process's share of the pairs at `path`, tokenised (by `tokenization`, see
    flux_jax.data.tokenization) and truncated, in file order. `settings`: a LoadSettings, or its
    fields as keywords (data_format=..., max_length=..., max_prompt_length=..., ...)."""
    settings = LoadSettings.of(settings, options)
    share, stats = load_share(path, tokenizer, settings)
    tokenized = tokenize_pairs(share, tokenizer, settings.tokenization)
    examples = truncate_examples(tokenized, stats, settings)
    stats.pairs_kept = len(examples)
    log_truncation(path, stats, settings.drop_truncated)
    return examples, stats


def load_share(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, settings: LoadSettings
) -> tuple[list[TextPair], DataStats]:
    """Steps 1 and 2 (module docstring): this process's share of the valid pairs at `path`, as
    text, and the read counts of all of them."""
    text_pairs, stats = load_text_pairs(
        path,
        tokenizer,
        data_format=settings.data_format,
        on_bad_record=settings.on_bad_record,
        max_record_bytes=settings.max_record_bytes,
        columns=settings.columns,
        tokenization=settings.tokenization,
    )
    return process_share(text_pairs, settings.process_index, settings.process_count), stats


def truncate_examples(
    examples: list[PreferenceExample], stats: DataStats, settings: LoadSettings
) -> list[PreferenceExample]:
    """`examples` truncated (flux_jax.data.tokenization step 3), less the truncated ones with
    `drop_truncated`; counts them in `stats` (pairs_seen, the truncation counts, pairs_dropped).
    The token store (flux_jax.data.token_cache) runs it chunk by chunk."""
    kept = []
    for example in examples:
        example, truncation = truncate_example(
            example, settings.max_length, settings.max_prompt_length
        )
        stats.pairs_seen += 1
        stats.prompts_truncated += truncation.prompt
        stats.responses_truncated += truncation.chosen + truncation.rejected
        stats.pairs_truncated += truncation.any
        if truncation.any and settings.drop_truncated:
            stats.pairs_dropped += 1
            continue
        kept.append(example)
    return kept


def log_truncation(path: str | Path, stats: DataStats, drop_truncated: bool) -> None:
    """One INFO line on the pairs of `path` that truncation shortened (or dropped)."""
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


def load_text_pairs(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_format: str,
    on_bad_record: str = "error",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    columns: Mapping[str, str] | None = None,
    tokenization: str = "separate",
) -> tuple[list[TextPair], DataStats]:
    """Every valid record at `path` (any source: flux_jax.data.sources) as text (chat data
    rendered), and the read counts. `columns`: field -> the data's column (data.columns).
    `tokenization` (data.tokenization) decides the text joint tokenisation needs: TRL's
    implicit-prompt cut and chat completions that keep the template's eos tail."""
    check_data_format(data_format)
    check_tokenization(tokenization)
    columns = column_mapping(columns)
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

    def parse(record: Any) -> TextPair:
        pair = parse_record(record, data_format, roles, columns, tokenization=tokenization)
        if isinstance(pair, ChatPair):
            pair = render_chat_pair(pair, tokenizer, trim_eos=tokenization != "joint")
        return pair

    records = read_source_records(
        path, data_format=data_format, columns=columns, max_record_bytes=max_record_bytes
    )
    for pair in parsed_records(records, parse, stats, on_bad_record):
        if pair.chosen == pair.rejected:
            stats.identical_pairs += 1
            if stats.identical_pairs <= MAX_EXAMPLES:
                logger.warning("%s:%d: chosen and rejected are identical", pair.source, pair.line)
        note_if_duplicate(stats, pair, pairs, first_index)
        pairs.append(pair)
    stats.pairs_valid = len(pairs)
    log_summary(path, stats)
    return pairs, stats


def parsed_records(
    records: Iterable[Any],
    parse: Callable[[Any], T],
    stats: DataStats,
    on_bad_record: str,
) -> Iterator[T]:
    """`parse(record)` of each record read (flux_jax.data.sources.read_source_records), in order.
    A bad record (a DataError from the reader or from `parse`) or a damaged shard's unreadable
    rest (ShardReadError) is raised with on_bad_record "error", else skipped and counted in
    `stats`, which also counts the records read."""
    for item in records:
        if isinstance(item, ShardReadError):
            if on_bad_record == "error":
                raise item
            note_shard_cut_short(stats, item)
            continue
        stats.records_read += 1
        try:
            if isinstance(item, DataError):
                raise item
            parsed = parse(item)
        except DataError as err:
            if on_bad_record == "error":
                raise
            note_bad_record(stats, err)
            continue
        yield parsed


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
    """One WARNING per kind of problem the load of `path` skipped or found, with examples."""
    problems = (
        (
            stats.bad_records,
            "skipped %d bad records; the first at %s",
            ", ".join(stats.bad_record_lines),
        ),
        (
            stats.shards_cut_short,
            "skipped the unreadable rest of %d damaged shard(s): %s",
            "; ".join(stats.shard_errors),
        ),
        (
            stats.duplicate_pairs,
            "%d pairs repeat an earlier pair's prompt, chosen and rejected exactly; the first "
            "at %s",
            ", ".join(stats.duplicate_pair_examples[:3]),
        ),
    )
    for count, message, examples in problems:
        if count:
            logger.warning("%s: " + message, path, count, examples)


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
