"""KV-cache generation against transformers' generate and against the model's own full forward.

Reference models are tiny random transformers Qwen3/Qwen2 models (every weight randomised, see
tests/hf_reference.py) loaded into flux_jax; all comparisons are fp32 on CPU and exact for tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flux_jax
from flux_jax.generation import generate, generate_text, kv_cache, render_prompt
from flux_jax.generation.generate import left_pad, prompt_bucket
from flux_jax.generation.sampling import filter_logits
from flux_jax.sharding import make_mesh
from flux_jax.tiny_tokenizer import build_tiny_tokenizer
from tests.hf_reference import make_hf_model

VARIANTS = ("qwen3_gqa_untied", "qwen2_gqa_untied")
VOCAB = 97
EOS = 2  # make_hf_model's eos_token_id
NEW_TOKENS = 12
# Different lengths in one batch, so rows carry 3 to 15 left-pad slots (prompt bucket 16).
PROMPT_LENGTHS = (5, 13, 1, 9)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{variant: (transformers model, flux_jax model loaded from its saved weights, the path)}."""
    out = {}
    for variant in VARIANTS:
        hf = make_hf_model(variant, vocab_size=VOCAB, seed=0)
        path = tmp_path_factory.mktemp(variant)
        hf.save_pretrained(path)
        out[variant] = (hf, flux_jax.load_pretrained(path), path)
    return out


def _prompts(lengths=PROMPT_LENGTHS, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers_generate(models, variant):
    import torch

    hf, model, _ = models[variant]
    prompts = _prompts()
    ours = generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=EOS)
    min_margin = np.inf
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                output_scores=True,
                return_dict_in_generate=True,
            )
        expected = ref.sequences[0, len(prompt) :].tolist()
        assert ours.rows()[row] == expected, f"row {row} (prompt length {len(prompt)})"
        for scores in ref.scores:  # the top-2 gap: a near-tie would make exact equality luck
            top2 = torch.topk(scores[0], 2).values
            min_margin = min(min_margin, float(top2[0] - top2[1]))
    print(f"{variant}: smallest top-1/top-2 logit gap on the reference path {min_margin:.2e}")
    assert min_margin > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_logits_equal_full_forward(models, variant):
    _, model, _ = models[variant]
    spec = kv_cache.DecoderSpec.of(model)
    params = kv_cache.decoder_params(model)
    prompts = _prompts((3, 7, 5), seed=1)
    steps = 6
    continuations = np.random.default_rng(2).integers(3, VOCAB, (len(prompts), steps), np.int32)
    width = 8
    ids_BxP, num_pad_B = left_pad(prompts, 0, width)
    forward = jax.jit(kv_cache.forward_cached, static_argnums=0)
    cache = kv_cache.init_kv_cache(spec, params, len(prompts), width + steps)
    logits = jax.jit(kv_cache.lm_logits, static_argnums=0)
    hidden, cache = forward(spec, params, ids_BxP, 0, num_pad_B, cache)
    prefill_logits = np.asarray(logits(spec, params, hidden))
    step_logits = []
    for i in range(steps):
        token_Bx1 = continuations[:, i : i + 1]
        hidden, cache = forward(spec, params, token_Bx1, width + i, num_pad_B, cache)
        step_logits.append(np.asarray(logits(spec, params, hidden))[:, 0])

    # The reference: the model's full forward over each unpadded sequence (right-padded into one
    # batch; the padding sits after every real token, so it changes none of their logits).
    full_ids = [p + c.tolist() for p, c in zip(prompts, continuations, strict=True)]
    ids, mask = np.zeros((len(full_ids), 16), np.int32), np.zeros((len(full_ids), 16), np.int32)
    for row, seq in enumerate(full_ids):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    full = np.asarray(jax.jit(lambda i, m: model(i, attention_mask_BxT=m))(ids, mask))
    worst = 0.0
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        cached = np.concatenate(
            [prefill_logits[row, width - n :], np.stack([s[row] for s in step_logits])]
        )
        worst = max(worst, float(np.max(np.abs(cached - full[row, : n + steps]))))
    print(f"{variant}: max |cached - full forward logits| = {worst:.2e}")
    assert worst < 1e-4


def test_sampling_is_seeded_and_top_k_1_is_greedy(models):
    _, model, _ = models["qwen3_gqa_untied"]
    prompts = _prompts()

    def run(**kw):
        return generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=(), **kw).tokens

    greedy = run()
    first = run(temperature=1.0, seed=0)
    np.testing.assert_array_equal(first, run(temperature=1.0, seed=0))
    assert not np.array_equal(first, run(temperature=1.0, seed=1))
    assert not np.array_equal(first, greedy)
    np.testing.assert_array_equal(run(temperature=1.0, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(run(temperature=0.7, top_p=1e-6, seed=3), greedy)


def test_filter_logits_keeps_top_k_and_nucleus():
    # probabilities 0.4, 0.3, 0.2, 0.1 (in a shuffled order)
    logits_1xV = jnp.log(jnp.array([[0.2, 0.4, 0.1, 0.3]]))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits_1xV, **kw)))[0]  # noqa: E731
    np.testing.assert_array_equal(kept(top_k=0, top_p=1.0), [True, True, True, True])
    np.testing.assert_array_equal(kept(top_k=2, top_p=1.0), [False, True, False, True])
    # mass before 0.4 is 0, before 0.3 is 0.4 < 0.5, before 0.2 is 0.7: keep two
    np.testing.assert_array_equal(kept(top_k=0, top_p=0.5), [False, True, False, True])
    np.testing.assert_array_equal(kept(top_k=0, top_p=0.75), [True, True, False, True])
    # top-p acts on the top-k-renormalised distribution: 0.4/0.9, 0.3/0.9, 0.2/0.9
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.7), [False, True, False, True])
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.8), [True, True, False, True])
    np.testing.assert_array_equal(kept(top_k=1, top_p=1.0), [False, True, False, False])


def test_eos_stops_its_row_and_the_others_continue(models):
    _, model, _ = models["qwen3_gqa_untied"]
    prompts = _prompts()
    base = generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=()).tokens
    # Declare as eos a token row 0 first produces at step k >= 2, that some other row never makes.
    choice = next(
        (k, int(base[0, k]))
        for k in range(2, NEW_TOKENS - 2)
        if base[0, k] not in base[0, :k] and any(base[0, k] not in r for r in base[1:])
    )
    k, eos = choice
    out = generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[eos], pad_token_id=0)
    assert out.lengths[0] == k + 1
    assert out.tokens[0, : k + 1].tolist() == base[0, : k + 1].tolist()
    assert (out.tokens[0, k + 1 :] == 0).all()
    for row in range(len(prompts)):
        hits = np.flatnonzero(base[row] == eos)
        length = hits[0] + 1 if hits.size else NEW_TOKENS
        expected = base[row, :length].tolist() + [0] * (NEW_TOKENS - length)
        assert out.lengths[row] == length and out.tokens[row].tolist() == expected
    assert max(out.lengths) > k + 1  # another row went on past row 0's end


def test_prompt_bucket_left_pad_positions_and_mask():
    assert [prompt_bucket(n) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]
    ids, num_pad = left_pad([[5, 6], [7, 8, 9]], pad_id=0, width=4)
    assert ids.tolist() == [[0, 0, 5, 6], [0, 7, 8, 9]] and num_pad.tolist() == [2, 1]
    # RoPE is shift-invariant, so logits alone cannot show wrong positions: check them directly.
    prefill_slots, decode_slot = jnp.arange(4), jnp.array([5])
    assert kv_cache.rope_positions(prefill_slots, num_pad).tolist() == [[0, 0, 0, 1], [0, 0, 1, 2]]
    assert kv_cache.rope_positions(decode_slot, num_pad).tolist() == [[3], [4]]
    mask = np.asarray(kv_cache.cache_attention_mask(decode_slot, num_pad, 6))
    assert mask[:, 0, 0].tolist() == [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    mask = np.asarray(kv_cache.cache_attention_mask(prefill_slots, num_pad, 6))
    assert mask[0, 0].astype(int).tolist() == [  # a pad slot attends to itself only
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
    ]


def test_generate_text_applies_the_chat_template(tmp_path):
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.eos_token_id == EOS
    make_hf_model("qwen3_gqa_untied", vocab_size=len(tokenizer), seed=1).save_pretrained(tmp_path)
    model = flux_jax.load_pretrained(tmp_path)
    prompts = ["What is a noun?", "Hi"]
    texts = generate_text(model, tokenizer, prompts, max_new_tokens=5)
    assert isinstance(texts, list) and len(texts) == 2
    rendered = [render_prompt(tokenizer, p, use_chat_template=True) for p in prompts]
    assert rendered[1] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]
    expected = generate(model, ids, max_new_tokens=5, eos_token_ids=tokenizer.eos_token_id)
    assert texts == tokenizer.batch_decode(expected.rows(), skip_special_tokens=True)

    plain = generate_text(model, tokenizer, prompts[0], max_new_tokens=5, use_chat_template=False)
    assert isinstance(plain, str)
    assert render_prompt(tokenizer, prompts[0], use_chat_template=False) == prompts[0]
    plain_ids = tokenizer(prompts[0])["input_ids"]
    expected = generate(model, [plain_ids], max_new_tokens=5, eos_token_ids=tokenizer.eos_token_id)
    assert plain == tokenizer.decode(expected.rows()[0], skip_special_tokens=True)
    assert plain != texts[0]  # the template changed the prompt, and so the answer


def test_generation_on_a_mesh_matches_one_device(models):
    _, model, path = models["qwen3_gqa_untied"]
    mesh = make_mesh(
        data=2, fsdp=2, tensor=2
    )  # 4 rows split over data x fsdp, kv heads over tensor
    sharded = flux_jax.load_pretrained(path, mesh=mesh)
    prompts = _prompts()
    expected = generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=EOS)
    got = generate(sharded, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=EOS, mesh=mesh)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_array_equal(got.lengths, expected.lengths)
