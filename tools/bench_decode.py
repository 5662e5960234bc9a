"""Measure KV-cache generation speed on random weights: compile, prefill and decode; prints JSON.

Shapes (random weights, so no download):
  tiny   hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, mlp 128, vocab 512
  40m    hidden 512, 8 layers, 8 heads / 4 kv heads, head_dim 64, mlp 1536, vocab 32768, tied
         embeddings (~42M parameters: 25M in the layers, 17M in the embedding / head)

A batch of random prompts (lengths between half and all of --prompt-len, left-padded to the
power-of-two bucket) is prefilled, then decoded for exactly --new-tokens steps (no eos, so no early
exit). `compile_*_s` is ahead-of-time lowering + compilation of each jitted function; `prefill_s`
and `decode_s` are medians over --repeats runs of the compiled functions; `decode_tokens_per_s`
counts generated tokens of the whole batch.

    python tools/bench_decode.py --shape 40m --batch 8 --prompt-len 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_jax.generation import kv_cache
from flux_jax.generation.generate import decode, eos_array, left_pad, prefill, prompt_bucket
from flux_jax.models.qwen.config import QwenConfig
from flux_jax.models.qwen.model import build_model

SHAPES = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=512,
    ),
    "40m": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=32768,
        tie_word_embeddings=True,
    ),
}


def random_model(cfg: QwenConfig, dtype: str, seed: int):
    """Random weights from numpy (N(0, 0.02), norms 1): no per-shape RNG kernels to compile."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(
        build_model(
            cfg, param_dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype), abstract=True
        )
    )
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        shape = var.get_value().shape
        value = np.ones(shape) if path[-1] == "scale" else 0.02 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="parameter and compute dtype")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = QwenConfig(model_type="qwen3", rope_theta=1e6, **SHAPES[args.shape])
    model = random_model(cfg, args.dtype, seed=0)
    spec = kv_cache.DecoderSpec.of(model)
    params = kv_cache.decoder_params(model)

    rng = np.random.default_rng(0)
    lengths = rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, args.batch)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]
    width = prompt_bucket(args.prompt_len)
    ids, num_pad = (jnp.asarray(a) for a in left_pad(prompts, 0, width))
    max_len = width + args.new_tokens
    greedy = args.temperature == 0
    sampling = {
        "temperature": jnp.float32(args.temperature),
        "top_k": jnp.int32(args.top_k),
        "top_p": jnp.float32(args.top_p),
    }
    key, eos, pad = jax.random.key(0), jnp.asarray(eos_array(())), jnp.int32(0)

    start = time.perf_counter()
    prefill_exe = prefill.lower(spec, params, ids, num_pad, max_len=max_len).compile()
    compile_prefill_s = time.perf_counter() - start
    logits, cache = prefill_exe(params, ids, num_pad)
    start = time.perf_counter()
    decode_exe = decode.lower(
        spec,
        params,
        cache,
        logits,
        num_pad,
        key,
        sampling,
        eos,
        pad,
        max_new_tokens=args.new_tokens,
        greedy=greedy,
    ).compile()
    compile_decode_s = time.perf_counter() - start

    prefill_s, _ = timed(lambda: prefill_exe(params, ids, num_pad), args.repeats)
    decode_times = []
    for _ in range(args.repeats):
        logits, cache = jax.block_until_ready(prefill_exe(params, ids, num_pad))
        start = time.perf_counter()  # the cache is donated: a fresh prefill for every run
        tokens, lengths_out, _ = jax.block_until_ready(
            decode_exe(params, cache, logits, num_pad, key, sampling, eos, pad)
        )
        decode_times.append(time.perf_counter() - start)
    decode_s = statistics.median(decode_times)
    generated = int(np.asarray(lengths_out).sum())

    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        json.dumps(
            {
                "shape": args.shape,
                "params_millions": round(n_params / 1e6, 2),
                "dtype": args.dtype,
                "batch": args.batch,
                "prompt_bucket": width,
                "prompt_tokens": int(lengths.sum()),
                "new_tokens": args.new_tokens,
                "greedy": greedy,
                "compile_prefill_s": round(compile_prefill_s, 3),
                "compile_decode_s": round(compile_decode_s, 3),
                "prefill_s": round(prefill_s, 4),
                "prefill_tokens_per_s": round(args.batch * width / prefill_s, 1),
                "decode_s": round(decode_s, 4),
                "decode_step_ms": round(1e3 * decode_s / args.new_tokens, 3),
                "decode_tokens_per_s": round(generated / decode_s, 1),
                "generated_tokens": generated,
                "device": str(jax.devices()[0].device_kind),
                "num_devices": jax.device_count(),
                "machine": platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
