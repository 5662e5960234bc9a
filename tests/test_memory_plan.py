"""The memory plan: presets with the published sizes, exact parameter bytes, a sane estimate."""

from __future__ import annotations

import json

import jax
import pytest
from flax import nnx

from flux_jax import sharding as sh
from flux_jax.config import FluxConfig
from flux_jax.devices import KNOWN_DEVICES, device_memory
from flux_jax.memory_plan import memory_plan, plan_from_config
from flux_jax.memory_report import fits, format_memory_plan
from flux_jax.models.qwen.model import build_model
from flux_jax.models.qwen.presets import PRESETS, resolve_architecture
from flux_jax.sharding_check import check_sharding

GIB = 1 << 30


def _plan(name="qwen3-8b", mesh=(1, 8, 1), **overrides):
    settings = dict(
        batch_size=64,
        grad_accum_steps=4,
        max_length=2048,
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat="full",
        logprob_chunk_size=512,
    )
    settings.update(overrides)
    return memory_plan(PRESETS[name], mesh_shape=mesh, **settings)


def test_presets_have_the_published_sizes():
    # Hub model cards: total and non-embedding parameters.
    expected = {
        "qwen3-0.6b": (0.596e9, 0.44e9),
        "qwen3-1.7b": (1.72e9, 1.4e9),
        "qwen3-4b": (4.02e9, 3.6e9),
        "qwen3-8b": (8.19e9, 6.95e9),
        "qwen2.5-7b": (7.62e9, 6.53e9),
    }
    for name, (total, non_embedding) in expected.items():
        cfg = PRESETS[name]
        embedding = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        assert cfg.num_params() == pytest.approx(total, rel=0.01), name
        assert cfg.num_params() - embedding == pytest.approx(non_embedding, rel=0.02), name
    assert PRESETS["qwen2.5-7b"].num_params() == 7_615_616_512
    assert PRESETS["qwen2.5-7b"].qkv_bias and not PRESETS["qwen3-8b"].qkv_bias
    assert PRESETS["tiny-qwen3"].vocab_size == 512  # the tiny tokenizer's size
    for name, cfg in PRESETS.items():
        assert cfg.num_attention_heads % cfg.num_key_value_heads == 0, name


def test_resolve_architecture(tmp_path):
    assert resolve_architecture("builtin:tiny-qwen3") is PRESETS["tiny-qwen3"]
    assert resolve_architecture("Qwen/Qwen3-8B") is PRESETS["qwen3-8b"]
    assert resolve_architecture("Qwen/Qwen2.5-7B-Instruct") is PRESETS["qwen2.5-7b"]
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen3-0.6b"].to_hf_config()))
    assert resolve_architecture(str(tmp_path)) == PRESETS["qwen3-0.6b"]
    with pytest.raises(ValueError, match="builtin:qwen3-40m"):
        resolve_architecture("someone/some-model")


@pytest.mark.parametrize("name", ["bigvocab", "qwen3-0.6b", "qwen2.5-7b"])
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_parameter_bytes_equal_the_placement(name, mesh_shape):
    """Plan vs the shardings the loader and trainer use, at full size (nothing is allocated)."""
    mesh = sh.make_mesh(*mesh_shape)
    state = nnx.state(build_model(PRESETS[name], abstract=True), nnx.Param)
    abstract = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(state),
        nnx.to_pure_dict(sh.state_shardings(state, mesh)),
    )
    report = check_sharding(abstract, mesh)
    plan = _plan(name, mesh_shape, batch_size=8, grad_accum_steps=1)
    assert report.device_bytes("params") == plan["per_device"]["params"]


def test_plan_arithmetic():
    plan = _plan()
    per = plan["per_device"]
    local = per["params"] / 4  # fp32 master weights
    assert per["params"] == pytest.approx(PRESETS["qwen3-8b"].num_params() * 4 / 8, rel=1e-3)
    assert per["gradients"] == local * (4 + 4)  # fp32 grads + the fp32 accumulator (accum 4)
    assert per["optimizer"] == 2 * 4 * local
    assert per["reference"] == 2 * local  # bf16 compute-dtype copy
    assert per["activations"] == sum(plan["activation_terms"].values())
    assert per["total"] == sum(v for k, v in per.items() if k != "total")
    assert plan["batch"]["rows_per_device"] == 2 * 16 / 8

    assert _plan(grad_accum_steps=1, batch_size=16)["per_device"]["gradients"] == 4 * local
    assert _plan(reference="precomputed")["per_device"]["reference"] == 0
    assert _plan(reference="none")["per_device"]["reference"] == 0
    by_remat = {r: _plan(remat=r)["per_device"]["activations"] for r in ("none", "dots", "full")}
    assert by_remat["none"] > by_remat["dots"] > by_remat["full"]
    assert _plan(grad_accum_steps=8)["per_device"]["activations"] < by_remat["full"]
    # The LM-head buffers follow the chunk: 2 x rows x chunk x V x 4 bytes.
    head = _plan(logprob_chunk_size=256)["activation_terms"]["lm_head"]
    assert by_remat and _plan()["activation_terms"]["lm_head"] - head == 2 * 4 * 256 * 151936 * 4
    # Tensor parallelism splits the weights the same total number of ways.
    assert _plan(mesh=(1, 4, 2))["per_device"]["params"] == pytest.approx(per["params"], rel=1e-3)

    # An 8B model fits 8 x H100 sharded, not replicated; 16 GiB v5e chips need 64 of them.
    assert fits(plan, device_memory("h100")[1])
    assert not fits(_plan(mesh=(8, 1, 1)), device_memory("h100")[1])
    assert not fits(_plan(mesh=(1, 32, 1), grad_accum_steps=1), device_memory("v5e")[1])
    assert fits(_plan(mesh=(1, 64, 1), grad_accum_steps=1), device_memory("v5e")[1])

    with pytest.raises(ValueError, match="reference"):
        _plan(reference="frozen")
    assert _plan(batch_size=4, grad_accum_steps=1)["warnings"]  # 4 pairs over 8 devices


def test_format_and_devices():
    plan = _plan()
    text = format_memory_plan(plan, device="H100")
    assert "NVIDIA H100 80GB" in text and "fits" in text and "34.09 GiB" in text
    assert "does NOT fit" in format_memory_plan(plan, device_memory_gb=16)
    assert "does NOT fit" in format_memory_plan(_plan(mesh=(1, 16, 1)), device="tpu v5e")
    assert device_memory("a100")[1] == 80 * GIB and device_memory("A100-40GB")[1] == 40 * GIB
    assert {"v4", "v5e", "v5p", "v6e", "h100", "h200"} <= set(KNOWN_DEVICES)
    with pytest.raises(ValueError, match="known"):
        device_memory("tpu v9")


def test_plan_from_config():
    config = FluxConfig.default()
    plan = plan_from_config(config)  # this machine's 8 (simulated) devices, fsdp = -1
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1, "devices": 8}
    assert plan["model"]["num_params"] == PRESETS["tiny-qwen3"].num_params()
    assert plan["settings"]["reference"] == "model"
    config.model_path = "Qwen/Qwen3-8B"
    config.mesh.data = 2
    config.algorithm.precompute_ref_logps = True
    config.model.logprob_chunk_size = 0
    plan = plan_from_config(config, num_devices=64)
    assert plan["mesh"] == {"data": 2, "fsdp": 32, "tensor": 1, "expert": 1, "devices": 64}
    assert plan["settings"]["reference"] == "precomputed"
    assert plan["settings"]["logprob_chunk_size"] is None
    assert "Qwen/Qwen3-8B" in format_memory_plan(plan, device="v5p")


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_activation_estimate_against_xla(remat):
    """The estimate within 25% of XLA's compiled temp memory (CPU, fp32, one device)."""
    from flux_jax import train_step as ts
    from flux_jax.models.qwen.config import QwenConfig
    from tests.train_fixtures import random_pair_batch

    cfg = QwenConfig(
        model_type="qwen3",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        tie_word_embeddings=True,
    )
    graphdef, state = nnx.split(build_model(cfg, remat=remat, abstract=True))
    params = nnx.to_pure_dict(state)
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        random_pair_batch(4, 256, vocab_size=cfg.vocab_size),
    )
    settings = ts.DPOSettings(logprob_chunk_size=64)

    def fn(p, b, r):
        loss_fn = lambda p_, b_: ts.dpo_loss_fn(  # noqa: E731
            p_, b_, graphdef=graphdef, ref_params=r, settings=settings
        )
        return jax.value_and_grad(loss_fn, has_aux=True)(p, b)

    measured = jax.jit(fn).lower(params, batch, params).compile().memory_analysis()
    plan = memory_plan(
        cfg,
        mesh_shape=(1, 1, 1),
        batch_size=4,
        max_length=256,
        remat=remat,
        logprob_chunk_size=64,
    )
    estimate = plan["per_device"]["activations"]
    print(
        f"remat={remat}: XLA temp {measured.temp_size_in_bytes / 2**20:.1f} MiB, "
        f"estimate {estimate / 2**20:.1f} MiB"
    )
    assert estimate == pytest.approx(measured.temp_size_in_bytes, rel=0.25)
