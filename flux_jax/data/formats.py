"""The record schemas of the three data formats, and validation of one record against them.

    preferences      {"prompt": str, "chosen": str, "rejected": str}
    conversational   {"prompt": [message, ...], "chosen": [message, ...] | message,
                      "rejected": [message, ...] | message}
                     where a message is {"role": str, "content": str, ...}
    implicit_prompt  {"chosen": str, "rejected": str} or {"chosen": [message, ...],
                      "rejected": [message, ...]}: the prompt is the shared beginning

For implicit prompts (as TRL's `extract_prompt`): with message lists the prompt is the shared
leading messages. With strings it is the longest common prefix, moved back to the start of the word
in which the two differ, and a single space before that word goes with the completions: byte-level
BPE tokenises " word" as one piece, so this cut keeps both completions tokenised as they would be
in the whole text (TRL moves back only the space; data.tokenization=joint uses its cut).

Extra keys in a record are ignored, except a 'prompt' in implicit_prompt data, which is an error
rather than silently lost. The prompt may be empty; chosen and rejected may not.

A message's role must be one the chat template renders (`chat_roles`; see
`flux_jax.data.chat.template_roles`): Qwen's templates silently drop a message with any other
role, so a typo such as "wizard" would otherwise train on a conversation missing a turn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from flux_jax.config_schema import LEAVES
from flux_jax.data.records import DataError, RawRecord, json_type_name

# The config's data.format choices: the schema lists them, with what each one means.
DATA_FORMATS = LEAVES["data.format"].choices

# The roles every chat template renders; "tool" is added for templates that handle it.
CHAT_ROLES = ("system", "user", "assistant")

Message = dict[str, Any]


@dataclass(frozen=True)
class TextPair:
    """A preference pair as text, ready to tokenise.

    from_chat: the text was rendered by a chat template, which writes any special tokens itself,
    so the tokenizer must not add its own to the prompt.
    """

    prompt: str
    chosen: str
    rejected: str
    source: str
    line: int
    from_chat: bool = False


@dataclass(frozen=True)
class ChatPair:
    """A preference pair as chat messages; the completions are the messages after the prompt."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str
    line: int


def check_data_format(data_format: str) -> None:
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"unknown data_format {data_format!r}; valid formats are: {', '.join(DATA_FORMATS)}"
        )


def parse_record(
    record: RawRecord,
    data_format: str,
    chat_roles: tuple[str, ...] = CHAT_ROLES,
    columns: Mapping[str, str] | None = None,
    *,
    tokenization: str = "separate",
) -> TextPair | ChatPair:
    """Validate one record against `data_format`; raises DataError naming file, line and field.
    Chat messages must have one of `chat_roles`. `columns` maps a field to the record's key for
    it (data.columns); errors then name that key. `tokenization` (data.tokenization): joint
    splits implicit string prompts as TRL does (`split_shared_text_as_trl`)."""
    check_data_format(data_format)
    if data_format == "unpaired":  # one labelled completion per record, not a pair
        raise ValueError(
            "data.format unpaired (KTO) is read by flux_jax.data.unpaired, not as pairs; this "
            "command does not support it yet"
        )
    fields = FieldReader(record, chat_roles, columns)
    if data_format == "implicit_prompt":
        return parse_implicit_prompt(fields, tokenization)
    # preferences (text) and conversational (messages): the same three fields, read by type.
    chat = data_format == "conversational"
    prompt = fields.messages if chat else fields.string
    completion = fields.completion_messages if chat else fields.string
    return (ChatPair if chat else TextPair)(
        prompt=prompt("prompt", allow_empty=True),
        chosen=completion("chosen"),
        rejected=completion("rejected"),
        source=record.source,
        line=record.line,
    )


def parse_implicit_prompt(
    fields: FieldReader, tokenization: str = "separate"
) -> TextPair | ChatPair:
    record = fields.record
    if fields.column("prompt") in record.data:
        fields.fail(
            "prompt", "is present; data_format 'implicit_prompt' is for records without one"
        )
    if isinstance(fields.get("chosen"), str):
        chosen, rejected = fields.string("chosen"), fields.string("rejected")
        if chosen == rejected:
            fields.fail("rejected", "is identical to 'chosen', so no prompt can be split off")
        split = split_shared_text_as_trl if tokenization == "joint" else split_shared_text
        prompt, chosen, rejected = split(chosen, rejected)
        return TextPair(prompt, chosen, rejected, record.source, record.line)
    chosen_messages = fields.messages("chosen")
    rejected_messages = fields.messages("rejected")
    shared = 0
    for a, b in zip(chosen_messages, rejected_messages, strict=False):
        if a != b:
            break
        shared += 1
    for name, messages in (("chosen", chosen_messages), ("rejected", rejected_messages)):
        if shared == len(messages):
            fields.fail(name, "has no messages after those it shares with the other side")
        if not messages[-1]["content"].strip():
            fields.fail(f"{name}[-1].content", "is empty")
    return ChatPair(
        prompt=chosen_messages[:shared],
        chosen=chosen_messages[shared:],
        rejected=rejected_messages[shared:],
        source=record.source,
        line=record.line,
    )


def split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) of two different strings; see the module
    docstring for where the cut goes."""
    cut = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        cut += 1
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1
    if cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_shared_text_as_trl(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) as TRL 1.16's `extract_prompt` splits two
    strings, for data.tokenization=joint: the cut is at the first character where they differ,
    moved back one if a space precedes it, even mid-word; when one string starts the other, the
    cut is one character before the shorter one ends (TRL's loop index). One departure: when they
    differ at the first character TRL reads chosen[-1] (Python's last character) and, if that is
    a space, makes all of chosen but its last character the prompt; here the prompt is empty."""
    shorter = min(len(chosen), len(rejected))
    cut = next((i for i in range(shorter) if chosen[i] != rejected[i]), None)
    if cut is None:
        cut = shorter - 1
    elif cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


class FieldReader:
    """Typed access to one record's fields, raising DataErrors that name the field."""

    def __init__(
        self,
        record: RawRecord,
        chat_roles: tuple[str, ...] = CHAT_ROLES,
        columns: Mapping[str, str] | None = None,
    ):
        self.record = record
        self.chat_roles = chat_roles
        self.columns = {field: column for field, column in (columns or {}).items() if column}

    def column(self, field: str) -> str:
        """`field` (a path such as `chosen[-1].content`) with its leading field name replaced by
        the record's key for it."""
        head = re.split(r"[.\[]", field, maxsplit=1)[0]
        return self.columns.get(head, head) + field[len(head) :]

    def fail(self, field: str, reason: str) -> NoReturn:
        raise DataError(self.record.source, self.record.line, reason, field=self.column(field))

    def get(self, name: str) -> Any:
        if self.column(name) not in self.record.data:
            keys = ", ".join(sorted(self.record.data)) or "none"
            self.fail(name, f"is missing (record has keys: {keys})")
        return self.record.data[self.column(name)]

    def string(self, name: str, *, allow_empty: bool = False) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            self.fail(name, f"has type {json_type_name(value)}, expected a string")
        if not allow_empty and not value.strip():
            self.fail(name, "is empty")
        return value

    def messages(self, name: str, *, allow_empty: bool = False) -> list[Message]:
        value = self.get(name)
        if not isinstance(value, list):
            self.fail(name, f"has type {json_type_name(value)}, expected an array of messages")
        if not allow_empty and not value:
            self.fail(name, "is empty")
        for index, message in enumerate(value):
            self.check_message(f"{name}[{index}]", message)
        return list(value)

    def completion_messages(self, name: str) -> list[Message]:
        """A completion: a list of messages, or one message object standing for a list of one."""
        value = self.get(name)
        if isinstance(value, dict):
            self.check_message(name, value)
            messages = [value]
            prefix = name
        else:
            messages = self.messages(name)
            prefix = f"{name}[-1]"
        if not messages[-1]["content"].strip():
            self.fail(f"{prefix}.content", "is empty")
        return messages

    def check_message(self, where: str, message: Any) -> None:
        if not isinstance(message, dict):
            self.fail(where, f"has type {json_type_name(message)}, expected a message object")
        for key in ("role", "content"):
            if key not in message:
                keys = ", ".join(sorted(message)) or "none"
                self.fail(f"{where}.{key}", f"is missing (message has keys: {keys})")
            if not isinstance(message[key], str):
                found = json_type_name(message[key])
                self.fail(f"{where}.{key}", f"has type {found}, expected a string")
        if message["role"] not in self.chat_roles:
            allowed = ", ".join(self.chat_roles)
            self.fail(f"{where}.role", f"is {message['role']!r}; allowed roles: {allowed}")
