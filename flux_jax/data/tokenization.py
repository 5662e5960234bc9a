"""The tokenisation convention: how a preference pair becomes token ids and a loss mask.

It follows TRL's DPO trainer, so numbers are comparable with a TRL run on the same data:

1. Text. Plain-string data is used as is. Chat data is rendered with the tokenizer's chat template
   (`flux_jax.data.chat`): prompt = `apply_chat_template(prompt_messages,
   add_generation_prompt=True, tokenize=False)`; completion = what rendering prompt + chosen (or
   rejected) messages adds after that prompt, with a trailing "<eos>" plus whitespace removed
   (step 2 puts the eos back, once).
2. Ids. prompt_ids = tokenizer(prompt) with the tokenizer's own special-token default (Qwen adds
   none; a tokenizer with a BOS post-processor adds its BOS) for string data, and with
   add_special_tokens=False for chat data, whose template already wrote its special tokens.
   completion_ids = tokenizer(completion, add_special_tokens=False) + [eos_token_id].
   The sequence is prompt_ids + completion_ids. Texts are tokenised in batches (lists of strings
   through the fast tokenizer).
3. Lengths. A prompt longer than max_prompt_length keeps its END (prompt_ids[-max_prompt_length:]);
   then a completion keeps its START (completion_ids[:max_length - len(prompt_ids)]), so every
   sequence fits in max_length and keeps at least one completion token. A truncated completion
   loses its eos.
4. Loss mask. 1 on every completion token including the eos, 0 on prompt tokens and padding, in
   input coordinates: mask[t] = 1 means "score token t", which the model predicts from the logits
   at t - 1. Position 0 has no logits before it, so mask[0] = 0 even when the prompt is empty.

Note on byte-level BPE: tokenising prompt and completion separately can differ from tokenising
their concatenation at the seam (TRL has the same property). The implicit-prompt split in
`flux_jax.data.formats` cuts at word starts to keep that seam natural.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from flux_jax.data.formats import TextPair

# Texts per tokenizer call: big enough for the fast tokenizer's batching to pay, small enough that
# the intermediate Python lists stay modest.
TOKENIZE_CHUNK = 2048


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenised pair: the shared prompt and the two completions (each ending in eos unless
    truncated), as int32 arrays, plus where the record came from."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    source: str
    line: int
    # (chosen, rejected) summed reference log-probs, when precomputed before training.
    ref_logps: tuple[float, float] | None = None

    @property
    def longest_sequence(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class Truncation:
    """Which parts of one pair `truncate_example` shortened."""

    prompt: bool
    chosen: bool
    rejected: bool

    @property
    def any(self) -> bool:
        return self.prompt or self.chosen or self.rejected


def tokenize_pairs(
    pairs: Sequence[TextPair], tokenizer: PreTrainedTokenizerBase
) -> list[PreferenceExample]:
    """Token ids of each pair, untruncated, following step 2 of the module docstring."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; completions must end with one")
    examples = []
    for start in range(0, len(pairs), TOKENIZE_CHUNK):
        chunk = pairs[start : start + TOKENIZE_CHUNK]
        prompts = tokenize_prompts(chunk, tokenizer)
        chosen = tokenize_texts([p.chosen for p in chunk], tokenizer, add_special_tokens=False)
        rejected = tokenize_texts([p.rejected for p in chunk], tokenizer, add_special_tokens=False)
        for pair, prompt_ids, chosen_ids, rejected_ids in zip(
            chunk, prompts, chosen, rejected, strict=True
        ):
            examples.append(
                PreferenceExample(
                    prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
                    chosen_ids=np.asarray([*chosen_ids, eos_id], dtype=np.int32),
                    rejected_ids=np.asarray([*rejected_ids, eos_id], dtype=np.int32),
                    source=pair.source,
                    line=pair.line,
                )
            )
    return examples


def tokenize_prompts(
    pairs: Sequence[TextPair], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Prompt ids in pair order: chat-rendered prompts without added special tokens, plain
    prompts with the tokenizer's default."""
    ids: list[list[int]] = [[] for _ in pairs]
    for from_chat in (False, True):
        indices = [i for i, pair in enumerate(pairs) if pair.from_chat == from_chat]
        if not indices:
            continue
        texts = [pairs[i].prompt for i in indices]
        options = {"add_special_tokens": False} if from_chat else {}
        for i, prompt_ids in zip(indices, tokenize_texts(texts, tokenizer, **options), strict=True):
            ids[i] = prompt_ids
    return ids


def tokenize_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, **options: bool
) -> list[list[int]]:
    return tokenizer(texts, return_attention_mask=False, **options)["input_ids"]


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    if max_prompt_length < 1 or max_length < 2:
        raise ValueError(
            f"need max_prompt_length >= 1 and max_length >= 2, got {max_prompt_length=}, "
            f"{max_length=}"
        )
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}) so "
            "every sequence keeps at least one completion token"
        )


def truncate_example(
    example: PreferenceExample, max_length: int, max_prompt_length: int
) -> tuple[PreferenceExample, Truncation]:
    """Step 3 of the module docstring: the prompt keeps its end, completions keep their start."""
    prompt_ids = example.prompt_ids[-max_prompt_length:]
    completion_budget = max_length - len(prompt_ids)
    truncation = Truncation(
        prompt=len(example.prompt_ids) > max_prompt_length,
        chosen=len(example.chosen_ids) > completion_budget,
        rejected=len(example.rejected_ids) > completion_budget,
    )
    if not truncation.any:
        return example, truncation
    truncated = PreferenceExample(
        prompt_ids=prompt_ids,
        chosen_ids=example.chosen_ids[:completion_budget],
        rejected_ids=example.rejected_ids[:completion_budget],
        source=example.source,
        line=example.line,
    )
    return truncated, truncation
