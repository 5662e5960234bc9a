"""Rendering chat-message pairs to prompt and completion text with the tokenizer's chat template.

The prompt is `apply_chat_template(prompt, add_generation_prompt=True)`; a completion is the text
that rendering the whole conversation (prompt + completion messages) adds after that prompt. If
the rendered prompt is not a prefix of the rendered conversation the record is refused: a loss
mask built from the prompt's length would then cover the wrong tokens.

When a rendered completion ends with the eos token text followed only by whitespace (ChatML:
"...answer<|im_end|>\\n"), that tail is removed here and tokenisation appends eos_token_id, as it
does for every completion. The scored sequence then ends at the eos a sampler stops on, exactly as
for plain-string data, with one eos and no newline after it that the model would never generate.
See `flux_jax.data.tokenization` for the whole convention.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from flux_jax.data.formats import ChatPair, Message, TextPair
from flux_jax.data.records import DataError


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template, which chat-message data needs")


def render_chat_pair(pair: ChatPair, tokenizer: PreTrainedTokenizerBase) -> TextPair:
    """The pair as text; raises DataError naming the record if the template misaligns."""
    prompt = render(tokenizer, pair.prompt, add_generation_prompt=True)
    return TextPair(
        prompt=prompt,
        chosen=completion_text(pair, "chosen", prompt, tokenizer),
        rejected=completion_text(pair, "rejected", prompt, tokenizer),
        source=pair.source,
        line=pair.line,
        from_chat=True,
    )


def completion_text(
    pair: ChatPair, side: str, prompt: str, tokenizer: PreTrainedTokenizerBase
) -> str:
    messages: list[Message] = getattr(pair, side)
    conversation = render(tokenizer, pair.prompt + messages, add_generation_prompt=False)
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
    eos = tokenizer.eos_token
    tail_trimmed = completion.rstrip()
    if eos and tail_trimmed.endswith(eos):
        return tail_trimmed[: -len(eos)]
    return completion


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], *, add_generation_prompt: bool
) -> str:
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert isinstance(text, str), type(text)
    return text
