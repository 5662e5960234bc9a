"""Throughput of flux_jax's DPO train step on a named model shape with random weights; prints JSON.

    python tools/bench.py --model qwen3-40m --batch 4 --prompt-len 128 --response-len 128
    python tools/bench.py --model bigvocab --chunk 0              # unchunked LM head
    python tools/bench.py --model qwen3-8b --dtype bfloat16 --remat full --mesh 1,-1,1  # GPU/TPU
    python tools/bench.py --model tiny --steps 2 --warmup 1      # smoke test (seconds)
    python tools/bench.py --model moe --moe-impl dense           # Qwen3-MoE: dense vs grouped
    python tools/bench.py --model moe --mesh 1,1,1,8             # expert parallelism
    python tools/bench.py --loss simpo --reference none          # a reference-free method
    python tools/bench.py --loss sigmoid,bco_pair,sft            # MPO: several losses

Models are the presets of flux_jax.models.qwen.presets ("tiny" = "tiny-qwen3", "qwen3-40m",
"bigvocab", "qwen3-0.6b", "qwen3-1.7b", "qwen3-8b", "moe" = "qwen3-moe-bench", ...). For a MoE
model the FLOPs (mfu) count the active parameters: the router and each token's top-k experts.
Each pair has a prompt of exactly --prompt-len tokens and chosen / rejected responses whose
lengths are drawn uniformly from [response-len / 2, response-len] (the last response token is
EOS), right-padded to T = prompt-len + response-len, so a realistic share of every batch is
padding. Every timed step gets a fresh batch; all batches are on the device before timing starts.

What is measured:
  compile_s          lowering + XLA compilation of the train step (AOT, compiled once)
  step_time_s        median wall time of the steps after --warmup, each waited on to completion
  cpu_share          process CPU time / (wall time x cores) over the timed steps: well under 1 on
                     a CPU host means other processes took cores (the timings are then noisy)
  step_cpu_s         median process CPU seconds per step (less sensitive to neighbours than wall)
  tokens_per_s       real (non-pad) chosen + rejected tokens per step / step_time_s
  pairs_per_s        --batch / step_time_s
  mfu                model_flops_per_step / step_time_s / peak_flops_per_s
  hardware_flops_utilisation   hardware_flops_per_step / step_time_s / peak_flops_per_s
  peak_memory_bytes  the device's peak_bytes_in_use (GPU/TPU), or the process's peak RSS on CPU
                     (ru_maxrss: whole process, compilation included)
  compiled_memory    XLA's memory_analysis() of the compiled step: argument, output, alias and temp
                     bytes. Deterministic, so better than RSS for comparing settings on CPU.

FLOPs are counted analytically by flux_jax.flops.dpo_step_flops (its docstring has the formula).
Forward per token: 2*D*(N*H + 2*K*H) + 2*N*H*D + 6*D*F per layer, plus 2*D*V for the LM head, plus
4*N*H per (query, key) pair per layer for attention. model_flops ("mfu") counts real tokens only,
with causal attention pairs n*(n+1)/2 per row: policy forward + backward = 3x forward, a reference
model +1x forward, a precomputed or absent reference +0. hardware_flops counts every padded row
with the full T x T attention, the LM head on the positions it runs on (T - 1 per row, or the
scored-position window W of --score-window auto), its logit recompute in the backward pass (4x head
forward with more than one chunk, 3x otherwise) and rematerialisation's recompute.

Peak FLOP/s: on CPU, the best of several 2048 x 2048 jnp matmuls in the compute dtype, measured
before and after the steps in the same run (the machine, not per fake device). On accelerators, a
table of dense bf16 peaks per chip x the number of devices (fp32 runs are also reported against the
bf16 peak); --peak-tflops overrides both.

jax is imported only after the arguments are parsed (--cpu-devices must set XLA_FLAGS first), and
the batch sampler above the jax code uses numpy alone, so tools/bench_trl.py (another virtualenv,
no jax) samples exactly the same pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

MODEL_ALIASES = {
    "tiny": "tiny-qwen3",
    "40m": "qwen3-40m",
    "0.6b": "qwen3-0.6b",
    "8b": "qwen3-8b",
    "moe": "qwen3-moe-bench",
}

# Dense bf16 peak TFLOP/s per chip, matched against jax's device_kind (first match wins, so the
# more specific names come first).
ACCELERATOR_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
    ("TPU v4", 275.0),
)
PAD_ID = 0
EOS_ID = 2
FIRST_WORD_ID = 3  # sampled tokens avoid the low ids (pad, bos, eos)


# ---------------------------------------------------------------------------------------------
# Batches (numpy only: shared with tools/bench_trl.py)


def sample_pairs(
    num_pairs: int, prompt_len: int, response_len: int, vocab_size: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """Random token pairs: a prompt of `prompt_len` tokens, responses of U[len/2, len] tokens.

    Chosen and rejected lengths are drawn independently; each response ends with EOS_ID.
    """
    rng = np.random.default_rng(seed)
    low = max(1, -(-response_len // 2))
    pairs = []
    for _ in range(num_pairs):
        pair = {"prompt": rng.integers(FIRST_WORD_ID, vocab_size, prompt_len, dtype=np.int32)}
        for side in ("chosen", "rejected"):
            n = int(rng.integers(low, response_len + 1))
            response = rng.integers(FIRST_WORD_ID, vocab_size, n, dtype=np.int32)
            response[-1] = EOS_ID
            pair[side] = response
        pairs.append(pair)
    return pairs


def collate(pairs: list[dict[str, np.ndarray]], length: int) -> dict[str, np.ndarray]:
    """flux_jax's batch layout: `{chosen,rejected}_{input_ids,loss_mask,segment_ids,positions}`."""
    batch = {}
    for side in ("chosen", "rejected"):
        ids_BxT = np.zeros((len(pairs), length), np.int32)
        mask_BxT = np.zeros_like(ids_BxT)
        seg_BxT = np.zeros_like(ids_BxT)
        pos_BxT = np.zeros_like(ids_BxT)
        for row, pair in enumerate(pairs):
            p, r = len(pair["prompt"]), len(pair[side])
            ids_BxT[row, :p] = pair["prompt"]
            ids_BxT[row, p : p + r] = pair[side]
            mask_BxT[row, p : p + r] = 1
            seg_BxT[row, : p + r] = 1
            pos_BxT[row, : p + r] = np.arange(p + r)
        batch.update(
            {
                f"{side}_input_ids": ids_BxT,
                f"{side}_loss_mask": mask_BxT,
                f"{side}_segment_ids": seg_BxT,
                f"{side}_positions": pos_BxT,
            }
        )
    return batch


def collate_layout(
    pairs: list[dict[str, np.ndarray]], length: int, args: argparse.Namespace
) -> dict[str, np.ndarray]:
    """The standard layout, or the shared-prefix / packed layout of flux_jax.data.packing.

    tokens_per_step (and so tokens/s and mfu) always count the standard layout's real tokens,
    the work a user asks for, so layouts compare on equal terms: a layout that computes fewer
    tokens for the same pairs shows up as a higher tokens/s.
    """
    from flux_jax.data.batching import scored_positions

    if args.layout == "standard":
        batch = collate(pairs, length)
        width = head_window(args)
        if width is not None:
            for side in ("chosen", "rejected"):
                batch[f"{side}_scored_positions"] = scored_positions(
                    batch[f"{side}_loss_mask"], width
                )
        return batch
    from flux_jax.data.packing import collate_shared_prefix
    from flux_jax.data.tokenization import PreferenceExample

    examples = [
        PreferenceExample(p["prompt"], p["chosen"], p["rejected"], source="bench", line=i)
        for i, p in enumerate(pairs)
    ]
    per_row = args.pairs_per_row if args.layout == "packed" else 1
    # One static row width (the longest possible row) so every step has the compiled shape.
    width = per_row * (args.prompt_len + 2 * args.response_len)
    batch = collate_shared_prefix(
        examples, PAD_ID, (width,), pairs_per_row=per_row, score_windows=False
    )
    window = head_window(args)
    if window is not None:
        batch["scored_positions"] = scored_positions(batch["loss_mask"], window)
    return batch


def head_window(args: argparse.Namespace) -> int | None:
    """The scored-position window W of every batch (static, from the longest possible responses),
    or None for the LM head on every position (--score-window off, or no window fits)."""
    if args.score_window == "off":
        return None
    from flux_jax.data.batching import score_window

    if args.layout == "standard":
        return score_window(args.response_len, args.prompt_len + args.response_len)
    per_row = args.pairs_per_row if args.layout == "packed" else 1
    width = per_row * (args.prompt_len + 2 * args.response_len)
    return score_window(per_row * 2 * args.response_len, width)


def row_lengths(pairs: list[dict[str, np.ndarray]]) -> list[int]:
    """Real tokens of every row, chosen rows first (the train step's concatenation order)."""
    return [len(p["prompt"]) + len(p[side]) for side in ("chosen", "rejected") for p in pairs]


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_mesh(text: str) -> tuple[int, int, int, int]:
    """data,fsdp,tensor[,expert] sizes (expert defaults to 1)."""
    parts = [int(x) for x in text.split(",")]
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(
            f"--mesh wants data,fsdp,tensor[,expert] (e.g. 1,-1,1 or 1,-1,1,8), got {text}"
        )
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-40m", help="preset name (or alias: tiny)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument(
        "--chunk",
        type=int,
        help="LM head chunk; 0 = unchunked (default: the config's model.logprob_chunk_size)",
    )
    parser.add_argument(
        "--chunk-mib",
        type=float,
        help="cap on one chunk's fp32 logits per device, as model.logprob_chunk_mib (default: "
        "the config's); 0 = no cap",
    )
    parser.add_argument("--reference", default="model", choices=["model", "precomputed", "none"])
    parser.add_argument(
        "--loss",
        default="sigmoid",
        help="algorithm.loss_type: a name or a comma-separated list (MPO). The reference-free "
        "ones (simpo, cpo, orpo, sft) need --reference none: no reference forward, no weights",
    )
    parser.add_argument(
        "--logits-metrics",
        default="on",
        choices=["on", "off"],
        help="logging.logits_metrics: the LM head's mean logits for logits/chosen|rejected "
        "(on = the trainer's default)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument(
        "--mesh", type=parse_mesh, default=(1, -1, 1, 1), help="data,fsdp,tensor[,expert]"
    )
    parser.add_argument(
        "--moe-impl",
        default="auto",
        choices=["auto", "grouped", "dense"],
        help="MoE presets (moe = qwen3-moe-bench): model.moe_impl, how the experts run",
    )
    parser.add_argument(
        "--attention", default="xla", help="xla, cudnn, splash (TPU) or auto, as model.attention"
    )
    parser.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices (mesh tests)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--layout",
        default="standard",
        choices=["standard", "prefix", "packed"],
        help="standard rows; prefix = prompt once per pair (prefix sharing); packed = prefix "
        "sharing with --pairs-per-row pairs per row",
    )
    parser.add_argument("--pairs-per-row", type=int, default=2, help="with --layout packed")
    parser.add_argument(
        "--score-window",
        default="auto",
        choices=["auto", "off"],
        help="auto: the LM head runs only on the scored-position window (as the trainer's "
        "batches do when it fits); off: on every position",
    )
    args = parser.parse_args(argv)
    if args.batch % args.grad_accum:
        parser.error(f"--batch {args.batch} is not divisible by --grad-accum {args.grad_accum}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# The jax side (imported lazily, see the module docstring)


def measure_matmul_peak(dtype: Any, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a size x size matmul on the default device, after one warm-up call."""
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def table_peak_flops(devices: list[Any]) -> tuple[float | None, str]:
    """The accelerators' dense bf16 peak from ACCELERATOR_PEAK_TFLOPS, times the device count."""
    kind = devices[0].device_kind
    for name, tflops in ACCELERATOR_PEAK_TFLOPS:
        if name.lower() in kind.lower():
            source = f"table: {name} {tflops} TFLOP/s bf16 dense x {len(devices)}"
            return tflops * 1e12 * len(devices), source
    return None, f"unknown device kind {kind!r}: pass --peak-tflops"


def peak_memory() -> tuple[int, str]:
    import jax

    devices = jax.local_devices()
    stats = [d.memory_stats() or {} for d in devices]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        return max(peaks), "max over devices of memory_stats()['peak_bytes_in_use']"
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process peak RSS"


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    out = {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "alias_bytes": int(analysis.alias_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
    }
    out["argument_plus_temp_bytes"] = out["argument_bytes"] + out["temp_bytes"]
    return out


def resolved_attention(args: argparse.Namespace) -> str | None:
    """--attention as the trainer resolves model.attention (ModelOptions.attention_impl: "auto"
    is splash on TPU for standard rows, JAX's choice on GPU, "xla" otherwise)."""
    from flux_jax.model_setup import ModelOptions

    return ModelOptions(
        attention=args.attention, branch_masks=args.layout != "standard"
    ).attention_impl


def with_config_defaults(chunk: int | None, chunk_mib: float | None) -> tuple[int, float]:
    """--chunk and --chunk-mib, each defaulting to the config's (model.logprob_chunk_size, _mib)."""
    from flux_jax.config_schema import LEAVES

    if chunk is None:
        chunk = LEAVES["model.logprob_chunk_size"].default
    if chunk_mib is None:
        chunk_mib = LEAVES["model.logprob_chunk_mib"].default
    return chunk, chunk_mib


def build_params(name: str, args: argparse.Namespace, mesh: Any) -> tuple[Any, Any]:
    """(graphdef, params) of the random preset `name`, built as the trainer builds a builtin
    model: each parameter created on its mesh sharding, fp32 master weights."""
    from flux_jax.model_setup import ModelOptions, load_model, split_model
    from flux_jax.models.qwen.presets import BUILTIN_PREFIX

    options = ModelOptions(
        param_dtype="float32",
        compute_dtype=args.dtype,
        remat=args.remat,
        attention=args.attention,
        seed=args.seed,
        branch_masks=args.layout != "standard",
        moe_impl=args.moe_impl,
    )
    return split_model(load_model(BUILTIN_PREFIX + name, options, mesh))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from flux_jax import dpo, flops, logprob_chunk, optim
    from flux_jax import train_step as ts
    from flux_jax.models.qwen.presets import PRESETS
    from flux_jax.sharding import make_mesh, shard_batch, state_shardings_of

    name = MODEL_ALIASES.get(args.model, args.model)
    if name not in PRESETS:
        raise SystemExit(f"unknown --model {args.model!r}; presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    dtype = jnp.dtype(args.dtype)
    # On CPU the matmul rate is measured before and after the steps and the better one kept: a
    # neighbour's burst of work during one measurement would otherwise inflate the MFU.
    on_cpu = jax.devices()[0].platform == "cpu"
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif on_cpu:
        peak = measure_matmul_peak(dtype)
        peak_source = (
            f"measured: best of 2 x 5 {dtype.name} 2048x2048 jnp matmuls, before and after"
        )
    else:
        peak, peak_source = table_peak_flops(jax.devices())
    data, fsdp, tensor, expert = args.mesh
    mesh = make_mesh(data, fsdp, tensor, expert=expert)
    graphdef, params = build_params(name, args, mesh)
    # The trainer's chunk rule: --chunk, capped at --chunk-mib MiB of logits per device for the
    # rows one device holds in a micro-batch (rows of this layout, not always 2 x pairs).
    rows = (
        2 * args.batch
        if args.layout == "standard"
        else args.batch // (args.pairs_per_row if args.layout == "packed" else 1)
    )
    args.chunk, args.chunk_mib = with_config_defaults(args.chunk, args.chunk_mib)
    chunk = logprob_chunk.lm_head_chunk_size(
        args.chunk,
        max_chunk_mib=args.chunk_mib,
        rows_per_step=rows,
        grad_accum_steps=args.grad_accum,
        mesh_shape=mesh.shape,
        vocab_size=cfg.vocab_size,
    )
    losses = tuple(name.strip() for name in args.loss.split(","))
    try:
        settings = ts.DPOSettings(
            loss_type=losses[0] if len(losses) == 1 else losses,
            reference_free=args.reference == "none",
            logits_metrics=args.logits_metrics == "on",
            logprob_chunk_size=chunk,
            grad_accum_steps=args.grad_accum,
        )
    except ValueError as e:  # reference_free=true is --reference none here
        raise SystemExit(f"--loss {args.loss} --reference {args.reference}: {e}") from None
    num_steps = args.warmup + args.steps
    tx = optim.make_optimizer(learning_rate=1e-6, num_steps=num_steps, max_grad_norm=1.0)
    schedule = optim.make_schedule(learning_rate=1e-6, num_steps=num_steps)

    # The reference is the initial policy in the compute dtype, as FluxTrainer keeps it.
    ref_params = None
    if args.reference != "none":
        ref_params = jax.tree.map(lambda x: jnp.copy(x.astype(dtype)), params)

    length = args.prompt_len + args.response_len
    host_pairs = [
        sample_pairs(args.batch, args.prompt_len, args.response_len, cfg.vocab_size, args.seed + i)
        for i in range(num_steps)
    ]
    batches = [shard_batch(collate_layout(pairs, length, args), mesh) for pairs in host_pairs]

    ref_precompute_s = None
    if args.reference == "precomputed":
        ref_step = ts.make_ref_logps_step(graphdef, chunk)
        jax.block_until_ready(ref_step(ref_params, batches[0]))  # compile
        times = []
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            ref_c, ref_r = jax.block_until_ready(ref_step(ref_params, batch))
            times.append(time.perf_counter() - start)
            batches[i] = {**batch, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
        ref_precompute_s = statistics.median(times)
        ref_params = None  # the step holds no reference weights, as in FluxTrainer

    state = ts.init_train_state(params, tx, dpo.initial_loss_state(settings))  # + BCO's state
    del params
    step_fn = ts.make_train_step(
        graphdef, tx, schedule, settings, state_shardings=state_shardings_of(state)
    )
    start = time.perf_counter()
    compiled = step_fn.lower(state, batches[0], ref_params).compile()
    compile_s = time.perf_counter() - start

    step_times, cpu_times, losses = [], [], []
    for batch in batches:
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch, ref_params)
        jax.block_until_ready((state, metrics))
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(float(metrics["loss"]))
    timed = step_times[args.warmup :]
    step_time = statistics.median(timed)
    if on_cpu and not args.peak_tflops:
        peak = max(peak, measure_matmul_peak(dtype))
    cpu_share = sum(cpu_times[args.warmup :]) / sum(timed) / (os.cpu_count() or 1)

    timed_pairs = host_pairs[args.warmup :]
    real_tokens = statistics.mean(sum(row_lengths(p)) for p in timed_pairs)
    padded_tokens = int(
        np.prod(batches[0]["input_ids" if args.layout != "standard" else "chosen_input_ids"].shape)
    )
    if args.layout == "standard":
        padded_tokens *= 2  # chosen and rejected rows
    window = head_window(args) if args.layout == "standard" else None
    head_chunks = flops.head_chunk_count(length if window is None else window + 1, chunk)
    counts = [
        flops.dpo_step_flops(
            cfg,
            row_lengths(p),
            length,
            reference=args.reference,
            remat=args.remat,
            head_chunks=head_chunks,
            head_positions=window,
        )
        for p in timed_pairs
    ]
    model_flops = statistics.mean(c.model_flops for c in counts)
    hardware_flops = statistics.mean(c.hardware_flops for c in counts)
    memory, memory_source = peak_memory()
    devices = jax.devices()
    return {
        "tool": "flux_jax",
        "model": name,
        "num_params": cfg.num_params(),
        "backend": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "mesh": dict(mesh.shape),
        "moe_impl": args.moe_impl if cfg.is_moe else None,
        "active_params": cfg.num_active_params() if cfg.is_moe else cfg.num_params(),
        "dtype": args.dtype,
        "remat": args.remat,
        "attention": args.attention,
        "attention_impl": resolved_attention(args),
        "chunk": chunk,
        "chunk_mib": args.chunk_mib,
        "head_chunks": head_chunks,
        "reference": args.reference,
        "loss": args.loss,
        "logits_metrics": args.logits_metrics,
        "layout": args.layout,
        "pairs_per_row": args.pairs_per_row if args.layout == "packed" else 1,
        "score_window": head_window(args),
        "grad_accum": args.grad_accum,
        "batch_pairs": args.batch,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "seq_len": length,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile_s": compile_s,
        "step_time_s": step_time,
        "step_times_s": step_times,
        "step_cpu_s": statistics.median(cpu_times[args.warmup :]),
        "cpu_share": cpu_share,
        "tokens_per_step": real_tokens,
        "padded_tokens_per_step": padded_tokens,
        "padding_fraction": 1 - real_tokens / padded_tokens,
        "tokens_per_s": real_tokens / step_time,
        "pairs_per_s": args.batch / step_time,
        "model_flops_per_step": model_flops,
        "hardware_flops_per_step": hardware_flops,
        "peak_flops_per_s": peak,
        "peak_flops_source": peak_source,
        "mfu": model_flops / step_time / peak if peak else None,
        "hardware_flops_utilisation": hardware_flops / step_time / peak if peak else None,
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        "compiled_memory": compiled_memory(compiled),
        "ref_precompute_s_per_batch": ref_precompute_s,
        "losses": losses,
        "jax_version": jax.__version__,
        "host": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> None:
    from flux_jax.devices import fake_cpu_devices

    args = parse_args(argv)
    fake_cpu_devices(args.cpu_devices)  # before run() starts JAX
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
