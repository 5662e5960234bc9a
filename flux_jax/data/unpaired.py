"""Unpaired preference data (`data.format: unpaired`, for KTO): records -> tokenised examples.

    {"prompt": str, "completion": str, "label": true | false}
    {"prompt": [message, ...], "completion": [message, ...] | message, "label": true | false}

One completion per record, labelled desirable (true) or undesirable (false), as TRL's
unpaired-preference datasets. The label must be a JSON boolean: a string "true", a number or a
missing label is a bad record (an error naming file:line:field, or skipped with
data.on_bad_record=skip), never guessed. Chat records are rendered with the tokenizer's chat
template exactly as the paired formats' (flux_jax.data.chat), and every record is tokenised
and truncated by the paired convention (flux_jax.data.tokenization, data.tokenization separate
or joint; the completion plays the chosen response's part), so a KTO example's tokens are what
the same prompt and response would be in a DPO pair. JSONL files only for now.

The KL rows KTO needs are built per batch (flux_jax.data.unpaired_batching), not here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from flux_jax.data.chat import check_chat_template, completion_text, render, template_roles
from flux_jax.data.formats import CHAT_ROLES, FieldReader, Message, TextPair
from flux_jax.data.loading import (
    BAD_RECORD_POLICIES,
    LoadSettings,
    log_summary,
    parsed_records,
    process_share,
)
from flux_jax.data.records import (
    RawRecord,
    json_type_name,
)
from flux_jax.data.sources import read_source_records, resolve_source
from flux_jax.data.stats import DataStats
from flux_jax.data.tokenization import (
    PreferenceExample,
    check_tokenization,
    tokenize_pairs,
    truncate_example,
)

logger = logging.getLogger(__name__)

UNPAIRED_FORMAT = "unpaired"


@dataclass(frozen=True)
class UnpairedExample:
    """One tokenised, labelled completion: the prompt ids, the completion ids (ending in eos
    unless truncated), `label` True = desirable, and where the record came from."""

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    label: bool
    source: str
    line: int

    @property
    def longest_sequence(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class ChatExample:
    """An unpaired record as chat messages (rendered by flux_jax.data.chat, which reads these
    attribute names)."""

    prompt: list[Message]
    completion: list[Message]
    source: str
    line: int


def is_unpaired(examples: Sequence[object]) -> bool:
    """Whether `examples` are unpaired (KTO) examples rather than preference pairs."""
    return len(examples) > 0 and isinstance(examples[0], UnpairedExample)


def parse_unpaired_record(
    record: RawRecord, chat_roles: tuple[str, ...] = CHAT_ROLES
) -> tuple[TextPair | ChatExample, bool]:
    """(the record as text or chat messages, its label); DataError naming file, line and field.
    A text record comes back as a TextPair whose chosen is the completion (rejected unused)."""
    fields = FieldReader(record, chat_roles)
    label = fields.get("label")
    if not isinstance(label, bool):
        fields.fail(
            "label",
            f"has type {json_type_name(label)} ({label!r}), expected a JSON boolean: true "
            "(desirable) or false (undesirable)",
        )
    if isinstance(fields.get("completion"), str):
        completion = fields.string("completion")
        prompt = fields.string("prompt", allow_empty=True)
        return TextPair(prompt, completion, completion, record.source, record.line), label
    chat = ChatExample(
        prompt=fields.messages("prompt", allow_empty=True),
        completion=fields.completion_messages("completion"),
        source=record.source,
        line=record.line,
    )
    return chat, label


def render_chat_example(
    example: ChatExample, tokenizer: PreTrainedTokenizerBase, *, trim_eos: bool = True
) -> TextPair:
    """A chat record as text (flux_jax.data.chat's rules; errors name 'completion')."""
    prompt = render(tokenizer, example, "prompt", example.prompt, add_generation_prompt=True)
    completion = completion_text(example, "completion", prompt, tokenizer, trim_eos)
    return TextPair(prompt, completion, completion, example.source, example.line, from_chat=True)


def load_unpaired_texts(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, settings: LoadSettings
) -> tuple[list[TextPair], list[bool], DataStats]:
    """Every valid record at `path` as text (completion in `chosen`), the labels, the counts."""
    check_tokenization(settings.tokenization)
    if settings.on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(
            f"unknown on_bad_record {settings.on_bad_record!r}; valid: "
            f"{', '.join(BAD_RECORD_POLICIES)}"
        )
    if resolve_source(path).kind != "jsonl":
        raise ValueError(
            f"{path}: data.format unpaired reads JSONL files only; convert the table to JSONL "
            "records {prompt, completion, label}"
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    roles = template_roles(tokenizer) if has_template else CHAT_ROLES
    trim_eos = settings.tokenization != "joint"

    def parse(record: RawRecord) -> tuple[TextPair, bool]:
        parsed, label = parse_unpaired_record(record, roles)
        if isinstance(parsed, ChatExample):
            check_chat_template(tokenizer)
            parsed = render_chat_example(parsed, tokenizer, trim_eos=trim_eos)
        return parsed, label

    stats = DataStats()
    records = read_source_records(
        path, data_format=UNPAIRED_FORMAT, max_record_bytes=settings.max_record_bytes
    )
    parsed = list(parsed_records(records, parse, stats, settings.on_bad_record))
    texts, labels = [text for text, _ in parsed], [label for _, label in parsed]
    stats.pairs_valid = len(texts)
    log_summary(path, stats)
    return texts, labels, stats


def load_unpaired_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    settings: LoadSettings | None = None,
    **options: Any,
) -> tuple[list[UnpairedExample], DataStats]:
    """This process's share of the unpaired examples at `path`, tokenised and truncated as the
    paired formats' (flux_jax.data.tokenization), in file order. `settings`: a LoadSettings
    (data_format unpaired), or its fields as keywords. The DataStats' `pairs_*` counts count
    examples here."""
    if settings is None:
        settings = LoadSettings.of(None, {"data_format": UNPAIRED_FORMAT, **options})
    else:
        settings = LoadSettings.of(settings, options)
    texts, labels, stats = load_unpaired_texts(path, tokenizer, settings)
    indices = process_share(list(range(len(texts))), settings.process_index, settings.process_count)
    # The completion tokenised as a pair's chosen response (rejected = the same text, dropped).
    tokenized = tokenize_pairs([texts[i] for i in indices], tokenizer, settings.tokenization)
    examples = []
    for i, pair in zip(indices, tokenized, strict=True):
        example, truncation = truncate_example(
            pair, settings.max_length, settings.max_prompt_length
        )
        stats.pairs_seen += 1
        stats.prompts_truncated += truncation.prompt
        stats.responses_truncated += truncation.chosen
        stats.pairs_truncated += truncation.prompt or truncation.chosen
        if (truncation.prompt or truncation.chosen) and settings.drop_truncated:
            stats.pairs_dropped += 1
            continue
        examples.append(unpaired_example(example, labels[i]))
    stats.pairs_kept = len(examples)
    if stats.pairs_truncated:
        logger.info("%s: %d of %d examples truncated", path, stats.pairs_truncated, len(indices))
    return examples, stats


def unpaired_example(pair: PreferenceExample, label: bool) -> UnpairedExample:
    return UnpairedExample(
        prompt_ids=pair.prompt_ids,
        completion_ids=pair.chosen_ids,
        label=label,
        source=pair.source,
        line=pair.line,
    )
