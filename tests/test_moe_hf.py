"""Qwen3-MoE against transformers' `Qwen3MoeForCausalLM` (the reference), fp32 on CPU.

Tiny random configs cover top-k 1 and 2, norm_topk_prob both ways, dense layers mixed in through
mlp_only_layers and decoder_sparse_step, tied and untied heads. Checked: logits (both expert
paths) and router logits against transformers within 1e-4 max abs, export -> transformers reload
with equal logits, and the load-balancing loss against `load_balancing_loss_func` (with and
without an attention mask) on the same router logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flux_jax
from flux_jax.models.qwen import moe
from tests.hf_reference import hf_logits, randomise_weights, right_padded_batch

LENGTHS = [10, 6, 3]
VOCAB = 61

MOE_VARIANTS = {
    # name: (top_k, norm_topk_prob, mlp_only_layers, decoder_sparse_step, tied)
    "top2_norm_mixed": (2, True, [1], 1, False),
    "top1_all_sparse_tied": (1, False, [], 1, True),
    "top2_step2": (2, False, [], 2, False),
}


def make_hf_moe_model(variant: str, seed: int = 0):
    """A random transformers Qwen3-MoE causal LM in fp32 eval mode, every parameter randomised."""
    import torch
    import transformers

    top_k, norm, mlp_only, step, tied = MOE_VARIANTS[variant]
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        moe_intermediate_size=12,
        num_experts=5,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
        mlp_only_layers=mlp_only,
        decoder_sparse_step=step,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rope_theta=10_000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        router_aux_loss_coef=0.02,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return randomise_weights(model).eval()


# The variants every default run checks each thing on; the rest run with -m slow. Together the
# default ones cover top-k 1 and 2, norm_topk_prob both ways, mlp_only_layers and
# decoder_sparse_step, tied and untied heads, and both expert paths.
DENSE_PATH_VARIANT = "top2_norm_mixed"  # the dense path against transformers (grouped: all)
EXPORT_VARIANTS = ("top2_norm_mixed", "top1_all_sparse_tied")


def _variants(default: tuple[str, ...]) -> list:
    return [
        v if v in default else pytest.param(v, marks=pytest.mark.slow) for v in sorted(MOE_VARIANTS)
    ]


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    """variant -> (transformers model, its saved HF directory): each built once per module and
    shared by every test that asks for it."""
    built: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in built:
            model = make_hf_moe_model(variant)
            path = tmp_path_factory.mktemp(variant)
            model.save_pretrained(path)
            built[variant] = (model, str(path))
        return built[variant]

    return get


def _hf_forward(model, ids, mask):
    """transformers' logits, router logits [L_sparse, B*T, E] and aux_loss (with the mask)."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            output_router_logits=True,
        )
    router = np.stack([x.float().numpy() for x in out.router_logits])
    return out.logits.float().numpy(), router, float(out.aux_loss)


def _forward(model, ids, mask):
    graphdef, params = nnx.split(model)
    run = jax.jit(
        lambda p: nnx.merge(graphdef, p)(
            jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask), return_router_logits=True
        )
    )
    logits, router = run(params)
    return np.asarray(logits), np.asarray(router)


def _masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) * mask[..., None]))


@pytest.mark.parametrize("variant", sorted(MOE_VARIANTS))
def test_logits_router_logits_and_aux_loss_match_transformers(hf_moe, variant):
    """Logits and router logits within 1e-4 max abs; HF's aux_loss output (with the attention
    mask) equals our loss on our own router logits, so the objective's aux term is
    transformers'."""
    hf_model, path = hf_moe(variant)
    ids, mask = right_padded_batch(VOCAB, LENGTHS)
    want, want_router, want_aux = _hf_forward(hf_model, ids, mask)
    impls = ("grouped", "dense") if variant == DENSE_PATH_VARIANT else ("grouped",)
    for impl in impls:
        model = flux_jax.load_pretrained(path, moe_impl=impl)
        logits, router = _forward(model, ids, mask)
        assert _masked_max_diff(logits, want, mask) <= 1e-4, impl
        assert (
            _masked_max_diff(router.reshape(want_router.shape), want_router, mask.reshape(-1))
            <= 1e-4
        ), impl
        aux = moe.load_balancing_loss(jnp.asarray(router), model.moe_spec.top_k, jnp.asarray(mask))
        assert abs(float(aux) - want_aux) <= 1e-5 * abs(want_aux), impl
    assert model.config.router_aux_loss_coef == 0.02


@pytest.mark.parametrize("variant", _variants(EXPORT_VARIANTS))
def test_export_reloads_in_transformers_with_equal_logits(hf_moe, variant, tmp_path):
    import transformers

    hf_model, path = hf_moe(variant)
    model = flux_jax.load_pretrained(path)
    out = flux_jax.save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    ids, mask = right_padded_batch(VOCAB, LENGTHS, seed=1)
    got, want = hf_logits(reloaded, ids, mask), hf_logits(hf_model, ids, mask)
    assert _masked_max_diff(got, want, mask) <= 1e-5


def test_load_balancing_loss_matches_transformers():
    import torch
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    rng = np.random.default_rng(0)
    layers, batch, seq, experts = 3, 2, 7, 6
    logits = rng.standard_normal((layers, batch, seq, experts)).astype(np.float32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
    per_layer = tuple(torch.from_numpy(layer.reshape(batch * seq, experts)) for layer in logits)
    for top_k in (1, 2):
        want = float(load_balancing_loss_func(per_layer, experts, top_k))
        got = float(moe.load_balancing_loss(jnp.asarray(logits), top_k))
        assert abs(got - want) <= 1e-6 * abs(want)
        want = float(load_balancing_loss_func(per_layer, experts, top_k, torch.from_numpy(mask)))
        got = float(moe.load_balancing_loss(jnp.asarray(logits), top_k, jnp.asarray(mask)))
        assert abs(got - want) <= 1e-6 * abs(want)


@pytest.mark.slow  # ~30 s on a quiet 2-core CPU (95 s with 6 jobs sharing it)
def test_tiny_moe_dpo_run_end_to_end(tmp_path):
    """FluxTrainer on the tiny MoE preset: fit (aux loss in the objective and the metrics),
    evaluate, best checkpoint -> a fresh trainer, generate with the KV cache, export -> equal
    logits in transformers' Qwen3MoeForCausalLM."""
    import torch
    import transformers

    from flux_jax import FluxTrainer
    from flux_jax.demo import demo_config
    from flux_jax.trainer import DEMO_EVAL

    config = demo_config()
    config.model_path = "builtin:tiny-qwen3-moe"
    config.output_dir = str(tmp_path / "run")
    config.num_steps = 3
    config.checkpoint.save_steps = 3
    config.eval.every_steps = 3
    config.eval.max_batches = 1
    config.logging.progress_bar = False
    config.data.max_length = 48
    config.data.max_prompt_length = 24
    config.algorithm.router_aux_loss_coef = 0.5  # large, so the term shows in the loss
    config.validate()
    trainer = FluxTrainer(config)
    seen = []
    trainer.add_step_callback(lambda result: seen.append(dict(result.metrics)))
    result = trainer.fit()
    for metrics in seen:
        aux = metrics["router_aux_loss"]
        assert 1.0 <= aux < 8.0  # k = 2 (balanced) up to k * E / k (one expert takes all)
        assert metrics["loss"] == pytest.approx(metrics["dpo_loss"] + 0.5 * aux, rel=1e-5)

    fresh = FluxTrainer(config)
    fresh.load_checkpoint(result.best_checkpoint)
    assert np.isfinite(fresh.evaluate(DEMO_EVAL)["loss"])
    text = fresh.generate("Explain machine learning.", max_new_tokens=5)
    assert isinstance(text, str)

    out = fresh.export(str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    ids = np.asarray([[5, 17, 300, 42, 9, 77]], np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    ours = np.asarray(fresh.model(ids))
    assert np.max(np.abs(ours - ref)) < 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_sharded_load_equals_one_device(hf_moe):
    """Expert kernels read slice by slice onto an fsdp x tensor mesh of the 8 CPU devices."""
    from flux_jax.sharding import make_mesh

    _, path = hf_moe(DENSE_PATH_VARIANT)
    ids, mask = right_padded_batch(VOCAB, [8, 8, 5, 2])
    want, _ = _forward(flux_jax.load_pretrained(path), ids, mask)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    got, _ = _forward(flux_jax.load_pretrained(path, mesh=mesh), ids, mask)
    assert np.max(np.abs(got - want) * mask[..., None]) <= 1e-5 * max(1.0, np.abs(want).max())
