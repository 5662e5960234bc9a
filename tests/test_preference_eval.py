"""evaluate_preferences against dpo_loss on the whole held-out set scored as one batch."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax import batch_logprobs, dpo, logprobs, train_step
from flux_jax.data import (
    BATCH_KEYS,
    collate_pairs,
    default_bucket_lengths,
    load_preference_examples,
)
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.models.qwen.model import build_model
from flux_jax.preference_eval import (
    EVAL_METRICS,
    evaluate_preferences,
    format_eval_table,
    write_eval_json,
)
from flux_jax.tiny_tokenizer import build_tiny_tokenizer

MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 32
NUM_PAIRS = 7  # batch_size 3 leaves a partial last batch of 1


def _random_model(cfg: QwenConfig, seed: int):
    """A model with numpy-random weights (norm scales near 1): no per-shape RNG compiles."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(build_model(cfg, abstract=True))
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        shape = var.get_value().shape
        base = 1.0 if path[-1] == "scale" else 0.0
        var.set_value(jnp.asarray(base + 0.1 * rng.standard_normal(shape), jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    rng = np.random.default_rng(0)
    words = ["sure", "a", "noun", "names", "thing", "lol", "idk", "the", "sky", "is", "blue"]
    path = tmp_path_factory.mktemp("eval") / "heldout.jsonl"
    with path.open("w") as f:
        for i in range(NUM_PAIRS):
            text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
            record = {
                "prompt": f"Question {i}: {text(3 + i)}?\n",
                "chosen": text(int(rng.integers(2, 9))),
                "rejected": text(int(rng.integers(2, 9))),
            }
            f.write(json.dumps(record) + "\n")
    cfg = QwenConfig(
        model_type="qwen3",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    policy, ref = _random_model(cfg, seed=0), _random_model(cfg, seed=1)
    return tokenizer, str(path), policy, ref


def _one_batch_reference(tokenizer, path, policy, ref, **loss_kw):
    examples, _ = load_preference_examples(
        path,
        tokenizer,
        data_format="preferences",
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
    )
    assert len(examples) == NUM_PAIRS
    batch = collate_pairs(examples, tokenizer.pad_token_id, default_bucket_lengths(MAX_LENGTH))
    batch = {k: batch[k] for k in BATCH_KEYS}

    scores = jax.jit(batch_logprobs.paired_token_logprobs, static_argnums=(0, 3))

    def sums(model):
        graphdef, params = train_step.split_model(model)
        tok_NxT, mask_NxT = scores(graphdef, params, batch, None)
        return np.split(np.asarray(tok_NxT.sum(-1)), 2), np.split(
            np.asarray(logprobs.token_counts(mask_NxT)), 2
        )

    (pc, pr), (cc, rc) = sums(policy)
    if ref is None:
        refc = refr = np.zeros_like(pc)
    else:
        (refc, refr), _ = sums(ref)
    _, metrics = dpo.dpo_loss(
        pc, pr, refc, refr, chosen_token_counts=cc, rejected_token_counts=rc, **loss_kw
    )
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.mark.parametrize(
    "loss_kw, with_ref",
    [
        (dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, reference_free=False), True),
        (dict(loss_type="ipo", beta=0.5, label_smoothing=0.0, reference_free=False), True),
        (dict(loss_type="sigmoid", beta=0.2, label_smoothing=0.1, reference_free=True), False),
    ],
)
def test_metrics_equal_dpo_loss_on_the_whole_set(setup, loss_kw, with_ref):
    tokenizer, path, policy, ref = setup
    ref = ref if with_ref else None
    metrics = evaluate_preferences(
        policy,
        ref,
        tokenizer,
        path,
        data_format="preferences",
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
        batch_size=3,
        settings=dpo.DPOSettings(**loss_kw),
    )
    expected = _one_batch_reference(tokenizer, path, policy, ref, **loss_kw)
    assert metrics["num_pairs"] == NUM_PAIRS
    # Summed log-probs (~70 here) round differently in other batch shapes and on other CPUs;
    # rewards and the loss inherit beta x that rounding (~1e-6 relative per sum).
    scale = abs(expected["chosen_logps"]) + abs(expected["rejected_logps"])
    for name in EVAL_METRICS:
        assert metrics[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7 * scale), name
    # Not trivially equal: the models disagree, so rewards and the margin are far from 0.
    assert abs(metrics["reward_margin"]) > 1e-3


def test_partial_batch_copies_do_not_count(setup):
    tokenizer, path, policy, ref = setup
    kw = dict(
        data_format="preferences",
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
        settings=dpo.DPOSettings(loss_type="sigmoid", beta=0.1),
    )
    by_3 = evaluate_preferences(policy, ref, tokenizer, path, batch_size=3, **kw)
    by_7 = evaluate_preferences(policy, ref, tokenizer, path, batch_size=NUM_PAIRS, **kw)
    scale = abs(by_7["chosen_logps"]) + abs(by_7["rejected_logps"])  # as in the test above
    for name in EVAL_METRICS:
        assert by_3[name] == pytest.approx(by_7[name], rel=1e-5, abs=1e-7 * scale), name
    with pytest.raises(ValueError, match="reference model"):
        evaluate_preferences(policy, None, tokenizer, path, batch_size=3, **kw)


def test_table_and_json(tmp_path):
    metrics = {"loss": 0.5, "reward_accuracy": 0.75, "num_pairs": 7, "extra": 1.25}
    table = format_eval_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert lines[2].split() == ["loss", "0.5000"]
    assert lines[3].split() == ["reward_accuracy", "0.7500"]
    assert [line.split()[0] for line in lines[4:]] == ["extra", "num_pairs"]
    assert lines[-1].split() == ["num_pairs", "7"]
    out = write_eval_json(tmp_path / "sub" / "eval.json", metrics, data="heldout.jsonl")
    assert json.load(open(out)) == {"data": "heldout.jsonl", "metrics": metrics}
