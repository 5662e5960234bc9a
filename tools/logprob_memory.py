"""Compiled temp memory of sequence log-probs + gradient, chunked vs unchunked. Compile-only.

Lowers `value_and_grad` of `flux_jax.logprobs.sequence_logprobs` for abstract inputs and reads
XLA's `memory_analysis()`; nothing is allocated or run, so it works on a laptop CPU for shapes that
would need tens of GB to execute.

    python tools/logprob_memory.py                      # B=16 T=2048 V=151936 D=1024, fp32
    python tools/logprob_memory.py --dtype bfloat16 --chunks 256 512 1024
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from flux_jax.logprobs import sequence_logprobs


def temp_bytes(
    batch: int, seq: int, dim: int, vocab: int, chunk_size: int | None, dtype: jnp.dtype
) -> int:
    """XLA's temp (scratch) bytes for the jitted log-prob value + grad w.r.t. hidden and head."""

    def objective(hidden_BxTxD, lm_head_DxV, input_ids_BxT, loss_mask_BxT):
        logps_B, _ = sequence_logprobs(
            hidden_BxTxD,
            lm_head_DxV,
            input_ids_BxT,
            loss_mask_BxT,
            chunk_size=chunk_size,
            compute_dtype=dtype,
        )
        return logps_B.sum()

    args = (
        jax.ShapeDtypeStruct((batch, seq, dim), dtype),
        jax.ShapeDtypeStruct((dim, vocab), jnp.float32),  # fp32 master weights
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    )
    lowered = jax.jit(jax.value_and_grad(objective, argnums=(0, 1))).lower(*args)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunks", type=int, nargs="+", default=[512])
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    gib = 2**30
    logits = args.batch * (args.seq - 1) * args.vocab * 4
    print(
        f"B={args.batch} T={args.seq} V={args.vocab} D={args.dim} compute={args.dtype} "
        f"backend={jax.default_backend()}; full fp32 logits = {logits / gib:.2f} GiB"
    )
    unchunked = temp_bytes(args.batch, args.seq, args.dim, args.vocab, None, dtype)
    print(f"  unchunked          temp {unchunked / gib:8.2f} GiB")
    for chunk in args.chunks:
        chunked = temp_bytes(args.batch, args.seq, args.dim, args.vocab, chunk, dtype)
        print(
            f"  chunk_size={chunk:<6}  temp {chunked / gib:8.2f} GiB  "
            f"({unchunked / chunked:.1f}x less)"
        )


if __name__ == "__main__":
    main()
