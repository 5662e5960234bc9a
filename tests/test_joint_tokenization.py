"""data.tokenization=joint against TRL 1.16's own DPO tokenisation, row by row.

The referee is TRL's `DPOTrainer._prepare_dataset` itself (prompt extraction, eos-as-text,
tokenisation and the common-prefix split), called unbound on a stand-in `self` that carries the
one attribute it reads (`_tokenizer`), so no model is built. The tokenizer is the tiny byte-level
BPE trained on the test texts themselves, so its merges cross the prompt/response seam on the rows
built for it: a prompt ending in a space, mid-word, mid-number, inside a punctuation run, or (chat)
a completion starting with a newline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flux_jax.config import ConfigError, FluxConfig
from flux_jax.data import load_preference_examples
from flux_jax.data.formats import split_shared_text, split_shared_text_as_trl
from flux_jax.data.tokenization import tokenize_pairs
from flux_jax.tiny_tokenizer import EOS_TOKEN, build_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent

# (prompt, chosen, rejected): 16 plain-text rows.
PLAIN_ROWS = [
    ("What is the capital of France? ", "Paris is the capital.", "Rome is."),
    ("Say hello wor", "ld peace", "king hard"),
    ("Count: 12", "34 and on", "5 then stop"),
    ("Count: 12", "34 and on", " many"),  # only chosen merges: the cut follows the shorter prefix
    ("Really!", "?! yes", "? no"),
    ("Question:\n", "\nThe answer follows.", "\nNo idea."),
    ("What is the capital of France?\n", "Paris is the capital.", "Rome is."),
    ("What colour is the sky?", " The sky is blue.", " The sky is green."),
    ("Name a river.\n", "The Nile is a river.", "The sky is a river."),
    ("", "Hello world", "Goodbye world"),
    ("Is water wet?\n", "Yes, water is wet." + EOS_TOKEN, "No."),  # eos text already there
    ("Translate: chat\n", "cat", "dog"),
    ("2 + 2 =", " 4", " 5"),
    ("List three colours:\n", "red, green, blue", "pizza"),
    ("Finish: the quick brown", " fox jumps", " dog sleeps"),
    ("Finish: the quick brown ", "fox jumps", "dog sleeps"),
]
# Rows whose BPE merges across the prompt/response seam with the tokenizer below (chosen or
# rejected side), and the row whose chosen already ends with the eos text (separate then has two).
BOUNDARY_MERGE_ROWS = {0, 1, 2, 3, 4, 15}
EOS_IN_TEXT_ROWS = {10}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


CHAT_ROWS = [
    {
        "prompt": user("Capital of France?"),
        "chosen": assistant("Paris."),
        "rejected": assistant("Rome."),
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, *user("Count to four.")],
        "chosen": assistant("\n\n1 2 3 4"),  # merges with the generation prompt's newline
        "rejected": assistant("\n\nNo."),
    },
    {
        "prompt": user("Say hello wor"),
        "chosen": assistant("ld peace"),
        "rejected": assistant("No."),
    },
    {
        "prompt": user("Hi") + assistant("Hello!") + user("Colour of the sky?"),
        "chosen": assistant("Blue."),
        "rejected": assistant("\n\nGreen."),
    },
]
IMPLICIT_TEXT_ROWS = [
    {"chosen": "The sky is blue.", "rejected": "The sky is black."},  # TRL cuts mid-word
    {"chosen": "Q: 1234", "rejected": "Q: 1256"},
    {"chosen": "Hello world", "rejected": "Hello there"},
    {"chosen": "Hi", "rejected": "Hi there"},  # one starts the other
    {"chosen": "Answer: zqxwv", "rejected": "Answer: zqxjk"},  # unmerged bytes: the cut shows
]
IMPLICIT_CHAT_ROWS = [
    {
        "chosen": user("Capital of France?") + assistant("Paris."),
        "rejected": user("Capital of France?") + assistant("Rome."),
    },
    {
        "chosen": user("Hi") + assistant("\n\nHello!"),
        "rejected": user("Hi") + assistant("Go away."),
    },
]


def corpus() -> list[str]:
    """Whole texts of the plain rows and chat seams, so the trained merges cross the seams the
    rows are built on. Implicit rows stay out, so a mid-word TRL cut keeps its byte tokens."""
    texts = [p + c for p, c, _ in PLAIN_ROWS] + [p + r for p, _, r in PLAIN_ROWS]
    texts += ["\n\n1 2 3 4", "\n\nNo.", "\n\nGreen.", "\n\nHello!", "assistant\n\n"]
    return texts * 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(corpus(), vocab_size=600)


@pytest.fixture(scope="module")
def trl():
    """TRL's DPOTrainer and data helpers, imported once (the import costs seconds)."""
    datasets = pytest.importorskip("datasets")
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    datasets.disable_progress_bars()
    return trl_dpo


def plain_records() -> list[dict]:
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PLAIN_ROWS]


def trl_ids(trl, rows: list[dict], tokenizer, max_length: int | None = None) -> list[tuple]:
    """(prompt_ids, chosen_ids, rejected_ids) of each row as TRL 1.16's DPOTrainer prepares them."""
    from datasets import Dataset

    stand_in = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(
        dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start"
    )
    prepared = trl.DPOTrainer._prepare_dataset(
        stand_in, Dataset.from_list(rows), tokenizer, args, "t"
    )
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in prepared]


def our_ids(tmp_path: Path, rows, tokenizer, data_format: str, **options) -> list[tuple]:
    path = tmp_path / f"{data_format}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = {"max_length": 4096, "max_prompt_length": 2048, "tokenization": "joint"} | options
    examples, _ = load_preference_examples(path, tokenizer, data_format=data_format, **options)
    return [
        (e.prompt_ids.tolist(), e.chosen_ids.tolist(), e.rejected_ids.tolist()) for e in examples
    ]


def mismatches(ours: list[tuple], theirs: list[tuple], tokenizer) -> list[str]:
    assert len(ours) == len(theirs)
    show = tokenizer.convert_ids_to_tokens
    return [
        f"row {i}: ours {[show(ids) for ids in a]} != TRL {[show(list(ids)) for ids in b]}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
        if a != tuple(list(ids) for ids in b)
    ]


@pytest.mark.parametrize(
    "data_format, rows",
    [
        ("preferences", plain_records()),
        ("conversational", CHAT_ROWS),
        ("implicit_prompt", IMPLICIT_TEXT_ROWS),
        ("implicit_prompt", IMPLICIT_CHAT_ROWS),
    ],
    ids=["preferences", "conversational", "implicit_text", "implicit_chat"],
)
def test_joint_matches_trl_row_by_row(tmp_path, tokenizer, trl, data_format, rows):
    ours = our_ids(tmp_path, rows, tokenizer, data_format)
    assert not mismatches(ours, trl_ids(trl, rows, tokenizer), tokenizer)


def test_rows_exercise_the_seam(tokenizer):
    """The rows do what they are there for: the tokenised prompt is not a prefix of the tokenised
    whole on the boundary-merge rows, plain and chat, so the match above is not the trivial one."""
    for p, c, r in (PLAIN_ROWS[i] for i in BOUNDARY_MERGE_ROWS):
        prompt_ids = tokenizer(p)["input_ids"]
        wholes = [tokenizer(p + x + EOS_TOKEN)["input_ids"] for x in (c, r)]
        assert any(whole[: len(prompt_ids)] != prompt_ids for whole in wholes)

    def chat_ids(messages, **options):
        return tokenizer.apply_chat_template(messages, **options)["input_ids"]

    for prompt, chosen in (
        (CHAT_ROWS[1]["prompt"], CHAT_ROWS[1]["chosen"]),
        (IMPLICIT_CHAT_ROWS[1]["chosen"][:1], IMPLICIT_CHAT_ROWS[1]["chosen"][1:]),
    ):
        prompt_ids = chat_ids(prompt, add_generation_prompt=True)
        assert chat_ids(prompt + chosen)[: len(prompt_ids)] != prompt_ids


def test_separate_differs_from_joint_exactly_on_boundary_merge_rows(tmp_path, tokenizer):
    joint = our_ids(tmp_path, plain_records(), tokenizer, "preferences")
    separate = our_ids(tmp_path, plain_records(), tokenizer, "preferences", tokenization="separate")
    differing = {i for i, (a, b) in enumerate(zip(joint, separate, strict=True)) if a != b}
    assert differing == BOUNDARY_MERGE_ROWS | EOS_IN_TEXT_ROWS
    for i in BOUNDARY_MERGE_ROWS:  # joint keeps each whole sequence as the text tokenises
        prompt, chosen, _ = PLAIN_ROWS[i]
        prompt_ids, chosen_ids, _ = joint[i]
        assert prompt_ids + chosen_ids == tokenizer(prompt + chosen + EOS_TOKEN)["input_ids"]
    # separate appends the eos id even after an eos written in the text; joint (as TRL) does not.
    assert separate[10][1][-2:] == [tokenizer.eos_token_id] * 2
    assert joint[10][1][-2:] != [tokenizer.eos_token_id] * 2


def test_joint_chat_keeps_the_template_tail_and_separate_trims_it(tmp_path, tokenizer):
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    joint = our_ids(tmp_path, CHAT_ROWS, tokenizer, "conversational")
    separate = our_ids(tmp_path, CHAT_ROWS, tokenizer, "conversational", tokenization="separate")
    assert joint[0][1][-2:] == [tokenizer.eos_token_id, *newline]
    assert separate[0][1][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        ("The sky is blue.", "The sky is black."),
        ("The sky is blue.", "The sky is green."),
        ("Q:\nyes", "Q:\nno"),
        ("Hi", "Hi there"),
        ("Hi there", "Hi"),
        ("abc", "xyz"),
        ("a  b", "a  c"),
    ],
)
def test_trl_implicit_prompt_split_matches_extract_prompt(trl, chosen, rejected):
    from trl.data_utils import extract_prompt

    theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
    expected = (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    assert split_shared_text_as_trl(chosen, rejected) == expected


def test_trl_split_departs_where_trl_reads_the_last_character():
    """Differing at character 0, TRL checks chosen[-1] (Python's last character): a chosen ending
    in a space becomes the prompt. Ours keeps an empty prompt, as the word split does."""
    assert split_shared_text_as_trl("yes ", "no") == ("", "yes ", "no")
    assert split_shared_text("yes ", "no") == ("", "yes ", "no")


def test_joint_truncation_matches_trl_keep_start(tmp_path, tokenizer, trl):
    """With every prompt within max_prompt_length, our truncation (prompt keeps its end, then
    completions their start) is TRL 1.16's keep_start: the first max_length tokens of each
    sequence. TRL drops pairs whose prompt fills max_length; we keep those truncated."""
    max_length = 6
    records = plain_records()
    ours = our_ids(
        tmp_path,
        records,
        tokenizer,
        "preferences",
        max_length=max_length,
        max_prompt_length=max_length - 1,
    )
    theirs = trl_ids(trl, records, tokenizer, max_length=max_length)
    collator = trl.DataCollatorForPreference(pad_token_id=0, max_length=max_length)
    untruncated = our_ids(tmp_path, records, tokenizer, "preferences")
    kept = [i for i, (p, _, _) in enumerate(untruncated) if len(p) < max_length]
    assert len(theirs) == len(kept) < len(records)  # some prompts fill max_length
    batch = collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in theirs])
    n = len(theirs)
    for row, i in enumerate(kept):
        prompt_ids, chosen_ids, rejected_ids = ours[i]
        for side, ids in ((0, chosen_ids), (1, rejected_ids)):
            attention = batch["attention_mask"][side * n + row].numpy().astype(bool)
            np.testing.assert_array_equal(
                batch["input_ids"][side * n + row].numpy()[attention], prompt_ids + ids
            )
            np.testing.assert_array_equal(
                batch["completion_mask"][side * n + row].numpy()[attention],
                [0] * len(prompt_ids) + [1] * len(ids),
            )


def test_tokenization_key_is_checked_and_reaches_the_loader(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="data.tokenization"):
        FluxConfig.from_dict({"data": {"tokenization": "merged"}})
    with pytest.raises(ValueError, match="unknown data.tokenization 'merged'"):
        tokenize_pairs([], tokenizer, "merged")
    from flux_jax import train_data

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in plain_records()))
    expected = our_ids(tmp_path, plain_records(), tokenizer, "preferences")
    config = FluxConfig.from_dict(
        {"data": {"tokenization": "joint", "max_length": 4096, "max_prompt_length": 2048}}
    )
    examples, _ = train_data.load_examples(config, tokenizer, str(path), "preferences")
    assert [e.chosen_ids.tolist() for e in examples] == [c for _, c, _ in expected]


def test_reference_cache_key_includes_joint_tokenization(monkeypatch, tmp_path, tokenizer):
    """Precomputed reference log-probs of joint ids are not reused for separate ids (or back);
    the default adds nothing, so caches written before the key existed still hit."""
    from flux_jax import train_data

    class Captured(Exception):
        pass

    def capture(model_fp, data_fp, settings):
        raise Captured(settings)

    monkeypatch.setattr(train_data.ts, "make_ref_logps_step", lambda *args: None)
    monkeypatch.setattr(train_data.ref_logps, "cache_key", capture)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(plain_records()[0]) + "\n")
    reference = train_data.Reference(graphdef=None, params=None, chunk_size=None)
    settings = {}
    for tokenization in ("separate", "joint"):
        config = FluxConfig.from_dict({"data": {"tokenization": tokenization}})
        add = train_data._ref_logps_adder(config, tokenizer, None, "preferences", reference)
        with pytest.raises(Captured) as caught:
            add([], str(path))
        settings[tokenization] = caught.value.args[0]
    assert "tokenization" not in settings["separate"]
    assert settings["joint"] == settings["separate"] | {"tokenization": "joint"}


def test_cli_data_check_counts_joint_tokens_in_a_subprocess(tmp_path, tokenizer):
    """`flux-jax data check --tokenization joint` measures the joint ids, and says so."""
    from flux_jax.data import data_check_report

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in plain_records()))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    command = [sys.executable, "-m", "flux_jax.cli", "data", "check", str(path)]
    command += ["--tokenizer", str(tmp_path / "tokenizer"), "--tokenization", "joint"]
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "format preferences, tokenization joint)" in done.stdout
    options = {"data_format": "preferences", "max_length": 1024, "max_prompt_length": 512}
    joint = data_check_report(path, tokenizer, tokenization="joint", **options)
    separate = data_check_report(path, tokenizer, **options)
    assert joint["tokens"]["chosen"] != separate["tokens"]["chosen"]
    chosen_row = next(row for row in done.stdout.splitlines() if row.strip().startswith("chosen"))
    summary = joint["tokens"]["chosen"]
    assert chosen_row.split()[1:] == [str(summary[k]) for k in ("p50", "p90", "p99", "max")]
