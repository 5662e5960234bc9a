"""Small model/batch builders shared by the train-step tests."""

from __future__ import annotations

import numpy as np

from flux_jax.models.qwen.config import QwenConfig

TINY = QwenConfig(
    model_type="qwen3",
    vocab_size=89,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_theta=10_000.0,
)


def random_pair_batch(
    num_pairs: int,
    length: int,
    *,
    vocab_size: int = TINY.vocab_size,
    seed: int = 0,
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-padded pairs, shared prompt, random responses, in the data pipeline's layout."""
    rng = np.random.default_rng(seed)
    t = pad_to or length
    batch = {}
    prompt_lens = rng.integers(2, length // 2, num_pairs)
    prompts = [rng.integers(3, vocab_size, n) for n in prompt_lens]
    for side in ("chosen", "rejected"):
        ids = np.zeros((num_pairs, t), np.int32)
        mask = np.zeros((num_pairs, t), np.int32)
        seg = np.zeros((num_pairs, t), np.int32)
        pos = np.zeros((num_pairs, t), np.int32)
        for row in range(num_pairs):
            n = int(rng.integers(prompt_lens[row] + 1, length + 1))
            ids[row, : prompt_lens[row]] = prompts[row]
            ids[row, prompt_lens[row] : n] = rng.integers(3, vocab_size, n - prompt_lens[row])
            mask[row, prompt_lens[row] : n] = 1
            seg[row, :n] = 1
            pos[row, :n] = np.arange(n)
        batch.update(
            {
                f"{side}_input_ids": ids,
                f"{side}_loss_mask": mask,
                f"{side}_segment_ids": seg,
                f"{side}_positions": pos,
            }
        )
    return batch
