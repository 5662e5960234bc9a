"""QLoRA (flux_jax.quantization): the quantised frozen base through qwix, its error bounds, exact
equality with the dequantised base, a DPO step on it, its bytes and its sharding.

Error bounds (per weight, absmax of its output channel or block): int8 rounds to a step of
absmax / 127.5 (qwix's symmetric bound), so |error| <= absmax / 255; NF4 rounds to the nearest of
16 fixed codes in [-1, 1], so |error| <= absmax x half the widest gap between codes
((1 - 0.6961928) / 2 = 0.1519).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from flux_jax import lora, optim
from flux_jax import quantization as qz
from flux_jax import train_step as ts
from flux_jax.model_setup import shard_params_like, split_model
from flux_jax.models.qwen.model import build_model
from flux_jax.sharding import make_mesh
from tests.train_fixtures import TINY, random_pair_batch

INT8_BOUND = 1 / 255
NF4_BOUND = (1 - 0.6961928009986877) / 2
SETTINGS = lora.LoraSettings(rank=4, alpha=8.0)
BLOCK = 8  # divides TINY's hidden 32, MLP 64 and head_dim 8


def random_base(cfg, seed: int = 0) -> tuple:
    """(graphdef, params) of a random model built from its abstract shapes on the host: weights
    N(0, 0.02), norm scales 1 +- 0.1 (no eager per-parameter initialisation to compile)."""
    graphdef, abstract = split_model(build_model(cfg, abstract=True))
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        scale = path[-1].key == "scale"
        values = (1.0 if scale else 0.0) + (0.1 if scale else 0.02) * rng.standard_normal(
            shape.shape
        )
        return jnp.asarray(values.astype(np.float32))

    return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def tiny():
    return random_base(TINY)


def _kernel(seed: int, shape=(2, 64, 48)) -> jax.Array:
    """A random stacked kernel [L, in, out] with heavy tails (a few large weights per channel)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_t(df=3, size=shape).astype(np.float32) * 0.02)


def _batch(seed: int, pairs: int = 4, length: int = 16) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in random_pair_batch(pairs, length, seed=seed).items()}


def _random_adapters(base, settings, seed=1):
    adapters = lora.init_adapters(base, settings, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )


# -- error bounds --------------------------------------------------------------------------------


def test_int8_per_channel_error_within_half_a_step():
    kernel = _kernel(0)
    q = qz.quantize_kernel(kernel, 1, qz.BaseQuantization("int8", 0))
    assert q.qvalue.dtype == jnp.int8 and q.qvalue.shape == kernel.shape
    assert q.scale.shape == (2, 1, 48) and q.scale.dtype == jnp.float32  # one per output channel
    err = jnp.abs(qwix.dequantize(q) - kernel)
    channel_max = jnp.max(jnp.abs(kernel), axis=1, keepdims=True)
    ratio = float(jnp.max(err / channel_max))
    print(f"int8 per channel: max |error| / channel absmax = {ratio:.6f} (bound {INT8_BOUND:.6f})")
    assert ratio <= INT8_BOUND * (1 + 1e-4)  # fp32 rounding of w / s and q x s
    assert ratio > 0.5 * INT8_BOUND  # the bound is tight: the test can fail


def test_nf4_blockwise_error_within_half_the_widest_code_gap():
    kernel = _kernel(1)
    q = qz.quantize_kernel(kernel, 1, qz.BaseQuantization("nf4", 16))
    assert q.qtype == "nf4" and q.qvalue.dtype == jnp.uint4
    assert q.scale.shape == (2, 64 // 16, 48)  # one per block of 16 inputs of an output channel
    err = jnp.abs(qwix.dequantize(q) - kernel)
    block_max = jnp.repeat(jnp.max(jnp.abs(kernel.reshape(2, 4, 16, 48)), axis=2), 16, axis=1)
    ratio = float(jnp.max(err / block_max))
    rms_ratio = float(jnp.sqrt(jnp.mean(jnp.square(err / block_max))))
    print(
        f"nf4 blocks of 16: max |error| / block absmax = {ratio:.4f} (bound {NF4_BOUND:.4f}), "
        f"rms {rms_ratio:.4f}"
    )
    assert ratio <= NF4_BOUND * (1 + 1e-4)
    # Blocks bound the error by the block's, not the channel's, absmax: smaller than per channel.
    per_channel = qz.quantize_kernel(kernel, 1, qz.BaseQuantization("nf4", 0))
    channel_err = jnp.abs(qwix.dequantize(per_channel) - kernel)
    assert float(jnp.mean(err)) < float(jnp.mean(channel_err))


def test_o_proj_blocks_tile_head_dim_and_block_must_divide():
    kernel = _kernel(2, shape=(2, 4, 8, 32))  # o_proj [L, N, H, D]
    q = qz.quantize_kernel(kernel, 2, qz.BaseQuantization("nf4", 4))
    assert q.scale.shape == (2, 4, 2, 32)  # heads channelwise, head_dim in blocks of 4
    q8 = qz.quantize_kernel(kernel, 2, qz.BaseQuantization("int8", 0))
    assert q8.scale.shape == (2, 1, 1, 32)  # one scale per output channel over all N x H inputs
    with pytest.raises(ValueError, match=r"quantization_block=3 does not divide .* width 8"):
        qz.quantize_kernel(kernel, 2, qz.BaseQuantization("nf4", 3), "layers/self_attn/o_proj")
    with pytest.raises(ValueError, match="base_quantization='int4'; valid: none, int8, nf4"):
        qz.BaseQuantization("int4")


# -- the model on a quantised base ---------------------------------------------------------------


# int8 runs the same code path as nf4 (kernel_value -> qwix.dequantize): slow-marked for time.
@pytest.mark.parametrize(
    "fmt, block", [pytest.param("int8", 0, marks=pytest.mark.slow), ("nf4", BLOCK)]
)
def test_qlora_forward_equals_the_dequantized_base_exactly(tiny, fmt, block):
    graphdef, base = tiny
    qbase = qz.quantize_base(base, qz.BaseQuantization(fmt, block))
    attn = qbase["layers"]["self_attn"]
    assert all(qz.is_quantized(attn[p]["kernel"]) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert not qz.is_quantized(qbase["embed_tokens"]["embedding"])  # embeddings, norms stay
    dense = qz.dequantize_base(qbase)
    adapters = _random_adapters(base, SETTINGS)
    batch = _batch(seed=3, pairs=2)

    @jax.jit
    def logits(params):
        model = nnx.merge(graphdef, params)
        active = lora.ActiveAdapters(adapters, SETTINGS)
        return model(
            batch["chosen_input_ids"], segment_ids_BxT=batch["chosen_segment_ids"], lora=active
        )

    quantized = logits(qbase)
    np.testing.assert_array_equal(quantized, logits(dense))
    # ... and differs from the unquantised base (same tree as `dense`: no recompile) by the
    # quantisation error only.
    diff = float(jnp.max(jnp.abs(quantized - logits(base))))
    print(f"{fmt}: max |logits quantised - fp32 base| = {diff:.2e}")
    assert 0 < diff < 0.5


def test_qlora_dpo_steps_change_only_adapters(tiny):
    graphdef, base = tiny
    qbase = qz.quantize_base(base, qz.BaseQuantization("nf4", BLOCK))
    qbase_host = jax.tree.map(np.asarray, qbase)
    adapters = lora.init_adapters(qbase, SETTINGS, jax.random.key(0))
    tx = optim.make_optimizer(learning_rate=1e-2, num_steps=3)
    schedule = optim.make_schedule(learning_rate=1e-2, num_steps=3)
    state = ts.init_train_state(adapters, tx)
    step = ts.make_train_step(graphdef, tx, schedule, ts.DPOSettings(), lora=SETTINGS)
    losses = []
    for i in range(3):
        state, metrics = step(state, _batch(seed=10 + i), qbase)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6, abs=0)  # B = 0: policy = reference
    assert losses[-1] < losses[0]
    # The quantised base (codes and scales) is bit-identical; the adapters moved.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, qbase), qbase_host)
    b = state["params"]["layers"]["mlp"]["down_proj"]["lora_b"]
    assert float(jnp.max(jnp.abs(b))) > 0


def test_merge_of_a_quantized_base_is_the_merge_of_its_dequantized_values(tiny):
    _, base = tiny
    qbase = qz.quantize_base(base, qz.BaseQuantization("int8", 0))
    adapters = _random_adapters(base, SETTINGS)
    merged = lora.merge(qbase, adapters, SETTINGS)
    reference = lora.merge(qz.dequantize_base(qbase), adapters, SETTINGS)
    assert not any(qz.is_quantized(x) for x in jax.tree.leaves(merged, is_leaf=qz.is_quantized))

    # Equal up to the rounding of the one fp32 sum (XLA may fuse codes x scales + delta into one
    # fused multiply-add): a few ulps of the kernel's largest entry.
    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=0, atol=4 * np.spacing(np.max(np.abs(b))))

    jax.tree.map(close, merged, reference)


# -- memory and sharding --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, block, code_bytes", [("int8", 0, 1.0), ("nf4", 64, 0.5)])
def test_quantized_bytes_are_codes_plus_fp32_scales(fmt, block, code_bytes):
    """A [2, 256, 512] kernel: int8 ~ 1/4 and nf4 ~ 1/8 of fp32, plus the fp32 scales; the count
    equals what XLA allocates for the quantised leaf (it packs NF4's uint4 two to a byte)."""
    kernel = _kernel(4, shape=(2, 256, 512))
    spec = qz.BaseQuantization(fmt, block)
    q = qz.quantize_kernel(kernel, 1, spec)
    scales = q.scale.size * 4
    assert qz.leaf_bytes(q) == kernel.size * code_bytes + scales
    ratio = qz.leaf_bytes(q) / qz.leaf_bytes(kernel)
    print(
        f"{fmt} block {block}: {ratio:.4f} of fp32 ({code_bytes / 4:.4f} codes + "
        f"{scales / qz.leaf_bytes(kernel):.4f} scales)"
    )
    assert ratio == pytest.approx(code_bytes / 4 + scales / (kernel.size * 4))
    compiled = jax.jit(lambda k: qz.quantize_kernel(k, 1, spec)).lower(kernel).compile()
    assert compiled.memory_analysis().output_size_in_bytes == pytest.approx(
        qz.leaf_bytes(q), rel=1e-3
    )


def test_quantized_leaves_shard_like_their_kernels_and_match_one_device(tiny):
    graphdef, base = tiny
    spec = qz.BaseQuantization("nf4", BLOCK)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    sharded = shard_params_like(base, mesh)
    qbase_8 = qz.quantize_base(sharded, spec)
    for group, proj in qz.QUANTIZED_KERNELS:
        kernel = sharded["layers"][group][proj]["kernel"]
        q = qbase_8["layers"][group][proj]["kernel"]
        assert q.qvalue.sharding.is_equivalent_to(kernel.sharding, kernel.ndim), (group, proj)
    q = qbase_8["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D/8, N, H] blocks over D
    assert tuple(q.scale.sharding.spec) == (None, "fsdp", "tensor", None)  # D / 8 = 4 blocks
    q = qbase_8["layers"]["mlp"]["down_proj"]["kernel"]  # [L, F/8, D]
    assert tuple(q.qvalue.sharding.spec)[1:] == ("tensor", "fsdp")

    qbase_1 = qz.quantize_base(base, spec)
    jax.tree.map(np.testing.assert_array_equal, qbase_8, qbase_1)
    adapters = _random_adapters(base, SETTINGS)
    batch = _batch(seed=5, pairs=8)

    def logits(params, adapters, batch):
        model = nnx.merge(graphdef, params)
        return model(
            batch["chosen_input_ids"],
            segment_ids_BxT=batch["chosen_segment_ids"],
            lora=lora.ActiveAdapters(adapters, SETTINGS),
        )

    logits_1 = jax.jit(logits)(qbase_1, adapters, batch)
    placed = jax.tree.map(
        lambda x, s: jax.device_put(x, s.sharding),
        adapters,
        lora.adapter_shapes(qbase_8, SETTINGS),
    )
    logits_8 = jax.jit(logits)(qbase_8, placed, ts.shard_batch(batch, mesh))
    scale = float(jnp.max(jnp.abs(logits_1)))
    np.testing.assert_allclose(logits_8, logits_1, rtol=0, atol=1e-5 * scale)
