"""Damaged and hostile data inputs: each becomes a bad record or a damaged shard naming the file
(and line and field), skippable with on_bad_record="skip", and `flux-jax data check` fails on them.

Damaged .jsonl.gz shards, lone surrogate escapes, over-long lines (read with bounded memory), chat
roles the template would drop, template errors, duplicate pairs, and the data-check exit code.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from flux_jax.data import DataError, data_check_report, format_data_check_report
from flux_jax.data.chat import template_roles
from flux_jax.data.loading import load_text_pairs
from flux_jax.data.records import DEFAULT_MAX_RECORD_BYTES, ShardReadError, read_records
from flux_jax.tiny_tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer

GOOD = {"prompt": "Hi?\n", "chosen": "Hello.", "rejected": "meh"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(texts=["unused"], vocab_size=259)


def line(record: dict) -> bytes:
    return (json.dumps(record) + "\n").encode()


def good_lines(n: int) -> list[bytes]:
    return [line({**GOOD, "chosen": f"Hello {i}."}) for i in range(n)]


def write(path: Path, lines: list[bytes]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(b"".join(lines))
    return path


def load(path, tokenizer, **options):
    return load_text_pairs(path, tokenizer, **({"data_format": "preferences"} | options))


# --- Damaged .jsonl.gz shards --------------------------------------------------------------


def truncated_gzip(path: Path, lines: int = 2000) -> Path:
    """A gzip shard cut off mid-stream, as a copy interrupted or a full disk leaves it."""
    write(path, good_lines(lines))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_not_gzip_shard_names_the_file(tmp_path, tokenizer):
    path = write(tmp_path / "plain.jsonl.gz", [])
    path.write_bytes(b"".join(good_lines(3)))  # plain text under a .gz name
    with pytest.raises(ShardReadError) as info:
        load(path, tokenizer)
    assert str(info.value).startswith(f"{path}: is not gzip data (BadGzipFile: ")
    assert "rename a plain-text file to .jsonl" in str(info.value)


def test_truncated_gzip_names_file_and_line_and_skip_keeps_what_was_read(tmp_path, tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    bad = truncated_gzip(shards / "a.jsonl.gz")
    write(shards / "b.jsonl", good_lines(3))
    with pytest.raises(ShardReadError) as info:
        load(shards, tokenizer)
    err = info.value
    assert err.source == str(bad) and err.line > 1
    assert str(err).startswith(f"{bad}:{err.line}: cannot be read from this line on: ")
    assert "EOFError" in str(err)

    pairs, stats = load(shards, tokenizer, on_bad_record="skip")
    assert stats.shards_cut_short == 1 and stats.bad_records == 0
    assert stats.shard_errors == [str(err)]
    # Every whole line before the damage is kept, then the next shard is read.
    assert len(pairs) == err.line - 1 + 3
    assert pairs[-1].source == str(shards / "b.jsonl")


def test_corrupt_gzip_data_is_a_damaged_shard(tmp_path, tokenizer):
    path = write(tmp_path / "c.jsonl.gz", good_lines(2000))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # zeroed deflate data
    path.write_bytes(bytes(data))
    items = list(read_records(path))
    assert isinstance(items[-1], ShardReadError)
    assert not any(isinstance(item, ShardReadError) for item in items[:-1])
    assert str(items[-1]).startswith(f"{path}:")


# --- Lone surrogates --------------------------------------------------------------------------


def test_lone_surrogate_is_a_bad_record_with_file_line_field(tmp_path, tokenizer):
    surrogate = b'{"prompt": "Hi", "chosen": "ok \\ud800", "rejected": "meh"}\n'
    emoji = b'{"prompt": "Hi", "chosen": "\\ud83d\\ude00", "rejected": "meh"}\n'  # a valid pair
    path = write(tmp_path / "s.jsonl", [line(GOOD), surrogate, emoji])
    with pytest.raises(DataError) as info:
        load(path, tokenizer)
    assert str(info.value).startswith(f"{path}:2: field 'chosen' holds a lone UTF-16 surrogate")
    assert info.value.field == "chosen"
    pairs, stats = load(path, tokenizer, on_bad_record="skip")
    assert [p.line for p in pairs] == [1, 3] and stats.bad_records == 1
    assert pairs[1].chosen == "\N{GRINNING FACE}"


def test_lone_surrogate_in_a_message_names_the_nested_field(tmp_path, tokenizer):
    record = (
        b'{"prompt": [{"role": "user", "content": "Q"}], '
        b'"chosen": [{"role": "assistant", "content": "\\udc00"}], '
        b'"rejected": {"role": "assistant", "content": "no"}}\n'
    )
    path = write(tmp_path / "c.jsonl", [record])
    with pytest.raises(DataError, match=r":1: field 'chosen\[0\]\.content' holds a lone"):
        load(path, tokenizer, data_format="conversational")


# --- Over-long records ------------------------------------------------------------------------


def test_over_long_line_is_a_bad_record_and_the_next_lines_still_read(tmp_path, tokenizer):
    long = line({**GOOD, "chosen": "x" * 5000})
    path = write(tmp_path / "l.jsonl", [line(GOOD), long, line(GOOD), b"\n", line(GOOD)])
    with pytest.raises(DataError) as info:
        load(path, tokenizer, max_record_bytes=1000)
    size = len(long) - 1
    assert str(info.value) == (
        f"{path}:2: line is {size:,} bytes, over data.max_record_bytes (1,000); raise "
        "data.max_record_bytes to read it, or remove the record"
    )
    pairs, stats = load(path, tokenizer, max_record_bytes=1000, on_bad_record="skip")
    assert [p.line for p in pairs] == [1, 3, 5] and stats.bad_records == 1


def test_max_record_bytes_is_inclusive(tmp_path):
    record = line(GOOD)
    path = write(tmp_path / "x.jsonl", [record, record])  # the last line also ends with "\n"
    exact = list(read_records(path, max_record_bytes=len(record) - 1))
    assert [type(item).__name__ for item in exact] == ["RawRecord", "RawRecord"]
    over = list(read_records(path, max_record_bytes=len(record) - 2))
    assert all(isinstance(item, DataError) for item in over)
    no_newline = write(tmp_path / "y.jsonl", [record.rstrip(b"\n")])  # no line break
    assert not isinstance(next(read_records(no_newline, len(record) - 1)), DataError)
    assert isinstance(next(read_records(no_newline, len(record) - 2)), DataError)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_over_long_line_is_read_with_bounded_memory(tmp_path, suffix):
    huge = b'{"prompt": "' + b"a" * (24 * 2**20) + b'"}\n'  # a 24 MiB record
    path = write(tmp_path / f"h{suffix}", [huge, line(GOOD)])
    size = len(huge) - 1
    del huge
    tracemalloc.start()
    try:
        items = list(read_records(path, max_record_bytes=2**20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(items[0], DataError) and f"line is {size:,} bytes" in str(items[0])
    assert items[1].line == 2
    # The cap plus one skip chunk (1 MiB each), not the 24 MiB line.
    assert peak < 6 * 2**20, peak


def test_max_record_bytes_config_key_reaches_the_loader(monkeypatch):
    from flux_jax import train_data
    from flux_jax.config import ConfigError, FluxConfig

    config = FluxConfig()
    assert config.data.max_record_bytes == DEFAULT_MAX_RECORD_BYTES
    with pytest.raises(ConfigError, match="data.max_record_bytes must be >= 1"):
        FluxConfig({"data": {"max_record_bytes": 0}})
    config.data.max_record_bytes = 12345
    config.data.token_cache = False  # the in-memory loader (the token store passes it on too)
    seen = {}

    def fake_load(path, tokenizer, settings):
        seen.update(settings.to_dict())
        return [], None

    monkeypatch.setattr(train_data, "load_preference_examples", fake_load)
    train_data.load_examples(config, None, "p.jsonl", "preferences")
    assert seen["max_record_bytes"] == 12345


# --- Chat roles and templates -----------------------------------------------------------------


def chat_record(role: str, where: str = "prompt") -> bytes:
    messages = {
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": {"role": "assistant", "content": "no"},
    }
    target = messages[where]
    (target[0] if isinstance(target, list) else target)["role"] = role
    return line(messages)


def with_template(tokenizer, template: str):
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = template
    return copied


@pytest.mark.parametrize(
    "where,field",
    [("prompt", "prompt[0].role"), ("chosen", "chosen[0].role"), ("rejected", "rejected.role")],
)
def test_unknown_chat_role_is_a_bad_record(tmp_path, tokenizer, where, field):
    path = write(tmp_path / "r.jsonl", [chat_record("user"), chat_record("wizard", where)])
    with pytest.raises(DataError) as info:
        load(path, tokenizer, data_format="conversational")
    assert str(info.value) == (
        f"{path}:2: field '{field}' is 'wizard'; allowed roles: system, user, assistant"
    )
    pairs, stats = load(path, tokenizer, data_format="conversational", on_bad_record="skip")
    assert len(pairs) == 1 and stats.bad_records == 1


def test_tool_role_is_allowed_when_the_template_renders_it(tmp_path, tokenizer):
    assert template_roles(tokenizer) == ("system", "user", "assistant")
    # Qwen2.5/Qwen3 templates branch on `message.role == "tool"`.
    tool_template = CHATML_TEMPLATE.replace(
        "{%- for message in messages %}",
        '{%- for message in messages %}{%- if message.role == "tool" %}{%- endif %}',
    )
    with_tool = with_template(tokenizer, tool_template)
    assert template_roles(with_tool) == ("system", "user", "assistant", "tool")
    path = write(tmp_path / "t.jsonl", [chat_record("tool", "prompt")])
    (pair,), _ = load(path, with_tool, data_format="conversational")
    assert "<|im_start|>tool\nQ" in pair.prompt
    with pytest.raises(DataError, match="is 'tool'; allowed roles: system, user, assistant$"):
        load(path, tokenizer, data_format="conversational")


def test_a_template_refusing_the_messages_is_a_bad_record(tmp_path, tokenizer):
    strict = with_template(
        tokenizer,
        "{%- if messages[0].role != 'user' %}{{ raise_exception('No user query found') }}"
        "{%- endif %}" + CHATML_TEMPLATE,
    )
    path = write(tmp_path / "q.jsonl", [chat_record("system"), chat_record("user")])
    with pytest.raises(DataError) as info:
        load(path, strict, data_format="conversational")
    assert str(info.value) == (
        f"{path}:1: field 'prompt' is refused by the chat template "
        "(TemplateError: No user query found)"
    )
    pairs, stats = load(path, strict, data_format="conversational", on_bad_record="skip")
    assert [p.line for p in pairs] == [2] and stats.bad_records == 1


# --- Duplicates and the data-check verdict ----------------------------------------------------


def test_duplicate_pairs_are_counted_with_locations(tmp_path, tokenizer):
    other = line({**GOOD, "rejected": "other"})
    path = write(tmp_path / "d.jsonl", [line(GOOD), other, line(GOOD), b"\n", line(GOOD)])
    pairs, stats = load(path, tokenizer)
    assert len(pairs) == 4  # kept: some datasets repeat pairs on purpose
    assert stats.duplicate_pairs == 2
    assert stats.duplicate_pair_examples == [f"{path}:3 (= {path}:1)", f"{path}:5 (= {path}:1)"]


def check(path, tokenizer):
    return data_check_report(
        path, tokenizer, data_format="preferences", max_length=64, max_prompt_length=32
    )


def test_data_check_fails_on_bad_records_damaged_shards_or_no_pairs(tmp_path, tokenizer):
    good = write(tmp_path / "good.jsonl", [line(GOOD), line(GOOD)])
    report = check(good, tokenizer)
    assert report["ok"] and report["duplicate_pairs"] == 1
    text = format_data_check_report(report)
    assert "duplicate pairs  1" in text and f"{good}:2 (= {good}:1)" in text
    assert text.endswith("data check: OK")

    bad = write(tmp_path / "bad.jsonl", [line(GOOD), b"{oops\n"])
    report = check(bad, tokenizer)
    assert not report["ok"] and report["problems"] == ["1 bad record(s)"]
    assert format_data_check_report(report).endswith("data check: FAILED (1 bad record(s))")

    shard = truncated_gzip(tmp_path / "cut.jsonl.gz")
    report = check(shard, tokenizer)
    assert report["problems"] == ["1 damaged shard(s)"]
    assert "damaged shards   1" in format_data_check_report(report)

    blank = write(tmp_path / "blank.jsonl", [b"\n"])
    assert check(blank, tokenizer)["problems"] == ["no valid pairs"]


def test_cli_data_check_exits_1_on_no_valid_pairs(tmp_path, capsys):
    from flux_jax.cli import main

    path = write(tmp_path / "empty.jsonl", [b"\n"])
    assert main(["data", "check", str(path), "--tokenizer", "builtin:tiny-qwen3"]) == 1
    assert "data check: FAILED (no valid pairs)" in capsys.readouterr().out


def test_cli_data_check_exit_code_in_a_subprocess(tmp_path):
    path = write(tmp_path / "p.jsonl", [line(GOOD), b'{"prompt": "x", "chosen": 1}\n'])
    command = [sys.executable, "-m", "flux_jax.cli", "data", "check", str(path)]
    command += ["--tokenizer", "builtin:tiny-qwen3"]
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"{path}:2: field 'chosen' has type number" in done.stdout  # the full report
    assert "valid pairs      1" in done.stdout
    assert done.stdout.rstrip().endswith("data check: FAILED (1 bad record(s))")
