"""The memory plan of LoRA and QLoRA runs (flux_jax/lora_memory.py): the issue's two questions
(Qwen3-8B LoRA r=16 on one 80 GB GPU; QLoRA nf4 on one 24 GB GPU) with numbers computed here
independently, and the plan's base and adapter bytes against the real sharded arrays."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import pytest

from flux_jax import lora
from flux_jax import quantization as qz
from flux_jax.memory_plan import memory_plan
from flux_jax.memory_report import fits, format_memory_plan
from flux_jax.model_setup import shard_params_like
from flux_jax.models.qwen.presets import resolve_architecture
from flux_jax.sharding import make_mesh
from tests.test_qlora import random_base
from tests.train_fixtures import TINY

GIB = 1 << 30
REPO = Path(__file__).resolve().parents[1]
QWEN3_8B = dict(L=36, D=4096, N=32, K=8, H=128, F=12288, V=151936)
# The tutorial run on one GPU: 8 pairs a step as 8 micro-batches of 1, 1024 tokens, bf16 compute.
ONE_GPU = dict(
    mesh_shape=(1, 1, 1),
    batch_size=8,
    grad_accum_steps=8,
    max_length=1024,
    compute_dtype="bfloat16",
    remat="full",
    logprob_chunk_mib=256,
)
R16 = lora.LoraSettings(rank=16, alpha=32.0)


def _qwen3_8b_counts() -> tuple[int, int, int]:
    """(projection weights, other weights, adapter weights at r=16), from the architecture."""
    L, D, N, K, H, F, V = QWEN3_8B.values()
    projections = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    norms = L * (2 * D + 2 * H) + D
    other = 2 * V * D + norms  # embedding, untied LM head, norms
    r = 16
    adapters = L * r * ((D + N * H) * 2 + 2 * (D + K * H) + 3 * (D + F))
    return projections, other, adapters


@pytest.fixture(scope="module")
def qwen3_8b():
    return resolve_architecture("Qwen/Qwen3-8B")


def test_qwen3_8b_lora_r16_bf16_base_fits_one_80gb_gpu(qwen3_8b):
    projections, other, adapters = _qwen3_8b_counts()
    assert qwen3_8b.num_params() == projections + other
    plan = memory_plan(qwen3_8b, lora=R16, base_dtype="bfloat16", **ONE_GPU)
    per = plan["per_device"]
    assert per["base"] == 2 * (projections + other)  # the frozen base in bf16, no copy
    assert per["reference"] == 0  # the reference is the base with the adapters off
    assert per["params"] == 4 * adapters  # fp32 adapters: 43.6M weights
    assert per["optimizer"] == 8 * adapters
    assert per["gradients"] == 8 * adapters  # fp32 gradients + the grad-accum accumulator
    text = format_memory_plan(plan, device="h100")
    print(text)
    assert "LoRA r=16" in text and "fits" in text and "NOT" not in text
    assert per["total"] < 0.25 * 80 * GIB  # ~19 GiB: 15.3 base + 0.8 adapter state + 3.3 act.
    # Full fine-tuning of the same run does not fit: fp32 weights, grads, Adam, bf16 reference.
    full = memory_plan(qwen3_8b, **ONE_GPU)
    assert not fits(full, 80 * GIB)
    assert full["per_device"]["total"] > 7 * per["total"]


def test_qwen3_8b_qlora_nf4_fits_one_24gb_gpu(qwen3_8b):
    projections, other, adapters = _qwen3_8b_counts()
    nf4 = qz.BaseQuantization("nf4", 64)
    plan = memory_plan(qwen3_8b, lora=R16, base_dtype="bfloat16", base_quantization=nf4, **ONE_GPU)
    per = plan["per_device"]
    # Half a byte per code, one fp32 scale per 64 weights; embeddings, head and norms in bf16.
    assert per["base"] == pytest.approx(projections * (0.5 + 4 / 64) + 2 * other)
    assert per["base"] < 6 * GIB
    int8 = memory_plan(
        qwen3_8b,
        lora=R16,
        base_dtype="bfloat16",
        base_quantization=qz.BaseQuantization("int8", 0),
        **ONE_GPU,
    )
    L, D, N, K, H, F, V = QWEN3_8B.values()
    channels = L * (N * H + 2 * K * H + D + 2 * F + D)  # one scale per output channel
    assert int8["per_device"]["base"] == projections + 4 * channels + 2 * other
    text = format_memory_plan(plan, device="rtx4090")
    print(text)
    assert "nf4 (blocks of 64, fp32 scales)" in text and "-> fits" in text
    assert plan["activation_terms"]["dequantized_weights"] == 2 * projections / L
    assert per["total"] < 0.5 * 24 * GIB


@pytest.mark.parametrize("fmt, block", [("nf4", 8), ("int8", 0)])
def test_plan_base_and_adapter_bytes_equal_the_placed_arrays(fmt, block):
    """fsdp 4 x tensor 2: the plan's per-device base and adapter bytes are what device 0 holds."""
    spec = qz.BaseQuantization(fmt, block)
    settings = lora.LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "o_proj", "up_proj"))
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    _, base = random_base(TINY)
    qbase = qz.quantize_base(shard_params_like(base, mesh), spec)
    adapters = lora.init_adapters(qbase, settings, jax.random.key(0))
    device = jax.devices()[0]

    def on_device(tree) -> int:
        total = 0
        for leaf in jax.tree.leaves(tree):
            (shard,) = [s for s in leaf.addressable_shards if s.device == device]
            total += math.ceil(shard.data.size * jax.dtypes.itemsize_bits(leaf.dtype) / 8)
        return total

    plan = memory_plan(
        TINY,
        mesh_shape=(1, 4, 2),
        batch_size=4,
        max_length=16,
        lora=settings,
        base_dtype="float32",
        base_quantization=spec,
    )
    assert plan["per_device"]["base"] == on_device(qbase)
    assert plan["per_device"]["params"] == on_device(adapters)


def test_plan_command_answers_for_a_qlora_config():
    """`flux-jax plan` reads model.lora.* from the config (subprocess: the real command line)."""
    import subprocess
    import sys

    args = [
        "plan",
        "--config",
        str(REPO / "configs" / "dpo_qwen3_8b.py"),
        "--config.model.lora.rank=16",
        "--config.model.lora.base_quantization=nf4",
        "--config.grad_accum_steps=8",
        "--devices",
        "1",
        "--device",
        "rtx4090",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "flux_jax.cli", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert "frozen base nf4 (blocks of 64, fp32 scales), the rest bfloat16" in out
    assert "NVIDIA GeForce RTX 4090 24GB: 24.00 GiB per device -> fits" in out


def test_moe_lora_plan_counts_only_the_projections_the_model_has():
    """Qwen3-30B-A3B is all sparse: the default gate/up/down targets name no dense MLP there (its
    experts take no adapters), so only q/k/v/o adapters are counted."""
    moe = resolve_architecture("builtin:qwen3-30b-a3b")
    settings = dict(ONE_GPU, mesh_shape=(1, 8, 1), batch_size=8, grad_accum_steps=1)
    default_targets = memory_plan(moe, lora=R16, base_dtype="bfloat16", **settings)
    attention_only = lora.LoraSettings(
        rank=16, alpha=32.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    attention = memory_plan(moe, lora=attention_only, base_dtype="bfloat16", **settings)
    assert default_targets["per_device"]["params"] == attention["per_device"]["params"] > 0
