"""The tokenisation convention, truncation and the batch layout, with values spelled out.

Most tests use a byte-only tokenizer (no merges), where every character is one token, so the
expected token sequences can be written down by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from flux_jax.data import (
    BATCH_KEYS,
    SCORED_POSITION_KEYS,
    DataError,
    PreferenceExample,
    collate_pairs,
    default_bucket_lengths,
    load_preference_examples,
)
from flux_jax.data.batching import check_bucket_lengths
from flux_jax.tiny_tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer, save_tiny_tokenizer

EOS = "<|im_end|>"
IM_START = "<|im_start|>"


@pytest.fixture(scope="module")
def byte_tokenizer():
    """256 byte tokens + 3 specials, no merges: one token per (ASCII) character."""
    return build_tiny_tokenizer(texts=["unused"], vocab_size=259)


@pytest.fixture(scope="module")
def demo_tokenizer():
    return build_tiny_tokenizer()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load(path, tokenizer, **options):
    options = {"data_format": "preferences", "max_length": 64, "max_prompt_length": 32} | options
    return load_preference_examples(path, tokenizer, **options)


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def chars(text: str) -> list[str]:
    """Byte-level token strings of ASCII text: a newline shows as 'Ċ', a space as 'Ġ'."""
    return [{"\n": "Ċ", " ": "Ġ"}.get(c, c) for c in text]


# --- the tiny tokenizer -------------------------------------------------------------------------


def test_tiny_tokenizer_is_deterministic_and_qwen_like(demo_tokenizer, tmp_path):
    again = build_tiny_tokenizer()
    assert demo_tokenizer.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    assert len(demo_tokenizer) == 512
    assert demo_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", IM_START, EOS]
    assert (demo_tokenizer.pad_token_id, demo_tokenizer.eos_token_id) == (0, 2)
    assert demo_tokenizer.bos_token_id is None
    text = "Héllo, wörld! 🚀"
    assert demo_tokenizer.decode(demo_tokenizer(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert demo_tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    )
    assert demo_tokenizer.apply_chat_template(
        messages[:1], add_generation_prompt=True, tokenize=False
    ) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    loaded = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path / "tok"))
    assert loaded("Hi<|im_end|>")["input_ids"] == demo_tokenizer("Hi<|im_end|>")["input_ids"]
    assert loaded.chat_template == CHATML_TEMPLATE


def test_byte_tokenizer_is_one_token_per_character(byte_tokenizer):
    ids = byte_tokenizer("Hi?\nYes.")["input_ids"]
    assert tokens(byte_tokenizer, ids) == ["H", "i", "?", "Ċ", "Y", "e", "s", "."]


# --- the convention, plain strings ----------------------------------------------------------------


def test_string_pair_ids_and_mask_spelled_out(tmp_path, byte_tokenizer):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Hi?\n", "chosen": "Yes.", "rejected": "No"}]
    )
    examples, _ = load(path, byte_tokenizer)
    batch = collate_pairs(examples, pad_id=0, bucket_lengths=(16,))
    # The longest response (5 tokens) fits a window of T / 2 = 8 scored positions.
    assert sorted(batch) == sorted(BATCH_KEYS + SCORED_POSITION_KEYS)
    assert batch["chosen_scored_positions"].tolist() == [[4, 5, 6, 7, 8, -1, -1, -1]]
    assert batch["rejected_scored_positions"].tolist() == [[4, 5, 6, -1, -1, -1, -1, -1]]
    assert all(batch.pop(k).dtype == np.int32 for k in SCORED_POSITION_KEYS)
    assert all(v.dtype == np.int32 and v.shape == (1, 16) for v in batch.values())
    pad = ["<|endoftext|>"]
    assert tokens(byte_tokenizer, batch["chosen_input_ids"][0]) == (
        ["H", "i", "?", "Ċ", "Y", "e", "s", ".", EOS] + pad * 7
    )
    assert batch["chosen_loss_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1] + [0] * 7
    assert batch["chosen_segment_ids"][0].tolist() == [1] * 9 + [0] * 7
    assert batch["chosen_positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8] + [0] * 7
    assert tokens(byte_tokenizer, batch["rejected_input_ids"][0]) == (
        ["H", "i", "?", "Ċ", "N", "o", EOS] + pad * 9
    )
    assert batch["rejected_loss_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1] + [0] * 9
    assert batch["rejected_segment_ids"][0].tolist() == [1] * 7 + [0] * 9
    assert batch["rejected_positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 6] + [0] * 9


def test_string_pair_with_merges_equals_tokenizer_calls_on_the_pieces(tmp_path, demo_tokenizer):
    record = {
        "prompt": "Question: What is two plus two?\n",
        "chosen": "Sure! Two plus two is four.",
        "rejected": "meh, two plus lol",
    }
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    (example,), _ = load(path, demo_tokenizer)
    prompt_ids = demo_tokenizer(record["prompt"])["input_ids"]
    chosen_ids = demo_tokenizer(record["chosen"], add_special_tokens=False)["input_ids"] + [2]
    rejected_ids = demo_tokenizer(record["rejected"], add_special_tokens=False)["input_ids"] + [2]
    # The merges make these shorter than the text: the tokenizer really did merge.
    assert len(prompt_ids) < len(record["prompt"]) and len(chosen_ids) < len(record["chosen"])
    assert example.prompt_ids.tolist() == prompt_ids
    assert example.chosen_ids.tolist() == chosen_ids
    assert example.rejected_ids.tolist() == rejected_ids
    batch = collate_pairs([example], pad_id=0, bucket_lengths=(64,))
    n_prompt, n_chosen = len(prompt_ids), len(chosen_ids)
    assert batch["chosen_input_ids"][0, : n_prompt + n_chosen].tolist() == prompt_ids + chosen_ids
    assert batch["chosen_loss_mask"][0].tolist() == (
        [0] * n_prompt + [1] * n_chosen + [0] * (64 - n_prompt - n_chosen)
    )
    assert demo_tokenizer.decode(batch["chosen_input_ids"][0, n_prompt : n_prompt + n_chosen]) == (
        "Sure! Two plus two is four.<|im_end|>"
    )


def test_prompt_gets_the_tokenizers_default_special_tokens_completions_none(tmp_path):
    """A tokenizer whose post-processor adds a BOS (Llama-style): string prompts get it,
    completions and chat-rendered prompts do not."""
    bos_tokenizer = build_tiny_tokenizer(texts=["unused"], vocab_size=259)
    bos_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{IM_START} $A", special_tokens=[(IM_START, 1)]
    )
    assert bos_tokenizer("ab")["input_ids"][0] == 1  # the post-processor is live
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "ab", "rejected": "c"}])
    (example,), _ = load(path, bos_tokenizer)
    assert tokens(bos_tokenizer, example.prompt_ids) == [IM_START, "Q"]
    assert tokens(bos_tokenizer, example.chosen_ids) == ["a", "b", EOS]
    chat = {
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": {"role": "assistant", "content": "ab"},
        "rejected": {"role": "assistant", "content": "c"},
    }
    path = write_jsonl(tmp_path / "c.jsonl", [chat])
    (example,), _ = load(path, bos_tokenizer, data_format="conversational")
    assert tokens(bos_tokenizer, example.prompt_ids)[:2] == [IM_START, "u"]  # one, not two


def test_empty_prompt_never_scores_position_zero(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "", "chosen": "ab", "rejected": "c"}])
    examples, _ = load(path, byte_tokenizer)
    batch = collate_pairs(examples, pad_id=0, bucket_lengths=(4,))
    assert tokens(byte_tokenizer, batch["chosen_input_ids"][0][:3]) == ["a", "b", EOS]
    assert batch["chosen_loss_mask"][0].tolist() == [0, 1, 1, 0]
    assert batch["rejected_loss_mask"][0].tolist() == [0, 1, 0, 0]


# --- the convention, chat messages ----------------------------------------------------------------


def test_conversational_pair_spelled_out(tmp_path, byte_tokenizer):
    record = {
        "prompt": [
            {"role": "system", "content": "Be nice."},
            {"role": "user", "content": "Hi"},
        ],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": {"role": "assistant", "content": "meh"},  # a single message is allowed
    }
    path = write_jsonl(tmp_path / "c.jsonl", [record])
    (example,), stats = load(
        path, byte_tokenizer, data_format="conversational", max_length=128, max_prompt_length=64
    )
    assert stats.pairs_truncated == 0
    expected_prompt = (
        [IM_START, *chars("system\nBe nice."), EOS, "Ċ"]
        + [IM_START, *chars("user\nHi"), EOS, "Ċ"]
        + [IM_START, *chars("assistant\n")]
    )
    assert tokens(byte_tokenizer, example.prompt_ids) == expected_prompt
    # The template's "<|im_end|>\n" becomes exactly one eos, with no newline after it.
    assert tokens(byte_tokenizer, example.chosen_ids) == [*chars("Hello!"), EOS]
    assert tokens(byte_tokenizer, example.rejected_ids) == [*chars("meh"), EOS]
    batch = collate_pairs([example], pad_id=0, bucket_lengths=(64,))
    n_prompt = len(expected_prompt)
    assert batch["chosen_loss_mask"][0, : n_prompt + 8].tolist() == [0] * n_prompt + [1] * 7 + [0]


def test_conversational_multi_turn_completion(tmp_path, byte_tokenizer):
    record = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "B"},
            {"role": "assistant", "content": "C"},
        ],
        "rejected": [{"role": "assistant", "content": "x"}],
    }
    path = write_jsonl(tmp_path / "c.jsonl", [record])
    (example,), _ = load(path, byte_tokenizer, data_format="conversational")
    assert tokens(byte_tokenizer, example.chosen_ids) == (
        ["A", EOS, "Ċ", IM_START, *chars("user\nB"), EOS, "Ċ", IM_START]
        + [*chars("assistant\nC"), EOS]
    )


def test_implicit_conversational_prompt_is_the_shared_messages(tmp_path, byte_tokenizer):
    user = {"role": "user", "content": "Hi"}
    record = {
        "chosen": [user, {"role": "assistant", "content": "Hello!"}],
        "rejected": [user, {"role": "assistant", "content": "meh"}],
    }
    path = write_jsonl(tmp_path / "i.jsonl", [record])
    (example,), _ = load(path, byte_tokenizer, data_format="implicit_prompt")
    assert tokens(byte_tokenizer, example.prompt_ids) == (
        [IM_START, *chars("user\nHi"), EOS, "Ċ", IM_START, *chars("assistant\n")]
    )
    assert tokens(byte_tokenizer, example.chosen_ids) == [*chars("Hello!"), EOS]
    assert tokens(byte_tokenizer, example.rejected_ids) == [*chars("meh"), EOS]


def test_implicit_string_prompt_is_the_shared_text(tmp_path, byte_tokenizer):
    record = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    path = write_jsonl(tmp_path / "i.jsonl", [record])
    (example,), _ = load(path, byte_tokenizer, data_format="implicit_prompt")
    assert tokens(byte_tokenizer, example.prompt_ids) == chars("The sky is")
    assert tokens(byte_tokenizer, example.chosen_ids) == [*chars(" blue."), EOS]
    assert tokens(byte_tokenizer, example.rejected_ids) == [*chars(" green."), EOS]


def test_misaligned_chat_template_is_reported_for_the_record(tmp_path):
    tokenizer = build_tiny_tokenizer(texts=["unused"], vocab_size=259)
    # A thinking-style template: the generation prompt opens a <think> block that a finished
    # assistant turn does not have, so the rendered prompt is not a prefix of the conversation.
    tokenizer.chat_template = CHATML_TEMPLATE.replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'"
    )
    record = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": {"role": "assistant", "content": "Yo"},
        "rejected": {"role": "assistant", "content": "no"},
    }
    path = write_jsonl(tmp_path / "c.jsonl", [record, record])
    with pytest.raises(DataError) as info:
        load(path, tokenizer, data_format="conversational")
    message = str(info.value)
    assert message.startswith(f"{path}:1: field 'chosen' renders a conversation that does not")
    assert "'<think>\\n'" in message and "'Yo<|im_end|>\\n'" in message
    examples, stats = load(path, tokenizer, data_format="conversational", on_bad_record="skip")
    assert (len(examples), stats.bad_records) == (0, 2)


def test_chat_data_needs_a_chat_template(tmp_path):
    tokenizer = build_tiny_tokenizer(texts=["unused"], vocab_size=259)
    tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [], "chosen": [], "rejected": []}])
    with pytest.raises(ValueError, match="no chat_template"):
        load(path, tokenizer, data_format="conversational")


# --- truncation ----------------------------------------------------------------------------------


TRUNCATION_RECORDS = [
    {"prompt": "abcdefgh", "chosen": "0123456789", "rejected": "xy"},  # prompt and chosen cut
    {"prompt": "pq", "chosen": "rs", "rejected": "tu"},  # fits
    {"prompt": "pqrs", "chosen": "0123456", "rejected": "01234567"},  # rejected cut
]


def test_truncation_keeps_prompt_end_and_response_start(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", TRUNCATION_RECORDS)
    examples, stats = load(path, byte_tokenizer, max_length=12, max_prompt_length=4)
    first, second, third = examples
    assert tokens(byte_tokenizer, first.prompt_ids) == ["e", "f", "g", "h"]
    assert tokens(byte_tokenizer, first.chosen_ids) == list("01234567")  # 12 - 4, eos lost
    assert tokens(byte_tokenizer, first.rejected_ids) == ["x", "y", EOS]
    assert tokens(byte_tokenizer, second.chosen_ids) == ["r", "s", EOS]
    assert tokens(byte_tokenizer, third.chosen_ids) == [*"0123456", EOS]  # exactly 8: fits
    assert tokens(byte_tokenizer, third.rejected_ids) == list("01234567")
    assert (stats.pairs_seen, stats.pairs_truncated, stats.prompts_truncated) == (3, 2, 1)
    assert (stats.responses_truncated, stats.pairs_dropped, stats.pairs_kept) == (2, 0, 3)
    batch = collate_pairs(examples, pad_id=0, bucket_lengths=(12,))
    assert batch["chosen_loss_mask"][0].tolist() == [0] * 4 + [1] * 8


def test_drop_truncated_drops_those_pairs(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", TRUNCATION_RECORDS)
    examples, stats = load(
        path, byte_tokenizer, max_length=12, max_prompt_length=4, drop_truncated=True
    )
    assert [e.line for e in examples] == [2]
    assert (stats.pairs_seen, stats.pairs_truncated, stats.pairs_dropped, stats.pairs_kept) == (
        3,
        2,
        2,
        1,
    )


def test_lengths_are_validated(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", TRUNCATION_RECORDS)
    with pytest.raises(ValueError, match=r"max_prompt_length \(8\) must be below max_length \(8\)"):
        load(path, byte_tokenizer, max_length=8, max_prompt_length=8)


# --- buckets and collation ------------------------------------------------------------------------


def example(prompt_len: int, chosen_len: int, rejected_len: int) -> PreferenceExample:
    return PreferenceExample(
        prompt_ids=np.full(prompt_len, 7, np.int32),
        chosen_ids=np.full(chosen_len, 8, np.int32),
        rejected_ids=np.full(rejected_len, 9, np.int32),
        source="mem",
        line=1,
    )


def test_default_bucket_lengths():
    assert default_bucket_lengths(512) == (64, 128, 256, 512)
    assert default_bucket_lengths(300) == (64, 128, 256, 300)
    assert default_bucket_lengths(64) == (64,)
    assert default_bucket_lengths(48) == (48,)
    assert default_bucket_lengths(100, min_length=20) == (32, 64, 100)


def test_bucket_lengths_are_validated():
    assert check_bucket_lengths([16, 32], 32) == (16, 32)
    with pytest.raises(ValueError, match="strictly increasing"):
        check_bucket_lengths([32, 16], 32)
    with pytest.raises(ValueError, match=r"largest bucket \(16\) is below max_length \(32\)"):
        check_bucket_lengths([8, 16], 32)


def test_chosen_and_rejected_share_the_smallest_fitting_bucket():
    batch = collate_pairs(
        [example(10, 60, 5), example(3, 4, 5)], pad_id=0, bucket_lengths=(64, 128)
    )
    assert {batch[k].shape for k in BATCH_KEYS} == {(2, 128)}  # 10 + 60 = 70 > 64
    assert batch["chosen_scored_positions"].shape == (2, 64)  # responses of <= 61 tokens: T / 2
    assert batch["rejected_segment_ids"].sum(axis=1).tolist() == [15, 8]
    batch = collate_pairs([example(3, 4, 60)], pad_id=0, bucket_lengths=(64, 128))
    assert {batch[k].shape for k in BATCH_KEYS} == {(1, 64)}  # 63 fits 64
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        collate_pairs([example(3, 4, 62)], pad_id=0, bucket_lengths=(32, 64))


def test_pad_id_only_fills_padding():
    # A pad id equal to a real token id changes nothing but the padding's input ids.
    batch = collate_pairs([example(2, 2, 1)], pad_id=8, bucket_lengths=(6,))
    assert batch["chosen_input_ids"][0].tolist() == [7, 7, 8, 8, 8, 8]
    assert batch["chosen_segment_ids"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["chosen_loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0]
    assert batch["rejected_input_ids"][0].tolist() == [7, 7, 9, 8, 8, 8]
    assert batch["rejected_positions"][0].tolist() == [0, 1, 2, 0, 0, 0]
