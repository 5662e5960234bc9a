"""Reading preference files: input kinds (.jsonl, .jsonl.gz, directory, glob) and bad records."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from flux_jax.data import DataError, load_preference_examples
from flux_jax.data.formats import split_shared_text
from flux_jax.data.loading import load_text_pairs, process_share
from flux_jax.data.records import read_records, resolve_data_files
from flux_jax.tiny_tokenizer import build_tiny_tokenizer

GOOD = {"prompt": "Hi?\n", "chosen": "Hello.", "rejected": "meh"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def jsonl_line(record: dict) -> bytes:
    return (json.dumps(record) + "\n").encode()


def write_lines(path: Path, lines: list[bytes]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(b"".join(lines))
    return path


def load(path, tokenizer, **options):
    options = {"data_format": "preferences", "max_length": 64, "max_prompt_length": 32} | options
    return load_preference_examples(path, tokenizer, **options)


# Each bad line goes on physical line 3, after a good record and a blank line.
BAD_LINES = {
    "invalid_json": (
        b'{"prompt": "Hi", "chosen": "Hello.",\n',
        "line is not valid JSON (Expecting property name enclosed in double quotes at column 37)",
    ),
    "missing_field": (
        jsonl_line({"prompt": "Hi", "rejected": "meh"}),
        "field 'chosen' is missing (record has keys: prompt, rejected)",
    ),
    "wrong_type": (
        jsonl_line({"prompt": "Hi", "chosen": 5, "rejected": "meh"}),
        "field 'chosen' has type number, expected a string",
    ),
    "empty_chosen": (
        jsonl_line({"prompt": "Hi", "chosen": "", "rejected": "meh"}),
        "field 'chosen' is empty",
    ),
    "empty_rejected_whitespace": (
        jsonl_line({"prompt": "Hi", "chosen": "ok", "rejected": " \n "}),
        "field 'rejected' is empty",
    ),
    "invalid_utf8": (
        b'{"prompt": "Hi", "chosen": "caf\xe9", "rejected": "meh"}\n',
        "line is not valid UTF-8 (byte 0xe9 at byte 32)",
    ),
    "not_an_object": (b'["Hi", "Hello.", "meh"]\n', "line holds a JSON array, expected an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_error_names_file_line_and_field(tmp_path, tokenizer, case):
    bad_line, reason = BAD_LINES[case]
    path = write_lines(tmp_path / "prefs.jsonl", [jsonl_line(GOOD), b"\n", bad_line])
    with pytest.raises(DataError) as info:
        load(path, tokenizer)
    assert str(info.value) == f"{path}:3: {reason}"
    assert info.value.line == 3
    assert info.value.source == str(path)


def test_bad_record_error_field_attribute(tmp_path, tokenizer):
    path = write_lines(tmp_path / "p.jsonl", [BAD_LINES["wrong_type"][0]])
    with pytest.raises(DataError) as info:
        load(path, tokenizer)
    assert info.value.field == "chosen"
    assert isinstance(info.value, ValueError)


def test_skip_mode_counts_and_reports_bad_records(tmp_path, tokenizer, caplog):
    lines = [jsonl_line(GOOD)]
    lines += [BAD_LINES[case][0] for case in sorted(BAD_LINES)]  # lines 2..8
    lines += [b"\n", jsonl_line(GOOD)]  # line 9 blank, line 10 good
    path = write_lines(tmp_path / "p.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        examples, stats = load(path, tokenizer, on_bad_record="skip")
    assert len(examples) == 2
    assert [e.line for e in examples] == [1, 10]
    assert stats.records_read == 9
    assert stats.bad_records == 7
    assert stats.pairs_kept == 2
    assert stats.bad_record_lines == [f"{path}:{n}" for n in range(2, 9)]
    assert stats.bad_record_examples[0] == f"{path}:2: {BAD_LINES['empty_chosen'][1]}"
    assert f"skipped 7 bad records; the first at {path}:2" in caplog.text


def test_unknown_on_bad_record_and_data_format(tmp_path, tokenizer):
    path = write_lines(tmp_path / "p.jsonl", [jsonl_line(GOOD)])
    with pytest.raises(ValueError, match="unknown on_bad_record 'ignore'"):
        load(path, tokenizer, on_bad_record="ignore")
    with pytest.raises(
        ValueError,
        match="unknown data_format 'prefs'; valid formats are: preferences, conversational, "
        "implicit_prompt",
    ):
        load(path, tokenizer, data_format="prefs")


def test_identical_chosen_and_rejected_is_warned_and_kept(tmp_path, tokenizer, caplog):
    same = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}
    path = write_lines(tmp_path / "p.jsonl", [jsonl_line(GOOD), jsonl_line(same)])
    with caplog.at_level(logging.WARNING):
        examples, stats = load(path, tokenizer)
    assert len(examples) == 2
    assert stats.identical_pairs == 1
    assert f"{path}:2: chosen and rejected are identical" in caplog.text


def test_gzip_input_equals_plain_input(tmp_path, tokenizer):
    records = [dict(GOOD, prompt=f"Question {i}?\n") for i in range(5)]
    lines = [jsonl_line(r) for r in records]
    plain, _ = load(write_lines(tmp_path / "p.jsonl", lines), tokenizer)
    zipped, stats = load(write_lines(tmp_path / "p.jsonl.gz", lines), tokenizer)
    assert stats.pairs_kept == 5
    for a, b in zip(plain, zipped, strict=True):
        assert a.prompt_ids.tolist() == b.prompt_ids.tolist()
        assert a.chosen_ids.tolist() == b.chosen_ids.tolist()
        assert a.line == b.line
    assert zipped[0].source.endswith("p.jsonl.gz")


def test_gzip_bad_record_reports_decompressed_line(tmp_path, tokenizer):
    lines = [jsonl_line(GOOD), BAD_LINES["missing_field"][0]]
    path = write_lines(tmp_path / "p.jsonl.gz", lines)
    with pytest.raises(DataError, match=r"p\.jsonl\.gz:2: field 'chosen' is missing"):
        load(path, tokenizer)


def test_directory_and_glob_read_shards_in_sorted_order(tmp_path, tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_lines(shards / "part-1.jsonl", [jsonl_line(dict(GOOD, prompt="B1")), jsonl_line(GOOD)])
    write_lines(shards / "part-0.jsonl.gz", [jsonl_line(dict(GOOD, prompt="A1"))])
    (shards / "README.txt").write_text("not a shard")
    assert [p.name for p in resolve_data_files(shards)] == ["part-0.jsonl.gz", "part-1.jsonl"]
    assert [p.name for p in resolve_data_files(f"{shards}/*.jsonl")] == ["part-1.jsonl"]
    examples, stats = load(shards, tokenizer)
    assert stats.records_read == 3
    assert [(Path(e.source).name, e.line) for e in examples] == [
        ("part-0.jsonl.gz", 1),
        ("part-1.jsonl", 1),
        ("part-1.jsonl", 2),
    ]
    assert tokenizer.decode(examples[0].prompt_ids) == "A1"


def test_missing_path_and_empty_directory_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        resolve_data_files(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"directory matches no \.jsonl or \.jsonl\.gz files"):
        resolve_data_files(tmp_path)


def test_read_records_skips_blank_lines_and_counts_physical_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [b"\n", jsonl_line(GOOD), b"   \n", jsonl_line(GOOD)])
    assert [r.line for r in read_records(path)] == [2, 4]


def test_conversational_bad_records_name_nested_fields(tmp_path, tokenizer):
    user = {"role": "user", "content": "Hi"}
    cases = [
        ({"prompt": "Hi", "chosen": [], "rejected": []}, "field 'prompt' has type string"),
        ({"prompt": [user], "chosen": [], "rejected": [user]}, "field 'chosen' is empty"),
        (
            {"prompt": [user], "chosen": {"role": "assistant"}, "rejected": user},
            "field 'chosen.content' is missing (message has keys: role)",
        ),
        (
            {"prompt": [user, {"role": 1, "content": "x"}], "chosen": user, "rejected": user},
            "field 'prompt[1].role' has type number, expected a string",
        ),
        (
            {"prompt": [user], "chosen": [{"role": "assistant", "content": ""}], "rejected": user},
            "field 'chosen[-1].content' is empty",
        ),
    ]
    for record, message in cases:
        path = write_lines(tmp_path / "c.jsonl", [jsonl_line(record)])
        with pytest.raises(DataError) as info:
            load(path, tokenizer, data_format="conversational")
        assert str(info.value).startswith(f"{path}:1: {message}"), str(info.value)


def test_implicit_prompt_string_split_at_word_start():
    assert split_shared_text("The capital is Paris.", "The capital is Parma.") == (
        "The capital is",
        " Paris.",
        " Parma.",
    )
    # A newline stays with the prompt; only a single space moves to the completions.
    assert split_shared_text("Q?\nyes", "Q?\nno") == ("Q?\n", "yes", "no")
    # One side a prefix of the other: the cut falls back to the start of the shared word.
    assert split_shared_text("Hi there", "Hi") == ("", "Hi there", "Hi")


def test_implicit_prompt_records(tmp_path, tokenizer):
    user = {"role": "user", "content": "Hi"}
    records = [
        {"chosen": "Answer: yes, sure.", "rejected": "Answer: no way."},
        {
            "chosen": [user, {"role": "assistant", "content": "Hello!"}],
            "rejected": [user, {"role": "assistant", "content": "meh"}],
        },
    ]
    path = write_lines(tmp_path / "i.jsonl", [jsonl_line(r) for r in records])
    pairs, stats = load_text_pairs(path, tokenizer, data_format="implicit_prompt")
    assert stats.pairs_valid == 2
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (
        "Answer:",
        " yes, sure.",
        " no way.",
    )
    assert pairs[0].from_chat is False
    assert pairs[1].prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert (pairs[1].chosen, pairs[1].rejected) == ("Hello!", "meh")
    assert pairs[1].from_chat is True


def test_implicit_prompt_bad_records(tmp_path, tokenizer):
    user = {"role": "user", "content": "Hi"}
    cases = [
        ({"prompt": "x", "chosen": "a", "rejected": "b"}, "field 'prompt' is present"),
        ({"chosen": "same", "rejected": "same"}, "field 'rejected' is identical to 'chosen'"),
        ({"chosen": [user], "rejected": [user, user]}, "field 'chosen' has no messages after"),
        ({"chosen": "text", "rejected": [user]}, "field 'rejected' has type array, expected"),
    ]
    for record, message in cases:
        path = write_lines(tmp_path / "i.jsonl", [jsonl_line(record)])
        with pytest.raises(DataError) as info:
            load_text_pairs(path, tokenizer, data_format="implicit_prompt")
        assert str(info.value).startswith(f"{path}:1: {message}"), str(info.value)


def test_process_share_takes_equal_strided_shares():
    items = list(range(7))
    assert process_share(items, 0, 2) == [0, 2, 4]
    assert process_share(items, 1, 2) == [1, 3, 5]  # 6 is left over so both shares are equal
    assert process_share(items, 0, 1) == items
    with pytest.raises(ValueError, match="process_index < process_count"):
        process_share(items, 2, 2)
