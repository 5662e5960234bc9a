"""The comparison users would make: TRL's DPOTrainer on CPU torch fp32 at bench.py's settings; JSON.

Runs in its own virtualenv (TRL pins its own transformers/accelerate; flux_jax's venv stays clean):

    python3 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install torch==2.13.0 trl transformers==5.24.0 datasets
    /tmp/trl-venv/bin/python tools/bench_trl.py --model qwen3-40m --batch 4 \
        --prompt-len 128 --response-len 128 --steps 5 --warmup 2

The model is transformers' Qwen3ForCausalLM of the preset's shape with random weights, trained in
fp32 (--bf16 switches on TRL's bf16 autocast: on CPUs with AMX-BF16 torch's bf16 matmul is ~5x its
fp32 one, on CPUs without AVX-512 it is ~500x slower). The pairs are tools/bench.py's
`sample_pairs` with the same seeds, so step i trains on the same tokens in both tools; TRL pads each
batch only to its longest row. A word-level tokenizer ("t3" .. "t{V-1}" and three special words)
turns the token ids into text and back exactly, because DPOTrainer tokenizes its dataset itself.

TRL 1.x scores log-probs with a fused LM head that projects only the positions whose label is a
response token, so it does less head work than the model_flops formula counts (the head on every
real token): its "mfu" is then an effective rate, and can exceed what its matmuls really reach.

Timing: one step is `on_step_begin` to `on_step_end` of the HF Trainer loop (collation, policy and
reference forward, backward, clipping, AdamW), the median after --warmup steps. tokens_per_s counts
the real tokens of the batch (the attention mask's sum), as bench.py does; mfu uses the same
flux_jax.flops count and a torch fp32 2048 x 2048 matmul peak measured in this run.

`--data FILE --model-dir DIR` trains on a JSONL file ({prompt, chosen, rejected} strings) and a
saved HF model directory (tools/make_length_mix.py writes both), tokenised by TRL itself with
--max-length, --batch pairs per step, --sampling (TRL's train_sampling_strategy, default random:
each batch padded to its own longest row), the reference online or --reference precomputed. It
reports what tools/bench_file.py reports for flux_jax: step_time_s (median after --warmup),
tokens_per_s, end_to_end_tokens_per_s, padded_fraction (1 - attention-mask sum / its size) and
time_to_first_step_s (model load + DPOTrainer() (tokenising, and the precomputed reference pass)
+ train() to the end of step 1). It needs trl (no fallback).

`--impl torch` (and the automatic fallback when trl does not import) runs a plain-torch
re-implementation of TRL's step instead: one concatenated forward of chosen + rejected, the
reference forward under no_grad, the sigmoid loss, clipping and AdamW. The JSON says which ran.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from bench import MODEL_ALIASES, row_lengths, sample_pairs  # noqa: E402


def import_flux_pure(name: str) -> Any:
    """Imports a jax-free flux_jax module (presets, flops) without running the packages' __init__.

    flux_jax/__init__.py imports jax, which this virtualenv does not have; empty stand-in packages
    whose __path__ points at the source directories let the pure modules import each other.
    """
    for package in ("flux_jax", "flux_jax.models", "flux_jax.models.qwen"):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(REPO.joinpath(*package.split(".")))]
            sys.modules[package] = module
    return importlib.import_module(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-40m")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--reference", default="model", choices=["model", "precomputed"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--bf16", action="store_true", help="TRL's bf16 autocast (off: the fp32 comparison)"
    )
    parser.add_argument("--impl", default="trl", choices=["trl", "torch"])
    parser.add_argument("--seed", type=int, default=0)
    file_mode = parser.add_argument_group("training file mode (tools/bench_file.py's twin)")
    file_mode.add_argument("--data", default="", help="JSONL of {prompt, chosen, rejected}")
    file_mode.add_argument("--model-dir", default="", help="HF model dir with tokenizer files")
    file_mode.add_argument("--max-length", type=int, default=1024)
    file_mode.add_argument(
        "--sampling",
        default="random",
        choices=["random", "group_by_length", "sequential"],
        help="TRL's train_sampling_strategy (random is its default)",
    )
    args = parser.parse_args(argv)
    if bool(args.data) != bool(args.model_dir):
        parser.error("--data and --model-dir go together")
    return args


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def build_hf_model(cfg: Any, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = cfg.to_hf_config(dtype="float32")
    config = AutoConfig.for_model(**hf)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def word_tokenizer(vocab_size: int) -> Any:
    """Whitespace-separated words <-> ids, exactly: "t<id>", and <pad>, <unk>, <eos> for 0, 1, 2.

    The special tokens must not be "t<id>" words: transformers matches special tokens anywhere in
    the text, so an eos "t2" would also split "t257" into "t2" + "57".
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {_word(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_WORDS[1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad, unk, eos = SPECIAL_WORDS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk
    )


SPECIAL_WORDS = ("<pad>", "<unk>", "<eos>")


def _word(i: int) -> str:
    return SPECIAL_WORDS[i] if i < len(SPECIAL_WORDS) else f"t{i}"


def as_text(ids: np.ndarray) -> str:
    return " ".join(_word(int(i)) for i in ids)


def run_trl(args, model, pairs_per_step, vocab_size) -> dict[str, Any]:
    records = [
        # The prompt ends with a space so that prompt + chosen splits into the same words.
        {
            "prompt": as_text(p["prompt"]) + " ",
            "chosen": as_text(p["chosen"]),
            "rejected": as_text(p["rejected"]),
        }
        for pairs in pairs_per_step
        for p in pairs
    ]
    return train_trl(
        args,
        model,
        records,
        word_tokenizer(vocab_size),
        num_steps=len(pairs_per_step),
        max_length=args.prompt_len + args.response_len,
        sampling="sequential",  # step i sees bench.py's batch i
    )


def train_trl(
    args, model, records, tokenizer, *, num_steps: int, max_length: int, sampling: str
) -> dict[str, Any]:
    """TRL's DPOTrainer on `records` ({prompt, chosen, rejected} strings) for num_steps steps,
    timing each step and counting the real and padded tokens it saw."""
    import datasets
    import trl
    from transformers import TrainerCallback

    step_times: list[float] = []
    step_ends: list[float] = []
    tokens: list[int] = []
    computed: list[int] = []

    cpu_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())
            step_times.append(step_ends[-1] - self.start)
            cpu_times.append(time.process_time() - self.cpu_start)

    class CountingDPOTrainer(trl.DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["attention_mask"].sum()))
            computed.append(int(inputs["attention_mask"].numel()))
            return super().training_step(model, inputs, num_items_in_batch)

    out_dir = tempfile.mkdtemp(prefix="bench_trl_")
    config = trl.DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch // args.grad_accum,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=num_steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        beta=0.1,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=args.reference == "precomputed",
        precompute_ref_batch_size=args.batch,
        max_length=max_length,
        train_sampling_strategy=sampling,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=True,
        bf16=args.bf16,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=args.seed,
    )
    # From here on is what the run costs: DPOTrainer's constructor tokenises the dataset and, with
    # precompute_ref_log_probs, runs the whole reference pass; fit() does both in flux_jax.
    start = time.perf_counter()
    ref_model = None
    if args.reference == "model":
        ref_model = copy.deepcopy(model).eval()
        ref_model.requires_grad_(False)
    trainer = CountingDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    total = time.perf_counter() - start
    per_step = [
        sum(tokens[i : i + args.grad_accum]) for i in range(0, len(tokens), args.grad_accum)
    ]
    return {
        "impl": "trl",
        "trl_version": trl.__version__,
        "step_times_s": step_times,
        "cpu_times_s": cpu_times,
        "tokens_per_step_list": per_step,
        "train_call_s": total,
        "train_to_first_step_s": step_ends[0] - start if step_ends else None,
        "train_to_last_step_s": step_ends[-1] - start if step_ends else None,
        "padded_fraction": 1 - sum(tokens) / sum(computed) if computed else None,
    }


def _sequence_logps(model, ids, attention, completion) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), dim=-1)
    token = logps.gather(-1, ids[:, 1:, None])[..., 0]
    return (token * completion[:, 1:]).sum(-1)


def run_torch(args, model, pairs_per_step, vocab_size) -> dict[str, Any]:
    """TRL's DPO step re-implemented in plain torch (the fallback; see the module docstring)."""
    del vocab_size
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    model.train()

    def collate(pairs):  # TRL's DataCollatorForPreference: chosen rows then rejected, padded right
        rows = [np.concatenate([p["prompt"], p[s]]) for s in ("chosen", "rejected") for p in pairs]
        starts = [len(p["prompt"]) for _ in range(2) for p in pairs]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        completion = torch.zeros(len(rows), width)
        for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
            ids[i, : len(row)] = torch.from_numpy(row.astype(np.int64))
            attention[i, : len(row)] = 1
            completion[i, start : len(row)] = 1
        return ids, attention, completion

    ref_cache = {}
    if args.reference == "precomputed":
        with torch.no_grad():
            for i, pairs in enumerate(pairs_per_step):
                ref_cache[i] = _sequence_logps(ref_model, *collate(pairs))
        ref_model = None

    step_times, cpu_times, tokens = [], [], []
    micro = args.batch // args.grad_accum
    for i, pairs in enumerate(pairs_per_step):
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        for k in range(args.grad_accum):
            ids, attention, completion = collate(pairs[k * micro : (k + 1) * micro])
            tokens.append(int(attention.sum()))
            logps = _sequence_logps(model, ids, attention, completion)
            if ref_model is not None:
                with torch.no_grad():
                    ref = _sequence_logps(ref_model, ids, attention, completion)
            else:
                ref = ref_cache[i].chunk(2)
                ref = torch.cat([r[k * micro : (k + 1) * micro] for r in ref])
            policy_c, policy_r = logps.chunk(2)
            ref_c, ref_r = ref.chunk(2)
            margin = (policy_c - ref_c) - (policy_r - ref_r)
            loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean() / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    per_step = [
        sum(tokens[i : i + args.grad_accum]) for i in range(0, len(tokens), args.grad_accum)
    ]
    return {
        "impl": "torch re-implementation of TRL's DPO step",
        "step_times_s": step_times,
        "cpu_times_s": cpu_times,
        "tokens_per_step_list": per_step,
    }


def run_file(args: argparse.Namespace) -> dict[str, Any]:
    """TRL on a JSONL file and a saved HF model dir, tokenised by TRL itself (--data mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import trl  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"--data needs trl, which tokenises the file itself ({e}); make the virtualenv of "
            "this module's docstring"
        ) from e
    start = time.perf_counter()
    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    init_s = time.perf_counter() - start
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        result = train_trl(
            args,
            model,
            records,
            tokenizer,
            num_steps=args.warmup + args.steps,
            max_length=args.max_length,
            sampling=args.sampling,
        )
    timed = result["step_times_s"][args.warmup :]
    step_time = statistics.median(timed)
    tokens_per_step = statistics.mean(result["tokens_per_step_list"][args.warmup :])
    return {
        "tool": "trl bench_trl --data",
        "trl_version": result["trl_version"],
        "data": args.data,
        "model_dir": args.model_dir,
        "reference": args.reference,
        "sampling": args.sampling,
        "batch_pairs": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "init_s": init_s,
        "time_to_first_step_s": init_s + result["train_to_first_step_s"],
        "step_time_s": step_time,
        "step_times_s": result["step_times_s"],
        "step_cpu_s": statistics.median(result["cpu_times_s"][args.warmup :]),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / step_time,
        "end_to_end_tokens_per_s": sum(result["tokens_per_step_list"])
        / result["train_to_last_step_s"],
        "padded_fraction": result["padded_fraction"],
        "pairs_per_s": args.batch / step_time,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="bench_trl_ds_"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.data:
        print(json.dumps(run_file(args), indent=1))
        return
    presets = import_flux_pure("flux_jax.models.qwen.presets")
    flops = import_flux_pure("flux_jax.flops")
    name = MODEL_ALIASES.get(args.model, args.model)
    cfg = presets.PRESETS[name]
    peak = measure_matmul_peak()  # and again after training; the better one is kept

    num_steps = args.warmup + args.steps
    pairs_per_step = [
        sample_pairs(args.batch, args.prompt_len, args.response_len, cfg.vocab_size, args.seed + i)
        for i in range(num_steps)
    ]
    model = build_hf_model(cfg, args.seed)
    impl, fallback_reason = args.impl, None
    if impl == "torch" and args.bf16:
        raise SystemExit("--bf16 is only implemented for --impl trl")
    if impl == "trl":
        try:
            import trl  # noqa: F401
        except ImportError as e:
            impl, fallback_reason = "torch", f"trl did not import ({e})"
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        runner = run_trl if impl == "trl" else run_torch
        result = runner(args, model, pairs_per_step, cfg.vocab_size)

    peak = max(peak, measure_matmul_peak())
    step_times = result["step_times_s"]
    if len(step_times) != num_steps:
        raise RuntimeError(f"timed {len(step_times)} steps, expected {num_steps}")
    timed = step_times[args.warmup :]
    step_time = statistics.median(timed)
    cpu_share = sum(result["cpu_times_s"][args.warmup :]) / sum(timed) / (os.cpu_count() or 1)
    timed_pairs = pairs_per_step[args.warmup :]
    real_tokens = statistics.mean(sum(row_lengths(p)) for p in timed_pairs)
    counted = statistics.mean(result["tokens_per_step_list"][args.warmup :])
    if counted != real_tokens:
        raise RuntimeError(
            f"the trainer saw {counted} tokens per step, the pairs have {real_tokens}"
        )
    model_flops = statistics.mean(
        flops.dpo_step_flops(
            cfg, row_lengths(p), args.prompt_len + args.response_len, reference=args.reference
        ).model_flops
        for p in timed_pairs
    )
    out = {
        "tool": "trl" if impl == "trl" else "torch-fallback",
        **{
            k: v
            for k, v in result.items()
            if k not in ("step_times_s", "cpu_times_s", "tokens_per_step_list")
        },
        "fallback_reason": fallback_reason,
        "model": name,
        "num_params": cfg.num_params(),
        "dtype": "bfloat16 autocast" if args.bf16 else "float32",
        "reference": args.reference,
        "gradient_checkpointing": args.gradient_checkpointing,
        "grad_accum": args.grad_accum,
        "batch_pairs": args.batch,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_time_s": step_time,
        "step_times_s": step_times,
        "step_cpu_s": statistics.median(result["cpu_times_s"][args.warmup :]),
        "cpu_share": cpu_share,
        "tokens_per_step": real_tokens,
        "tokens_per_s": real_tokens / step_time,
        "pairs_per_s": args.batch / step_time,
        "model_flops_per_step": model_flops,
        "peak_flops_per_s": peak,
        "peak_flops_source": "measured: best of 2 x 5 torch fp32 2048x2048 matmuls, before + after",
        "mfu": model_flops / step_time / peak,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_source": "process peak RSS",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
