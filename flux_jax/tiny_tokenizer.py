"""A tiny, deterministic, Qwen-like tokenizer built offline, for tests and the embedded demo.

It is a byte-level BPE (the same family as Qwen's): every byte has a token, so any text encodes
without unknown tokens. It has Qwen's special tokens and a ChatML chat template:

    <|endoftext|>  padding          <|im_start|>  turn start          <|im_end|>  turn end / eos

and, like Qwen, it adds no special tokens when encoding (no BOS, no EOS). Training is
deterministic: the same texts and vocab_size give the same vocabulary on every run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)

DEMO_DATA = Path(__file__).resolve().parent / "assets" / "demo_preferences.jsonl"

# Qwen's ChatML rendering, without tool or system-prompt defaults.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def demo_texts() -> list[str]:
    """Every prompt, chosen and rejected string of the bundled demo data, in file order."""
    texts = []
    with DEMO_DATA.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            texts.extend((record["prompt"], record["chosen"], record["rejected"]))
    return texts


def build_tiny_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (default: the bundled demo data).

    vocab_size counts the 256 byte tokens and the 3 special tokens; a small corpus may yield
    fewer merges than asked for, so the vocabulary can come out smaller.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    corpus = demo_texts() if texts is None else list(texts)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, even those absent from the corpus, so no text is ever unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        chat_template=CHATML_TEMPLATE,
        model_max_length=32768,
    )


def save_tiny_tokenizer(
    out_dir: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 512
) -> Path:
    """Build the tiny tokenizer and save it where `AutoTokenizer.from_pretrained` can load it."""
    out = Path(out_dir)
    build_tiny_tokenizer(texts, vocab_size).save_pretrained(out)
    return out
