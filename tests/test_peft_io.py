"""PEFT adapter export/import and merged export against transformers + peft in torch (fp32, CPU).

The reference: `peft.PeftModel.from_pretrained(hf_base, adapter_dir)` computes
W x + scale * B A x with PEFT's own names and layouts; our forward with the same adapters, our
merged export reloaded by transformers, and adapters PEFT itself created must all give the same
logits within 1e-4 (fp32, different matmul order only, as tests/test_qwen_parity.py).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import flux_jax
from flux_jax import peft_config, peft_io
from flux_jax.lora import ActiveAdapters, LoraSettings, init_adapters, merge
from flux_jax.model_setup import split_model
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.models.qwen.model import build_model
from flux_jax.models.qwen.presets import resolve_architecture
from tests.hf_reference import hf_logits, make_hf_model, right_padded_batch

LENGTHS = [9, 5, 3]
TOL = 1e-4
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=["qwen3_gqa_untied", "qwen2_gqa_untied"])
def base(request, tmp_path_factory):
    """(variant, HF model dir, our model) of a tiny random HF model."""
    hf_model = make_hf_model(request.param, layers=2)
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model.save_pretrained(path)
    return request.param, path, flux_jax.load_pretrained(path)


def random_adapters(base_params, settings: LoraSettings, seed: int = 0) -> dict:
    """PEFT-initialised adapters with B replaced by random values: a non-zero update."""
    adapters = init_adapters(base_params, settings, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for projections in adapters["layers"].values():
        for pair in projections.values():
            pair["lora_b"] = jnp.asarray(
                0.3 * rng.standard_normal(pair["lora_b"].shape), jnp.float32
            )
    return adapters


def our_logits(model, adapters, settings, ids, mask) -> np.ndarray:
    lora = ActiveAdapters(adapters, settings) if adapters is not None else None
    return np.asarray(model(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask), lora=lora))


def masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) * mask[..., None]))


def hf_base(path: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


# ----------------------------------------------------------------------------------------------
# Tensor level: names, shapes, the layout maths


def test_peft_names_and_layouts_on_the_tensor_level():
    cfg = QwenConfig(
        model_type="qwen3",
        vocab_size=11,
        hidden_size=10,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=2,
    )
    r, rng = 2, np.random.default_rng(0)
    q_a = rng.standard_normal((2, 10, r)).astype(np.float32)
    q_b = rng.standard_normal((2, r, 4, 2)).astype(np.float32)
    o_a = rng.standard_normal((2, 4, 2, r)).astype(np.float32)
    o_b = rng.standard_normal((2, r, 10)).astype(np.float32)
    adapters = {
        "layers": {
            "self_attn": {
                "q_proj": {"lora_a": q_a, "lora_b": q_b},
                "o_proj": {"lora_a": o_a, "lora_b": o_b},
            }
        }
    }
    tensors = peft_io.peft_tensors(adapters, cfg)
    prefix = "base_model.model.model.layers.1.self_attn."
    assert tensors[prefix + "q_proj.lora_A.weight"].shape == (r, 10)
    assert tensors[prefix + "q_proj.lora_B.weight"].shape == (8, r)
    assert tensors[prefix + "o_proj.lora_A.weight"].shape == (r, 8)
    assert tensors[prefix + "o_proj.lora_B.weight"].shape == (10, r)
    assert len(tensors) == 8
    # PEFT's delta B @ A [out, in] is our a @ b [*in, *out] transposed, heads flattened head-major
    # (HF q_proj row n * H + h; HF o_proj column n * H + h), as params.py lays out the kernels.
    hf_q = tensors[prefix + "q_proj.lora_B.weight"] @ tensors[prefix + "q_proj.lora_A.weight"]
    ours_q = np.einsum("ir,rnh->inh", q_a[1], q_b[1])
    np.testing.assert_allclose(hf_q, ours_q.reshape(10, 8).T, rtol=1e-5, atol=1e-6)
    hf_o = tensors[prefix + "o_proj.lora_B.weight"] @ tensors[prefix + "o_proj.lora_A.weight"]
    ours_o = np.einsum("nhr,rd->nhd", o_a[1], o_b[1])
    np.testing.assert_allclose(hf_o, ours_o.reshape(8, 10).T, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Against peft + transformers


def test_adapter_and_merged_exports_give_peft_and_transformers_logits(base, tmp_path):
    """(a) our adapter dir in PeftModel.from_pretrained and (b) our merged export in
    transformers both give the logits of our forward with the adapters."""
    import peft
    import transformers
    from flax import nnx

    variant, path, model = base
    graphdef, params = split_model(model)
    settings = LoraSettings(rank=4, alpha=8.0, target_modules=ALL)
    adapters = random_adapters(params, settings)
    ids, mask = right_padded_batch(model.config.vocab_size, LENGTHS)
    ours = our_logits(model, adapters, settings, ids, mask)

    out = peft_io.save_peft_adapter(tmp_path / "adapter", adapters, settings, model.config, path)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = peft.PeftModel.from_pretrained(hf_base(path), out).eval()
    peft_ref = hf_logits(peft_model, ids, mask)
    diff = masked_max_diff(ours, peft_ref, mask)
    print(f"{variant}: max |ours with adapters - peft| = {diff:.2e}")
    assert diff <= TOL
    # The adapters matter: without them the logits are far from peft's.
    assert masked_max_diff(our_logits(model, None, settings, ids, mask), peft_ref, mask) > 100 * TOL

    merged = nnx.merge(graphdef, merge(params, adapters, settings))
    out = flux_jax.save_pretrained(merged, tmp_path / "merged", dtype="float32")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    diff = masked_max_diff(hf_logits(reloaded, ids, mask), ours, mask)
    print(f"{variant}: max |merged export in transformers - ours with adapters| = {diff:.2e}")
    assert diff <= TOL


def test_adapter_created_by_peft_loads_with_equal_logits(base, tmp_path):
    """(c) an adapter PEFT created (rsLoRA on the Qwen2 variant, plain on Qwen3) loads into
    ours with peft's logits."""
    import peft
    import torch

    variant, path, model = base
    rslora = variant.startswith("qwen2")
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=targets, use_rslora=rslora, lora_dropout=0.1
    )
    peft_model = peft.get_peft_model(hf_base(path), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()

    expected = LoraSettings(rank=4, alpha=6.0, target_modules=tuple(targets), rslora=rslora)
    adapters, settings = peft_io.load_peft_adapter(tmp_path / "peft", model.config, expected)
    assert settings.dropout == pytest.approx(0.1) and settings.rslora == rslora
    assert settings.scale == pytest.approx(6 / (2 if rslora else 4))
    ids, mask = right_padded_batch(model.config.vocab_size, LENGTHS, seed=4)
    diff = masked_max_diff(
        our_logits(model, adapters, settings, ids, mask), hf_logits(peft_model, ids, mask), mask
    )
    print(f"{variant} rslora={rslora}: max |ours with peft's adapter - peft| = {diff:.2e}")
    assert diff <= TOL


# ----------------------------------------------------------------------------------------------
# Round trip and errors (no torch)


@pytest.fixture(scope="module")
def tiny_base():
    cfg = QwenConfig(
        model_type="qwen3",
        vocab_size=31,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
    )
    # Abstract shapes are all the adapter maths needs of the base.
    _, params = split_model(build_model(cfg, abstract=True))
    return cfg, params


def test_init_from_round_trip_is_exact(tiny_base, tmp_path):
    cfg, params = tiny_base
    settings = LoraSettings(rank=3, alpha=5.0, dropout=0.05, target_modules=ALL, rslora=True)
    adapters = random_adapters(params, settings, seed=5)
    peft_io.save_peft_adapter(tmp_path, adapters, settings, cfg, "some/base")
    loaded, loaded_settings = peft_io.load_peft_adapter(tmp_path, cfg, settings)
    assert loaded_settings == settings
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), adapters, loaded)
    placed = peft_io.place_adapters(loaded, params, settings)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), adapters, placed
    )
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["base_model_name_or_path"] == "some/base" and config["use_rslora"] is True


def test_bf16_adapter_export(tiny_base, tmp_path):
    cfg, params = tiny_base
    settings = LoraSettings(rank=2, alpha=2.0, target_modules=("q_proj",))
    adapters = random_adapters(params, settings)
    peft_io.save_peft_adapter(tmp_path, adapters, settings, cfg, dtype="bfloat16")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {np.dtype(jnp.bfloat16)}
    loaded, _ = peft_io.load_peft_adapter(tmp_path, cfg)
    np.testing.assert_allclose(
        loaded["layers"]["self_attn"]["q_proj"]["lora_b"],
        adapters["layers"]["self_attn"]["q_proj"]["lora_b"],
        rtol=1e-2,
    )


@pytest.fixture
def saved_adapter(tiny_base, tmp_path):
    cfg, params = tiny_base
    settings = LoraSettings(rank=2, alpha=4.0, target_modules=("q_proj", "down_proj"))
    peft_io.save_peft_adapter(tmp_path, random_adapters(params, settings), settings, cfg)
    return cfg, settings, tmp_path


def _edit_config(path, **changes):
    config_path = path / "adapter_config.json"
    config = json.load(open(config_path))
    config.update(changes)
    json.dump(config, open(config_path, "w"))


@pytest.mark.parametrize(
    "field, value, config_key",
    [("r", 8, "rank"), ("lora_alpha", 16, "alpha"), ("use_rslora", True, "rslora")],
)
def test_mismatched_settings_name_the_file_and_field(saved_adapter, field, value, config_key):
    cfg, settings, path = saved_adapter
    _edit_config(path, **{field: value})
    with pytest.raises(peft_io.PeftAdapterError) as error:
        peft_io.load_peft_adapter(path, cfg, settings)
    message = str(error.value)
    assert "adapter_config.json" in message and field in message
    assert f"model.lora.{config_key}" in message


def test_mismatched_targets_and_unsupported_features(saved_adapter):
    cfg, settings, path = saved_adapter
    wider = LoraSettings(rank=2, alpha=4.0, target_modules=ALL)
    with pytest.raises(peft_io.PeftAdapterError, match="target_modules"):
        peft_io.load_peft_adapter(path, cfg, wider)
    _edit_config(path, use_dora=True)
    with pytest.raises(peft_io.PeftAdapterError, match="use_dora"):
        peft_io.load_peft_adapter(path, cfg)
    _edit_config(path, use_dora=False, target_modules=["q_proj", "lm_head"])
    with pytest.raises(peft_io.PeftAdapterError, match="lm_head"):
        peft_io.load_peft_adapter(path, cfg)


def test_peft_target_module_spellings():
    where = "adapter_config.json"
    assert peft_config.target_names("all-linear", where) == ALL
    assert peft_config.target_names(r".*\.(q_proj|v_proj)", where) == ("q_proj", "v_proj")
    assert peft_config.target_names(["self_attn.k_proj", "up_proj"], where) == ("k_proj", "up_proj")


def test_unknown_or_missing_tensors_are_named(saved_adapter):
    cfg, settings, path = saved_adapter
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    extra = "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A.weight"
    save_file({**tensors, extra: np.zeros((2, 2), np.float32)}, weights)
    with pytest.raises(peft_io.PeftAdapterError, match="lora_embedding_A"):
        peft_io.load_peft_adapter(path, cfg, settings)
    gone = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, weights)
    with pytest.raises(peft_io.PeftAdapterError, match="missing.*layers.1.mlp.down_proj.lora_B"):
        peft_io.load_peft_adapter(path, cfg, settings)
    other_cfg = QwenConfig(**{**cfg.__dict__, "hidden_size": 20})
    save_file(tensors, weights)
    with pytest.raises(peft_io.PeftAdapterError, match="shape mismatch"):
        peft_io.load_peft_adapter(path, other_cfg, settings)


def test_missing_directory_or_files(tmp_path, tiny_base):
    cfg, _ = tiny_base
    with pytest.raises(peft_io.PeftAdapterError, match="not a directory"):
        peft_io.load_peft_adapter(tmp_path / "nope", cfg)
    with pytest.raises(peft_io.PeftAdapterError, match="adapter_config.json: missing"):
        peft_io.load_peft_adapter(tmp_path, cfg)


# ----------------------------------------------------------------------------------------------
# flux-jax export of LoRA checkpoints


def test_adapter_only_export_of_a_full_fine_tune_is_a_clear_error(tmp_path, capsys):
    from flux_jax.cli import main

    metadata = tmp_path / "best" / "metadata"
    metadata.mkdir(parents=True)
    json.dump(
        {"step": 2, "flux_config": {}, "hf_config": {}}, open(metadata / "metadata.json", "w")
    )
    args = ["export", "--checkpoint", str(tmp_path / "best"), "--out", str(tmp_path / "out")]
    assert main([*args, "--adapter-only"]) == 1
    err = capsys.readouterr().err
    assert "--adapter-only needs a LoRA checkpoint" in err and "without --adapter-only" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_qlora_run_exports_merged_and_peft_adapter_that_agree(tmp_path, monkeypatch):
    """A QLoRA (nf4) demo run, then `flux-jax export` both ways: transformers on the merged
    export, PEFT's adapter on the dequantised base, and our forward all give the same logits."""
    import peft
    import torch
    import transformers

    from flux_jax.cli import main
    from flux_jax.policy import Policy
    from flux_jax.quantization import dequantize_base

    monkeypatch.chdir(tmp_path)
    lora_flags = [
        "--config.model.lora.rank=4",
        "--config.model.lora.alpha=8",
        "--config.model.lora.target_modules=[q_proj, v_proj, down_proj]",
        "--config.model.lora.base_quantization=nf4",
        "--config.model.lora.quantization_block=16",
        "--config.learning_rate=1e-2",
    ]
    run = ["--config.num_steps=2", "--config.checkpoint.save_steps=2"]
    assert main(["demo", *run, "--config.logging.progress_bar=false", *lora_flags]) == 0
    best = str(tmp_path / "outputs" / "tiny_demo" / "best")
    assert main(["export", "--checkpoint", best, "--out", "merged"]) == 0
    assert main(["export", "--checkpoint", best, "--out", "adapter", "--adapter-only"]) == 0
    assert sorted(os.listdir("adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    adapter_config = json.load(open("adapter/adapter_config.json"))
    assert adapter_config["target_modules"] == ["down_proj", "q_proj", "v_proj"]

    policy = Policy.from_checkpoint(best, single_device=True)
    assert any(x.dtype == jnp.uint4 for x in jax.tree.leaves(policy.params))  # nf4 codes
    base_dir = policy.with_params(dequantize_base(policy.params)).export("dequantized_base")
    ids = np.asarray([[5, 17, 99, 3, 250, 8, 41]], np.int32)
    mask = np.ones_like(ids)
    ours = our_logits(policy.model, None, None, ids, mask)  # the merged policy
    adapters_ours = our_logits(
        nnx_model(policy), policy.adapters, policy.lora, ids, mask
    )  # the quantised base with the adapters on
    merged = transformers.AutoModelForCausalLM.from_pretrained("merged", dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_logits = hf_logits(base.eval(), ids, mask)
    with_adapter = peft.PeftModel.from_pretrained(base, "adapter").eval()
    scale = max(1.0, float(np.abs(ours).max()))
    for name, logits in (
        ("merged export in transformers", hf_logits(merged.eval(), ids, mask)),
        ("PEFT adapter on the dequantised base", hf_logits(with_adapter, ids, mask)),
        ("ours, adapters on the quantised base", adapters_ours),
    ):
        diff = masked_max_diff(logits, ours, mask)
        print(f"{name}: max |logits - ours merged| = {diff:.2e}")
        assert diff <= TOL * scale
    # Training moved the adapters: the merged model is not the base.
    assert masked_max_diff(base_logits, ours, mask) > 1e-3


def nnx_model(policy):
    """The policy's frozen (quantised) base as a model, adapters not merged."""
    from flax import nnx

    return nnx.merge(policy.graphdef, policy.params)


def test_init_from_starts_the_trainer_from_a_peft_adapter(tmp_path):
    """model.lora.init_from: the trainer's adapters are the PEFT directory's, exactly, placed on
    the run's mesh; a directory of another rank is refused naming the file and the field."""
    from flux_jax.config import FluxConfig
    from flux_jax.trainer import FluxTrainer

    config = FluxConfig.default()
    config.output_dir = str(tmp_path / "run")
    config.model.lora.rank = 2
    config.model.lora.alpha = 4.0
    config.model.lora.target_modules = ("q_proj", "up_proj")
    settings = LoraSettings.from_config(config.model.lora)
    model_config = resolve_architecture(config.model_path)
    _, abstract = split_model(build_model(model_config, abstract=True))
    adapters = random_adapters(abstract, settings, seed=7)
    peft_io.save_peft_adapter(tmp_path / "sft", adapters, settings, model_config)
    config.model.lora.init_from = str(tmp_path / "sft")

    trainer = FluxTrainer(config)
    placed = trainer.params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), placed, adapters)
    q_a = placed["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert q_a.sharding.is_equivalent_to(
        lora_adapter_sharding(trainer.policy.params, settings), q_a.ndim
    )

    config.model.lora.rank = 4
    with pytest.raises(peft_io.PeftAdapterError, match=r"adapter_config.json.*r = 2.*lora\.rank"):
        FluxTrainer(config)


def lora_adapter_sharding(base, settings):
    from flux_jax.lora import adapter_shapes

    return adapter_shapes(base, settings)["layers"]["self_attn"]["q_proj"]["lora_a"].sharding
