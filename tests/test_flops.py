"""flux_jax.flops: a hand count for a toy shape, and agreement with XLA's own count.

XLA's `cost_analysis()` counts every op (softmax, norms, Adam) where ours counts matmuls only, so
it may exceed ours by a few percent and never fall short by more than rounding. It also counts a
while loop's body once, whatever the trip count, so the comparison uses one layer (the layer
scan's body is then the whole model) and a single LM-head chunk.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from flux_jax import batch_logprobs, flops, optim
from flux_jax import train_step as ts
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.models.qwen.model import build_model

# D=8, N=2 heads, K=1 kv head, H=4, F=16, L=2, V=32.
TOY = QwenConfig(
    model_type="qwen3",
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
)


def test_per_token_counts_by_hand():
    # q: 2*8*8 = 128, k and v: 2*8*4 each = 128, o: 2*8*8 = 128, MLP: 3 * 2*8*16 = 768.
    assert flops.layer_flops_per_token(TOY) == 2 * (128 + 128 + 128 + 768)
    assert flops.attention_flops_per_pair(TOY) == 2 * 4 * 2 * 4  # L * 4 * N * H
    assert flops.lm_head_flops_per_token(TOY) == 2 * 8 * 32
    assert flops.causal_pairs([3, 2]) == 6 + 3


def test_step_counts_by_hand():
    # Rows of 3 and 2 real tokens padded to 4: useful forward = 5 tokens * (2304 + 512) + 9 * 64.
    fwd = 5 * (2304 + 512) + 9 * 64
    # Padded: 2 rows * 4 tokens * 2304, 2 * 16 pairs * 64, head on 2 * 3 positions * 512.
    layers, attention, head = 8 * 2304, 32 * 64, 6 * 512
    down_proj = 8 * 2 * 2 * 16 * 8  # tokens * L * 2*F*D

    got = flops.dpo_step_flops(TOY, [3, 2], 4, reference="model")
    assert got.model_flops == 4 * fwd
    assert got.hardware_flops == 3 * (layers + attention) + 3 * head + layers + attention + head

    got = flops.dpo_step_flops(TOY, [3, 2], 4, reference="precomputed", remat="full", head_chunks=2)
    assert got.model_flops == 3 * fwd
    assert (
        got.hardware_flops == 3 * (layers + attention) + 4 * head + layers - down_proj + attention
    )

    got = flops.dpo_step_flops(TOY, [3, 2], 4, reference="none", remat="dots")
    assert got.hardware_flops == 3 * (layers + attention) + 3 * head + attention


def test_head_chunk_count():
    assert flops.head_chunk_count(256, None) == 1
    assert flops.head_chunk_count(256, 0) == 1
    assert flops.head_chunk_count(256, 512) == 1  # clamped to T - 1 = 255
    assert flops.head_chunk_count(256, 255) == 1
    assert flops.head_chunk_count(256, 128) == 2
    assert flops.head_chunk_count(256, 64) == 4


def test_invalid_modes_raise():
    with pytest.raises(ValueError, match="reference"):
        flops.dpo_step_flops(TOY, [3], 4, reference="frozen")
    with pytest.raises(ValueError, match="remat"):
        flops.dpo_step_flops(TOY, [3], 4, remat="some")


ONE_LAYER = QwenConfig(
    model_type="qwen3",
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)


@pytest.mark.parametrize(("reference", "remat"), [("none", "none"), ("model", "full")])
def test_train_step_count_matches_xla_within_10_percent(reference, remat):
    pairs, length = 2, 32
    graphdef, params = ts.split_model(build_model(ONE_LAYER, remat=remat))
    tx = optim.make_optimizer(learning_rate=1e-6, num_steps=1)
    step = ts.make_train_step(
        graphdef,
        tx,
        optim.make_schedule(learning_rate=1e-6, num_steps=1),
        ts.DPOSettings(logprob_chunk_size=None, reference_free=reference == "none"),
    )
    batch = {
        f"{side}_{name}": jnp.ones((pairs, length), jnp.int32)
        for side in ("chosen", "rejected")
        for name in batch_logprobs.SEQUENCE_FIELDS
    }
    ref_params = params if reference == "model" else None
    compiled = step.lower(ts.init_train_state(params, tx), batch, ref_params).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = flops.dpo_step_flops(
        ONE_LAYER, [length] * 2 * pairs, length, reference=reference, remat=remat
    ).hardware_flops
    print(f"reference={reference} remat={remat}: XLA / ours = {xla / ours:.4f}")
    assert 0.99 <= xla / ours <= 1.10
