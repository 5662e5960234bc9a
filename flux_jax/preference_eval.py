"""Preference metrics of a policy on held-out pairs: reward accuracy, margin, rewards, DPO loss.

Every pair of the file counts exactly once. Pairs are scored in fixed-size batches with the DPO
step's own function (`batch_logprobs.paired_token_logprobs`, jitted); the last partial batch
is filled with copies of its last pair so it has the same shape, and the copies are dropped on
the host. The summed log-probs of all pairs are then passed to `dpo.dpo_loss` in one call, so
the metrics are means over all pairs: the same numbers as one batch holding the whole set.

    metrics = evaluate_preferences(policy, ref, tokenizer, "heldout.jsonl", data_format=...,
                                   max_length=1024, max_prompt_length=512, batch_size=8,
                                   settings=DPOSettings(loss_type="sigmoid", beta=0.1))
    print(format_eval_table(metrics))
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from flux_jax import batch_logprobs, dpo, logprobs
from flux_jax.data import (
    BATCH_KEYS,
    SCORED_POSITION_KEYS,
    collate_pairs,
    default_bucket_lengths,
    load_preference_examples,
)
from flux_jax.data.pipeline import pad_token_id
from flux_jax.data.tokenization import PreferenceExample
from flux_jax.dpo import DPOSettings
from flux_jax.losses import reweighting
from flux_jax.model_setup import split_model
from flux_jax.models.qwen.model import QwenForCausalLM
from flux_jax.sharding import batch_multiple, shard_batch, to_host

# In the order the table shows them; dpo_loss's metrics plus the pair count.
EVAL_METRICS = (
    "loss",
    "reward_accuracy",
    "reward_margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logps",
    "rejected_logps",
)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "wpo"))
def pair_logps(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: dict[str, jax.Array],
    chunk_size: int | None,
    wpo: bool = False,
) -> dict[str, jax.Array]:
    """Summed response log-probs and response token counts [B] of each side of each pair; with
    `wpo` (algorithm.use_weighting) also each side's WPO log-weight."""
    token_logps_NxT, mask_NxT, *stats = batch_logprobs.paired_token_logprobs(
        graphdef, params, batch, chunk_size, stats=("log_sum_sq_probs",) if wpo else ()
    )
    batch_size = token_logps_NxT.shape[0] // 2
    logps_N = token_logps_NxT.sum(axis=-1)
    counts_N = logprobs.token_counts(mask_NxT)
    out = {
        "chosen_logps": logps_N[:batch_size],
        "rejected_logps": logps_N[batch_size:],
        "chosen_counts": counts_N[:batch_size],
        "rejected_counts": counts_N[batch_size:],
    }
    if wpo:
        log_w_N = reweighting.wpo_log_weights(
            token_logps_NxT, stats[0]["log_sum_sq_probs"], mask_NxT
        )
        out["chosen_wpo"], out["rejected_wpo"] = log_w_N[:batch_size], log_w_N[batch_size:]
    return out


def _score_all(
    graphdef: nnx.GraphDef,
    params: Any,
    batches: list[tuple[dict[str, np.ndarray], int]],
    chunk_size: int | None,
    mesh: Mesh | None,
    wpo: bool = False,
) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch, real in batches:
        placed = shard_batch(batch, mesh, same_on_every_process=True)
        out = jax.tree.map(to_host, pair_logps(graphdef, params, placed, chunk_size, wpo))
        for name, value in out.items():
            parts.setdefault(name, []).append(np.asarray(value)[:real])
    return {name: np.concatenate(values) for name, values in parts.items()}


def evaluate_examples(
    graphdef: nnx.GraphDef,
    params: Any,
    ref_params: Any | None,
    examples: Sequence[PreferenceExample],
    *,
    pad_id: int,
    bucket_lengths: Sequence[int],
    batch_size: int,
    settings: DPOSettings,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """DPO metrics of `params` against `ref_params` over already tokenised pairs.

    `settings` gives the loss and the LM-head chunk (its regularisers and grad accumulation do
    not apply). The trainer's periodic eval calls this with examples it loaded once. `ref_params`
    may be None with `settings.reference_free`, or when every example carries precomputed
    `ref_logps`.
    Returns floats keyed by `EVAL_METRICS` and `num_pairs`.
    """
    precomputed = all(e.ref_logps is not None for e in examples)
    reference_free = settings.reference_free
    if ref_params is None and not reference_free and not precomputed:
        raise ValueError("reference_free=False needs a reference model")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if mesh is not None and batch_size % batch_multiple(mesh):
        raise ValueError(
            f"batch_size={batch_size} does not divide over the mesh's data x fsdp = "
            f"{batch_multiple(mesh)} devices"
        )
    if not examples:
        raise ValueError("no preference pairs to evaluate")
    batches = []
    for begin in range(0, len(examples), batch_size):
        chunk = list(examples[begin : begin + batch_size])
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)  # same shape; dropped after scoring
        collated = collate_pairs(chunk, pad_id, bucket_lengths)
        keys = [*BATCH_KEYS, *(k for k in SCORED_POSITION_KEYS if k in collated)]
        batches.append(({key: collated[key] for key in keys}, real))

    chunk_size = settings.logprob_chunk_size
    policy = _score_all(graphdef, params, batches, chunk_size, mesh, settings.use_weighting)
    if ref_params is not None:
        ref = _score_all(graphdef, ref_params, batches, chunk_size, mesh)
        ref_chosen, ref_rejected = ref["chosen_logps"], ref["rejected_logps"]
    elif precomputed and not reference_free:
        ref_Nx2 = np.asarray([e.ref_logps for e in examples], np.float32)
        ref_chosen, ref_rejected = ref_Nx2[:, 0], ref_Nx2[:, 1]
    else:
        ref_chosen = ref_rejected = np.zeros_like(policy["chosen_logps"])
    pair = dpo.PairLogps(
        policy["chosen_logps"],
        policy["rejected_logps"],
        ref_chosen,
        ref_rejected,
        chosen_counts=policy["chosen_counts"],
        rejected_counts=policy["rejected_counts"],
        wpo_log_weights=(
            np.concatenate([policy["chosen_wpo"], policy["rejected_wpo"]])
            if settings.use_weighting
            else None
        ),
    )
    _, metrics = dpo.preference_loss(settings, pair)  # the loss without the regularisers
    result: dict[str, float] = {name: float(metrics[name]) for name in EVAL_METRICS}
    result["num_pairs"] = len(examples)
    return result


def evaluate_preferences(
    policy_model: QwenForCausalLM,
    ref_model: QwenForCausalLM | None,
    tokenizer: PreTrainedTokenizerBase,
    data_path: str | os.PathLike,
    *,
    data_format: str,
    max_length: int,
    max_prompt_length: int,
    batch_size: int,
    settings: DPOSettings,
    mesh: Mesh | None = None,
    tokenization: str = "separate",
) -> dict[str, float]:
    """DPO metrics of `policy_model` against `ref_model` over every pair at `data_path`.

    Pairs are read, tokenised (`tokenization`: data.tokenization) and truncated as for training
    (`load_preference_examples`). `ref_model` may be
    None only with `settings.reference_free`; the rewards are then `beta * policy log-probs`, as in
    training. With a mesh, `batch_size` must divide over its data x fsdp devices.

    Returns floats keyed by `EVAL_METRICS` (means over pairs), plus `num_pairs` and
    `pairs_truncated`.
    """
    if ref_model is None and not settings.reference_free:
        raise ValueError("reference_free=False needs a reference model")
    examples, stats = load_preference_examples(
        data_path,
        tokenizer,
        data_format=data_format,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        tokenization=tokenization,
    )
    if not examples:
        raise ValueError(f"{data_path}: no preference pairs to evaluate")
    graphdef, params = split_model(policy_model)
    ref_params = split_model(ref_model)[1] if ref_model is not None else None
    result = evaluate_examples(
        graphdef,
        params,
        ref_params,
        examples,
        pad_id=pad_token_id(tokenizer),
        bucket_lengths=default_bucket_lengths(max_length),
        batch_size=batch_size,
        settings=settings,
        mesh=mesh,
    )
    result["pairs_truncated"] = stats.pairs_truncated
    return result


def format_eval_table(metrics: dict[str, Any]) -> str:
    """A two-column text table: the known metrics in a fixed order, then any others."""
    names = [n for n in EVAL_METRICS if n in metrics]
    names += sorted(n for n in metrics if n not in EVAL_METRICS)
    width = max([len("metric"), *(len(n) for n in names)])

    def show(value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            return str(value)
        if isinstance(value, int | np.integer):
            return str(value)
        return f"{value:.4f}"

    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{name:<{width}}  {show(metrics[name])}" for name in names]
    return "\n".join(lines)


def write_eval_json(path: str | os.PathLike, metrics: dict[str, Any], **context: Any) -> str:
    """Writes `{**context, "metrics": metrics}` (e.g. checkpoint=..., data=...) as JSON."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        json.dump({**context, "metrics": metrics}, f, indent=2)
        f.write("\n")
    return os.fspath(out)
