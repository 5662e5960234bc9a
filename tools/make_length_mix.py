"""Synthetic preference files with controlled lengths, and a random Qwen3 model dir to train on.

    python tools/make_length_mix.py --mix fixed --out /tmp/mix-fixed --model qwen3-40m
    python tools/make_length_mix.py --mix longtail --out /tmp/mix-longtail --model qwen3-40m
    python tools/make_length_mix.py --mix longtail --out /tmp/mix-tiny --model tiny --pairs 16

writes OUT/train.jsonl ({"prompt", "chosen", "rejected"} strings) and, unless --no-model,
OUT/model/: config.json + model.safetensors (the preset's shape, random weights from --seed,
written by flux_jax.hf_io.save_pretrained) and a word-level tokenizer that both flux_jax and TRL
read with AutoTokenizer. Every word is one token ("t3" .. "t{V-1}", plus <pad>, <unk>, <eos> as
0, 1, 2), so the lengths below are exact token counts in both tools; both append eos to each
response (the +1 below).

The mixes (deterministic given --seed; lengths in tokens):
  fixed     64 pairs; prompt U[126, 130], each response U[126, 129] words + eos, so every
            sequence has 253-260 tokens: the issue-20 run, where a power-of-two ladder pads
            nearly every batch to 512.
  longtail  256 pairs shaped like public preference sets: prompt ~ lognormal(median 150,
            sigma 0.7) clipped to [8, max_prompt_length]; chosen and rejected independently
            ~ lognormal(median 250, sigma 0.6), clipped so that prompt + response + eos fits
            max_length (no pair is truncated, so TRL and flux_jax see the same tokens).
Train with data.max_length / data.max_prompt_length equal to --max-length / --max-prompt-length
(1024 / 512, the flux_jax defaults).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SPECIAL_WORDS = ("<pad>", "<unk>", "<eos>")
FIRST_WORD_ID = len(SPECIAL_WORDS)
MIXES = ("fixed", "longtail")
DEFAULT_PAIRS = {"fixed": 64, "longtail": 256}
MODEL_ALIASES = {"tiny": "tiny-qwen3", "40m": "qwen3-40m"}


def word(token_id: int) -> str:
    return SPECIAL_WORDS[token_id] if token_id < FIRST_WORD_ID else f"t{token_id}"


def mix_lengths(
    mix: str, num_pairs: int, *, max_length: int, max_prompt_length: int, seed: int
) -> np.ndarray:
    """[num_pairs, 3] int: prompt words, chosen words, rejected words (eos not included)."""
    rng = np.random.default_rng([seed, MIXES.index(mix)])
    if mix == "fixed":
        prompt = rng.integers(126, 131, num_pairs)
        responses = rng.integers(126, 130, (2, num_pairs))
    elif mix == "longtail":
        prompt = np.exp(rng.normal(np.log(150), 0.7, num_pairs))
        prompt = np.clip(np.rint(prompt), 8, max_prompt_length).astype(int)
        responses = np.rint(np.exp(rng.normal(np.log(250), 0.6, (2, num_pairs)))).astype(int)
        room = max_length - prompt - 1  # the eos takes one token
        responses = np.clip(responses, 1, room)
    else:
        raise ValueError(f"unknown mix {mix!r}; choose one of {MIXES}")
    lengths = np.stack([prompt, responses[0], responses[1]], axis=1)
    if (lengths[:, 0] + lengths[:, 1:].max(axis=1) + 1 > max_length).any():
        raise ValueError(f"a {mix} pair exceeds max_length={max_length}: raise --max-length")
    return lengths


def mix_records(lengths: np.ndarray, vocab_size: int, seed: int) -> list[dict[str, str]]:
    """Random words of the given counts. The prompt ends with a space so that prompt + response
    splits into the same words (TRL tokenises the concatenation)."""
    rng = np.random.default_rng([seed, 7])
    records = []
    for prompt_len, chosen_len, rejected_len in lengths:
        texts = [
            " ".join(word(int(i)) for i in rng.integers(FIRST_WORD_ID, vocab_size, n))
            for n in (prompt_len, chosen_len, rejected_len)
        ]
        records.append({"prompt": texts[0] + " ", "chosen": texts[1], "rejected": texts[2]})
    return records


def word_tokenizer(vocab_size: int):
    """Whitespace-separated words <-> ids, exactly; eos "<eos>" (id 2) also pads.

    The special tokens are not "t<id>" words: transformers matches special tokens anywhere in a
    text, so an eos "t2" would split "t257" into "t2" + "57".
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_WORDS[1]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad, unk, eos = SPECIAL_WORDS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, eos_token=eos, unk_token=unk
    )


def write_model_dir(out_dir: Path, preset: str, seed: int) -> None:
    """The preset's Qwen3 with random weights, as an HF checkpoint, plus the word tokenizer."""
    from flux_jax.hf_io import save_pretrained
    from flux_jax.models.qwen.model import build_model
    from flux_jax.models.qwen.presets import PRESETS

    cfg = PRESETS[preset]
    save_pretrained(build_model(cfg, seed=seed), out_dir)
    word_tokenizer(cfg.vocab_size).save_pretrained(out_dir)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", required=True, choices=MIXES)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--pairs", type=int, default=0, help="0 = the mix's default")
    parser.add_argument("--model", default="qwen3-40m", help="preset (or alias: tiny, 40m)")
    parser.add_argument("--no-model", action="store_true", help="write only train.jsonl")
    parser.add_argument("--vocab-size", type=int, default=0, help="0 = the model's vocab")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = MODEL_ALIASES.get(args.model, args.model)
    vocab_size = args.vocab_size
    if not vocab_size:
        from flux_jax.models.qwen.presets import PRESETS

        vocab_size = PRESETS[preset].vocab_size
    lengths = mix_lengths(
        args.mix,
        args.pairs or DEFAULT_PAIRS[args.mix],
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "train.jsonl").open("w", encoding="utf-8") as f:
        for record in mix_records(lengths, vocab_size, args.seed):
            f.write(json.dumps(record) + "\n")
    if not args.no_model:
        write_model_dir(args.out / "model", preset, args.seed)
    sequences = lengths[:, :1] + lengths[:, 1:] + 1
    print(
        json.dumps(
            {
                "mix": args.mix,
                "pairs": len(lengths),
                "data": str(args.out / "train.jsonl"),
                "model_dir": None if args.no_model else str(args.out / "model"),
                "sequence_tokens_min_median_max": [
                    int(sequences.min()),
                    int(np.median(sequences)),
                    int(sequences.max()),
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
