"""Rendering chat-message pairs to prompt and completion text with the tokenizer's chat template.

The prompt is `apply_chat_template(prompt, add_generation_prompt=True)`; a completion is the text
that rendering the whole conversation (prompt + completion messages) adds after that prompt. If
the rendered prompt is not a prefix of the rendered conversation the record is refused: a loss
mask built from the prompt's length would then cover the wrong tokens.

When a rendered completion ends with the eos token text followed only by whitespace (ChatML:
"...answer<|im_end|>\\n"), that tail is removed here and tokenisation appends eos_token_id, as it
does for every completion. The scored sequence then ends at the eos a sampler stops on, exactly as
for plain-string data, with one eos and no newline after it that the model would never generate.
With data.tokenization=joint the tail is kept and nothing is appended, as TRL 1.16 does. See
`flux_jax.data.tokenization` for both conventions.

Roles: Qwen's templates (2.5, 3) render system, user and assistant messages, render "tool"
messages as tool responses, and silently drop a message with any other role. So the roles data may
use are those three, plus "tool" when the template names that role (`template_roles`). A template
that refuses a conversation (`raise_exception`, e.g. Qwen3's "No user query found in messages")
makes that record a bad record.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from flux_jax.data.formats import CHAT_ROLES, ChatPair, Message, TextPair
from flux_jax.data.records import DataError

# A template that compares a role with the literal 'tool' or "tool" renders tool messages.
TOOL_ROLE_IN_TEMPLATE = re.compile(r"""(["'])tool\1""")


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template, which chat-message data needs")


def template_roles(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The message roles the tokenizer's chat template renders (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # a dict of named templates: look at all of them
        template = " ".join(str(t) for t in dict(template).values())
    return CHAT_ROLES + ("tool",) if TOOL_ROLE_IN_TEMPLATE.search(template) else CHAT_ROLES


def render_chat_pair(
    pair: ChatPair, tokenizer: PreTrainedTokenizerBase, *, trim_eos: bool = True
) -> TextPair:
    """The pair as text; raises DataError naming the record if the template refuses the messages
    or misaligns. `trim_eos=False` (data.tokenization=joint, as TRL) keeps each completion's
    "<eos>" + whitespace tail as the template wrote it."""
    prompt = render(tokenizer, pair, "prompt", pair.prompt, add_generation_prompt=True)
    return TextPair(
        prompt=prompt,
        chosen=completion_text(pair, "chosen", prompt, tokenizer, trim_eos),
        rejected=completion_text(pair, "rejected", prompt, tokenizer, trim_eos),
        source=pair.source,
        line=pair.line,
        from_chat=True,
    )


def completion_text(
    pair: ChatPair,
    side: str,
    prompt: str,
    tokenizer: PreTrainedTokenizerBase,
    trim_eos: bool = True,
) -> str:
    messages: list[Message] = getattr(pair, side)
    conversation = render(
        tokenizer, pair, side, pair.prompt + messages, add_generation_prompt=False
    )
    if not conversation.startswith(prompt):
        at = next(
            (i for i, (a, b) in enumerate(zip(prompt, conversation, strict=False)) if a != b),
            min(len(prompt), len(conversation)),
        )
        raise DataError(
            pair.source,
            pair.line,
            "renders a conversation that does not start with the rendered prompt (they differ "
            f"at character {at}: prompt has {prompt[at : at + 24]!r}, conversation has "
            f"{conversation[at : at + 24]!r}), so the loss mask would be misaligned",
            field=side,
        )
    completion = conversation[len(prompt) :]
    if not trim_eos:
        return completion
    eos = tokenizer.eos_token
    tail_trimmed = completion.rstrip()
    if eos and tail_trimmed.endswith(eos):
        return tail_trimmed[: -len(eos)]
    return completion


def render(
    tokenizer: PreTrainedTokenizerBase,
    pair: ChatPair,
    field: str,
    messages: list[Message],
    *,
    add_generation_prompt: bool,
) -> str:
    """`messages` rendered; a template error becomes a DataError naming the record and `field`."""
    # Imported here: jinja2 is not a dependency of transformers, only of its chat templates.
    import jinja2

    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except jinja2.TemplateError as err:
        reason = f"is refused by the chat template ({type(err).__name__}: {err})"
        raise DataError(pair.source, pair.line, reason, field=field) from err
    assert isinstance(text, str), type(text)
    return text
