"""flux_jax's Qwen model against transformers' PyTorch Qwen2/Qwen3 (the reference), fp32 on CPU.

Tolerances: 1e-4 max abs on logits for import (fp32, different matmul order only), 1e-5 for the
export round trip (both sides are transformers), bf16 compute within 0.1 max abs / 2e-2 relative
to the logit scale.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import flux_jax
from flux_jax.hf_io import CheckpointError
from flux_jax.models.qwen.config import QwenConfig, UnsupportedConfigError
from tests.hf_reference import VARIANTS, hf_logits, make_hf_model, right_padded_batch

LENGTHS = [11, 7, 3]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_dir(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, str(path)


def _masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) * mask[..., None]))


def test_logits_match_transformers(hf_dir):
    variant, hf_model, path = hf_dir
    model = flux_jax.load_pretrained(path)
    ids, mask = right_padded_batch(hf_model.config.vocab_size, LENGTHS)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)))
    ref = hf_logits(hf_model, ids, mask)
    diff = _masked_max_diff(ours, ref, mask)
    print(f"{variant}: max |logits - transformers| = {diff:.2e}")
    assert diff < 1e-4
    # The comparison can fail: a perturbed weight moves the logits far beyond the tolerance.
    model.layers.mlp.up_proj.kernel.set_value(model.layers.mlp.up_proj.kernel.get_value() * 1.01)
    perturbed = np.asarray(model(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)))
    assert _masked_max_diff(perturbed, ref, mask) > 1e-3


def test_export_round_trip(hf_dir, tmp_path):
    import transformers

    variant, hf_model, path = hf_dir
    model = flux_jax.load_pretrained(path)
    out = flux_jax.save_pretrained(model, tmp_path / "export", max_shard_size=6000)
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files  # small shard limit forces several shards
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype="float32"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert ("lm_head.weight" in index["weight_map"]) == (not hf_model.config.tie_word_embeddings)
    ids, mask = right_padded_batch(hf_model.config.vocab_size, LENGTHS, seed=1)
    diff = _masked_max_diff(hf_logits(reloaded, ids, mask), hf_logits(hf_model, ids, mask), mask)
    print(f"{variant}: export round trip max |logits diff| = {diff:.2e}")
    assert diff < 1e-5


def test_bf16_compute_close_to_fp32(hf_dir):
    variant, hf_model, path = hf_dir
    model = flux_jax.load_pretrained(path, dtype="float32", compute_dtype="bfloat16")
    assert model.layers.mlp.up_proj.kernel.get_value().dtype == jnp.float32
    ids, mask = right_padded_batch(hf_model.config.vocab_size, LENGTHS)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)))
    ref = hf_logits(hf_model, ids, mask)
    diff = _masked_max_diff(ours, ref, mask)
    scale = float(np.max(np.abs(ref)))
    print(f"{variant}: bf16 compute max diff {diff:.3e} (logit scale {scale:.2f})")
    assert diff < max(0.1, 2e-2 * scale)


def test_remat_and_hidden_states_agree(hf_dir):
    _, hf_model, path = hf_dir
    ids, mask = right_padded_batch(hf_model.config.vocab_size, LENGTHS)
    plain = flux_jax.load_pretrained(path)
    remat = flux_jax.load_pretrained(path, remat="full")
    a = np.asarray(plain(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)))
    b = np.asarray(remat(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)))
    np.testing.assert_allclose(a, b, atol=1e-6)
    hidden = plain(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask), return_hidden=True)
    logits = np.asarray(hidden @ plain.lm_head_weight())
    # hidden @ head outside the model vs inside it: rounding scales with the logits.
    np.testing.assert_allclose(logits, a, atol=1e-5 * max(1.0, float(np.abs(a).max())))


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = make_hf_model("qwen3_gqa_untied", seed=3)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = flux_jax.load_pretrained(tmp_path)
    ids, mask = right_padded_batch(hf_model.config.vocab_size, LENGTHS)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)))
    assert _masked_max_diff(ours, hf_logits(hf_model, ids, mask), mask) < 1e-4


def test_load_onto_mesh_matches_single_device(tmp_path):
    from flux_jax.sharding import make_mesh

    hf_model = make_hf_model("qwen2_gqa_untied", seed=4)
    hf_model.save_pretrained(tmp_path)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = flux_jax.load_pretrained(tmp_path, mesh=mesh)
    q = model.layers.self_attn.q_proj.kernel.get_value()
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (3, 12, 3, 8)
    ids, mask = right_padded_batch(hf_model.config.vocab_size, LENGTHS)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)))
    assert _masked_max_diff(ours, hf_logits(hf_model, ids, mask), mask) < 1e-4


def test_broken_checkpoint_lists_every_problem(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_model = make_hf_model("qwen3_gqa_untied", seed=5)
    hf_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.o_proj.weight"] = np.zeros((3, 3), np.float32)
    tensors["model.layers.9.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        flux_jax.load_pretrained(tmp_path)
    message = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in message
    assert "model.layers.9.extra.weight" in message
    assert "model.layers.0.self_attn.o_proj.weight: checkpoint (3, 3)" in message


def test_empty_dir_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        flux_jax.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_moe"}))
    with pytest.raises(UnsupportedConfigError, match="qwen2_moe"):
        flux_jax.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(UnsupportedConfigError, match="missing required keys vocab_size"):
        flux_jax.load_pretrained(tmp_path)


def _hf_dict(**overrides):
    base = dict(
        model_type="qwen3",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return {**base, **overrides}


def test_config_reads_both_hf_styles_and_refuses_unsupported():
    v4 = QwenConfig.from_hf_config(_hf_dict(rope_theta=5e5, torch_dtype="bfloat16"))
    v5 = QwenConfig.from_hf_config(
        _hf_dict(
            rope_parameters={"rope_theta": 5e5, "rope_type": "default"},
            dtype="bfloat16",
            layer_types=["full_attention"] * 2,
        )
    )
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.torch_dtype == "bfloat16"
    assert v4.head_dim == 4
    assert QwenConfig.from_hf_config(v4.to_hf_config()) == v4
    with pytest.raises(UnsupportedConfigError, match="use_sliding_window"):
        QwenConfig.from_hf_config(_hf_dict(use_sliding_window=True, sliding_window=4096))
    with pytest.raises(UnsupportedConfigError, match="'yarn'"):
        QwenConfig.from_hf_config(_hf_dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(UnsupportedConfigError, match="num_experts"):
        QwenConfig.from_hf_config(_hf_dict(num_experts=8))
