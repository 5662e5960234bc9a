"""The tokenisation conventions: how a preference pair becomes token ids and a loss mask.

`data.tokenization` picks one of two; both fill the same `PreferenceExample` fields, so batching,
packing and the precomputed reference work unchanged. Which TRL release uses which: the README.

separate (default; TRL 0.12-0.28's `tokenize_row` on plain text): prompt and completions
tokenised apart.

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

joint (TRL 1.16's `DPOTrainer._prepare_dataset`, checked row by row in
tests/test_joint_tokenization.py): each whole sequence tokenised as one text.

1. Text. Plain-string data: the eos token's text is appended to each completion unless it already
   ends with it. Chat data: the completion is everything the template adds after the prompt,
   "<|im_end|>\\n" included, and nothing is appended. Implicit prompts are split as TRL's
   `extract_prompt` does (`flux_jax.data.formats.split_shared_text_as_trl`).
2. Ids. prompt_ids = tokenizer(prompt); full = tokenizer(prompt + completion), for each side,
   with the special-token options of separate's step 2 (chat data: add_special_tokens=False, which
   is what `apply_chat_template(tokenize=True)` does). Byte-level BPE can merge across the seam
   (a prompt ending in a space, or mid-word or mid-number), so the tokenised prompt need not be a
   prefix of full: the cut is the shortest common prefix of prompt_ids with the chosen and the
   rejected full ids; prompt_ids keep what is before it, each completion is its full ids after it.
   Every pair where the cut falls inside the tokenised prompt is counted and logged (TRL warns
   once); those prompt tokens then start the completions and are scored, as in TRL.

Both conventions then share:

3. Lengths. A prompt longer than max_prompt_length keeps its END (prompt_ids[-max_prompt_length:]);
   then a completion keeps its START (completion_ids[:max_length - len(prompt_ids)]), so every
   sequence fits in max_length and keeps at least one completion token. A truncated completion
   loses its eos. (TRL 1.16 has no max_prompt_length: it keeps the first max_length tokens of
   prompt + completion and drops pairs whose prompt alone fills max_length. The two agree on every
   pair whose prompt fits in max_prompt_length.)
4. Loss mask. 1 on every completion token including the eos, 0 on prompt tokens and padding, in
   input coordinates: mask[t] = 1 means "score token t", which the model predicts from the logits
   at t - 1. Position 0 has no logits before it, so mask[0] = 0 even when the prompt is empty.

Note on byte-level BPE with separate: tokenising prompt and completion apart can differ from
tokenising their concatenation at the seam (joint exists for runs that must match TRL 1.16 id for
id). The implicit-prompt split in `flux_jax.data.formats` cuts at word starts to keep that seam
natural.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from flux_jax.config_schema import LEAVES
from flux_jax.data.formats import TextPair
from flux_jax.data.records import DataError

logger = logging.getLogger(__name__)

# Texts per tokenizer call: big enough for the fast tokenizer's batching to pay, small enough that
# the intermediate Python lists stay modest.
TOKENIZE_CHUNK = 2048

# The config's data.tokenization choices: the schema lists them, with what each one means.
TOKENIZATIONS = LEAVES["data.tokenization"].choices


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


def check_tokenization(tokenization: str) -> None:
    if tokenization not in TOKENIZATIONS:
        raise ValueError(
            f"unknown data.tokenization {tokenization!r}; valid: {', '.join(TOKENIZATIONS)}"
        )


def tokenize_pairs(
    pairs: Sequence[TextPair],
    tokenizer: PreTrainedTokenizerBase,
    tokenization: str = "separate",
    prompts_cut: list[tuple[str, int, list[int]]] | None = None,
) -> list[PreferenceExample]:
    """Token ids of each pair, untruncated, by the `tokenization` convention of the module
    docstring (step 2). Joint pairs whose cut falls inside the tokenised prompt are logged; with
    `prompts_cut` given they are appended to it instead, for the caller to log once over many
    calls (the token store tokenises chunk by chunk: flux_jax.data.token_cache)."""
    check_tokenization(tokenization)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; completions must end with one")
    examples: list[PreferenceExample] = []
    log_here = prompts_cut is None
    # joint: (source, line, prompt tokens left out) of each such pair
    prompts_cut = [] if prompts_cut is None else prompts_cut
    for start in range(0, len(pairs), TOKENIZE_CHUNK):
        chunk = pairs[start : start + TOKENIZE_CHUNK]
        if tokenization == "joint":
            examples.extend(tokenize_joint(chunk, tokenizer, prompts_cut))
        else:
            examples.extend(tokenize_separate(chunk, tokenizer))
    if prompts_cut and log_here:
        log_prompts_cut(len(prompts_cut), len(pairs), prompts_cut[0], tokenizer)
    return examples


def log_prompts_cut(
    count: int,
    pair_count: int,
    first: tuple[str, int, Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The one warning about the `count` of `pair_count` joint pairs whose cut fell inside the
    tokenised prompt; `first` = (source, line, prompt ids moved) of the first of them."""
    if count:
        source, line, left_out = first
        logger.warning(
            "data.tokenization=joint: in %d of %d pairs the tokenised prompt is not a prefix of "
            "the tokenised prompt + completion (tokens merge across the seam); as in TRL, the "
            "completion starts where they diverge, so the prompt's last tokens are scored as "
            "completion. First at %s:%d, prompt tokens moved: %r",
            count,
            pair_count,
            source,
            line,
            tokenizer.decode(list(left_out)),
        )


def tokenize_separate(
    pairs: Sequence[TextPair], tokenizer: PreTrainedTokenizerBase
) -> list[PreferenceExample]:
    """separate: prompt ids, and each completion's own ids + eos id."""
    eos_id = tokenizer.eos_token_id
    prompts = tokenize_prompts(pairs, tokenizer)
    chosen = tokenize_texts([p.chosen for p in pairs], tokenizer, add_special_tokens=False)
    rejected = tokenize_texts([p.rejected for p in pairs], tokenizer, add_special_tokens=False)
    return [
        PreferenceExample(
            prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
            chosen_ids=np.asarray([*chosen_ids, eos_id], dtype=np.int32),
            rejected_ids=np.asarray([*rejected_ids, eos_id], dtype=np.int32),
            source=pair.source,
            line=pair.line,
        )
        for pair, prompt_ids, chosen_ids, rejected_ids in zip(
            pairs, prompts, chosen, rejected, strict=True
        )
    ]


def tokenize_joint(
    pairs: Sequence[TextPair],
    tokenizer: PreTrainedTokenizerBase,
    prompts_cut: list[tuple[str, int, list[int]]],
) -> list[PreferenceExample]:
    """joint: each whole sequence tokenised as one text and cut at the common token prefix (as
    TRL 1.16). Appends (source, line, prompt ids moved into the completions) to `prompts_cut`
    for each pair whose cut falls inside the tokenised prompt."""
    eos_text = tokenizer.eos_token
    prompts = tokenize_prompts(pairs, tokenizer)
    chosen = tokenize_as_prompts(
        [p.prompt + joint_completion(p, p.chosen, eos_text) for p in pairs], pairs, tokenizer
    )
    rejected = tokenize_as_prompts(
        [p.prompt + joint_completion(p, p.rejected, eos_text) for p in pairs], pairs, tokenizer
    )
    examples = []
    for pair, prompt_ids, chosen_ids, rejected_ids in zip(
        pairs, prompts, chosen, rejected, strict=True
    ):
        cut = min(
            common_prefix_length(prompt_ids, chosen_ids),
            common_prefix_length(prompt_ids, rejected_ids),
        )
        if cut < len(prompt_ids):
            prompts_cut.append((pair.source, pair.line, prompt_ids[cut:]))
        for side, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            if cut == len(ids):
                raise DataError(
                    pair.source,
                    pair.line,
                    "has no token left after the prompt with data.tokenization=joint (prompt + "
                    f"{side} tokenises to a prefix of the prompt alone); fix the record or use "
                    "data.tokenization=separate",
                    field=side,
                )
        examples.append(
            PreferenceExample(
                prompt_ids=np.asarray(prompt_ids[:cut], dtype=np.int32),
                chosen_ids=np.asarray(chosen_ids[cut:], dtype=np.int32),
                rejected_ids=np.asarray(rejected_ids[cut:], dtype=np.int32),
                source=pair.source,
                line=pair.line,
            )
        )
    return examples


def joint_completion(pair: TextPair, completion: str, eos_text: str) -> str:
    """A completion's text in joint tokenisation: plain text gets the eos text unless it already
    ends with it (TRL's add_eos); chat text already ends with what the template writes."""
    if pair.from_chat or completion.endswith(eos_text):
        return completion
    return completion + eos_text


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    """Number of leading tokens the two id lists share."""
    length = 0
    for token, other_token in zip(ids, other_ids, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def tokenize_prompts(
    pairs: Sequence[TextPair], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Prompt ids in pair order: chat-rendered prompts without added special tokens, plain
    prompts with the tokenizer's default."""
    return tokenize_as_prompts([pair.prompt for pair in pairs], pairs, tokenizer)


def tokenize_as_prompts(
    texts: list[str], pairs: Sequence[TextPair], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """texts[i] tokenised with the special-token options of pairs[i]'s prompt (see
    `tokenize_prompts`)."""
    ids: list[list[int]] = [[] for _ in pairs]
    for from_chat in (False, True):
        indices = [i for i, pair in enumerate(pairs) if pair.from_chat == from_chat]
        if not indices:
            continue
        group = [texts[i] for i in indices]
        options = {"add_special_tokens": False} if from_chat else {}
        for i, text_ids in zip(indices, tokenize_texts(group, tokenizer, **options), strict=True):
            ids[i] = text_ids
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
