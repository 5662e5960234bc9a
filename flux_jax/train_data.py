"""A training run's data set-up: where the pairs come from, the pairs, their reference log-probs,
and the resumable iterator of batches; functions of the config, the tokenizer and the mesh.

The batch plan itself (layout, buckets, length grouping, one batch shape on every process) is in
flux_jax.train_batches; this module reads the files, checks the batch fits the mesh and wires the
plan to grain. FluxTrainer.fit calls these before its loop, and `flux-jax eval` reads its pairs
with `load_examples` so they are truncated exactly as in training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from flux_jax import ref_logps, train_batches
from flux_jax import train_step as ts
from flux_jax.data import load_preference_examples
from flux_jax.data.loading import LoadSettings
from flux_jax.data.pipeline import pad_token_id
from flux_jax.data.token_cache import load_cached_examples
from flux_jax.data.tokenization import PreferenceExample
from flux_jax.data.unpaired import UNPAIRED_FORMAT, is_unpaired, load_unpaired_examples
from flux_jax.model_setup import is_builtin, resolve_model_dir
from flux_jax.sharding import batch_multiple, shard_batch, to_host

# A run's messages keep the trainer's logger name (what users filter on), wherever they are made.
log = logging.getLogger("flux_jax.trainer")

DEMO_TRAIN = os.path.join(os.path.dirname(__file__), "assets", "demo_preferences.jsonl")
DEMO_EVAL = os.path.join(os.path.dirname(__file__), "assets", "demo_eval_preferences.jsonl")


@dataclasses.dataclass(frozen=True)
class DataSources:
    """The files of one fit(): training pairs, held-out pairs (or None) and their format."""

    train_path: str
    eval_path: str | None
    data_format: str


def data_sources(
    config: Any, prompts: str | None, data_format: str | None, eval_prompts: str | None
) -> DataSources:
    """fit()'s arguments, else config.data's paths, else the bundled demo pairs (and, for those
    alone, the bundled eval split)."""
    train_path = prompts or config.data.train_path or DEMO_TRAIN
    eval_path = (
        eval_prompts or config.data.eval_path or (DEMO_EVAL if train_path == DEMO_TRAIN else None)
    )
    return DataSources(train_path, eval_path, data_format or config.data.format)


def check_batch_shape(config: Any, mesh: Mesh) -> None:
    """Raises ValueError unless every micro-batch divides over the mesh and the processes."""
    multiple = batch_multiple(mesh)
    micro = config.batch_size // config.grad_accum_steps
    if micro % multiple:
        raise ValueError(
            f"batch_size / grad_accum_steps = {config.batch_size} / {config.grad_accum_steps} = "
            f"{micro} pairs per micro-batch must divide evenly over the mesh's data x fsdp = "
            f"{multiple} devices"
        )
    if config.batch_size % jax.process_count():
        raise ValueError(
            f"batch_size={config.batch_size} must divide over {jax.process_count()} processes"
        )


def eval_batch_size(config: Any, mesh: Mesh | None) -> int:
    """eval.batch_size rounded up to a multiple of the mesh's data x fsdp devices."""
    multiple = batch_multiple(mesh) if mesh is not None else 1
    return max(multiple, math.ceil(config.eval.batch_size / multiple) * multiple)


def load_examples(
    config: Any,
    tokenizer: PreTrainedTokenizerBase,
    path: str,
    data_format: str,
    *,
    shard: bool = False,
) -> tuple[Sequence[PreferenceExample], Any]:
    """The pairs at `path`, tokenised and truncated by config.data; with `shard`, only this
    process's share. Returns (examples, DataStats). With data.token_cache the examples are a
    memory-mapped TokenStore (flux_jax.data.token_cache), else a list tokenised in memory.
    data_format unpaired (KTO): a list of flux_jax.data.unpaired.UnpairedExample."""
    data = config.data
    settings = LoadSettings(
        data_format=data_format,
        max_length=data.max_length,
        max_prompt_length=data.max_prompt_length,
        drop_truncated=data.drop_truncated,
        on_bad_record=data.on_bad_record,
        max_record_bytes=data.max_record_bytes,
        process_index=jax.process_index() if shard else 0,
        process_count=jax.process_count() if shard else 1,
        columns=data.columns.to_dict(),
        tokenization=data.tokenization,
    )
    if data_format == UNPAIRED_FORMAT:
        if data.token_cache:  # the store holds pairs; said, not an error (results are equal)
            log.info("data.token_cache: unpaired (KTO) data %s is tokenised in memory", path)
        return load_unpaired_examples(path, tokenizer, settings)
    if data.token_cache:
        return load_cached_examples(
            path, tokenizer, settings, cache_dir=data.token_cache_dir, workers=data.tokenize_workers
        )
    return load_preference_examples(path, tokenizer, settings)


@dataclasses.dataclass(frozen=True)
class Reference:
    """What scoring pairs under the frozen reference takes: its weights and the LM-head chunk."""

    graphdef: Any
    params: Any
    chunk_size: int | None


def run_examples(
    config: Any,
    tokenizer: PreTrainedTokenizerBase,
    mesh: Mesh,
    sources: DataSources,
    reference: Reference | None,
) -> tuple[list[PreferenceExample], list[PreferenceExample] | None]:
    """This process's training pairs and all eval pairs; with algorithm.precompute_ref_logps,
    each carries its reference log-probs (computed with `reference`, or read from the cache)."""
    if sources.eval_path and sources.data_format == UNPAIRED_FORMAT:
        raise ValueError(
            f"evaluation on unpaired (KTO) data is not supported yet: train without eval data "
            f"(data.eval_path '', no eval_prompts; got {sources.eval_path})"
        )
    examples, stats = load_examples(
        config, tokenizer, sources.train_path, sources.data_format, shard=True
    )
    if stats.pairs_truncated or stats.bad_records or stats.shards_cut_short:
        log.warning("training data %s: %s", sources.train_path, stats.to_dict())
    eval_examples = None
    if sources.eval_path:
        eval_examples, _ = load_examples(config, tokenizer, sources.eval_path, sources.data_format)
    if config.algorithm.precompute_ref_logps:
        if reference is None:
            raise ValueError("algorithm.precompute_ref_logps needs the reference model")
        add = _ref_logps_adder(config, tokenizer, mesh, sources.data_format, reference)
        examples = add(examples, sources.train_path)
        if eval_examples is not None and sources.eval_path:
            eval_examples = add(eval_examples, sources.eval_path)
    return examples, eval_examples


def _ref_logps_adder(
    config: Any,
    tokenizer: PreTrainedTokenizerBase,
    mesh: Mesh,
    data_format: str,
    reference: Reference,
) -> Callable[[list[PreferenceExample], str], list[PreferenceExample]]:
    """`add(examples, data_path)`: the examples with their cached or computed ref log-probs."""
    model_source = (
        config.model_path if is_builtin(config.model_path) else resolve_model_dir(config.model_path)
    )
    settings = {  # everything that changes the tokens or the numbers: part of the cache key
        "format": data_format,
        "max_length": config.data.max_length,
        "max_prompt_length": config.data.max_prompt_length,
        "drop_truncated": config.data.drop_truncated,
        "compute_dtype": config.model.compute_dtype,
        "tokenizer": tokenizer.name_or_path,
        "vocab": len(tokenizer),
    }
    if any(config.data.columns.to_dict().values()):  # (absent by default: older keys still hit)
        settings["columns"] = config.data.columns.to_dict()
    if config.data.tokenization != "separate":  # other token ids (the default keeps old keys)
        settings["tokenization"] = config.data.tokenization
    lora = config.model.lora
    if lora.rank and lora.base_quantization != "none":
        # A QLoRA run's reference is its quantised base: other numbers than the checkpoint's
        # (keys of unquantised runs are unchanged).
        settings["base_quantization"] = f"{lora.base_quantization}/{lora.quantization_block}"
    step = ts.make_ref_logps_step(reference.graphdef, reference.chunk_size)
    single_process = jax.process_count() == 1
    local_batch = max(1, config.eval.batch_size // jax.process_count())
    buckets = (
        train_batches.bucket_ladder(config.data) if single_process else (config.data.max_length,)
    )

    def add(examples: list[PreferenceExample], data_path: str) -> list[PreferenceExample]:
        key = ref_logps.cache_key(
            ref_logps.model_fingerprint(model_source, config.seed),
            ref_logps.data_fingerprint(data_path),
            settings,
        )

        def compute() -> np.ndarray:
            return ref_logps.compute_ref_logps(
                examples,
                lambda host: local_rows(step(reference.params, shard_batch(host, mesh)), host),
                batch_size=local_batch,
                pad_id=pad_token_id(tokenizer),
                bucket_lengths=buckets,
                score_windows=single_process,
                # The prompt once per pair; the splash kernel cannot mask the branches.
                shared_prefix=single_process and config.model.attention != "splash",
            )

        values, source = ref_logps.load_or_compute(key, examples, compute)
        log.info("reference log-probs for %d pairs: %s (key %s)", len(examples), source, key)
        return ref_logps.attach_ref_logps(examples, values)

    return add


def data_iterator(
    config: Any,
    tokenizer: PreTrainedTokenizerBase,
    mesh: Mesh,
    examples: Sequence[PreferenceExample],
) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches (flux_jax.train_batches: layout, buckets, length grouping, and one
    batch shape on every process), as grain's resumable iterator."""
    counts = train_batches.gather_token_counts(train_batches.token_counts(examples))
    plan = train_batches.batch_plan(
        config,
        batch_multiple=batch_multiple(mesh),
        counts=counts,
        process_index=jax.process_index(),
        unpaired=is_unpaired(examples),  # fit(data_format=...) may differ from data.format
    )
    dataset = train_batches.training_batches(
        examples, plan, pad_id=pad_token_id(tokenizer), counts=counts
    )
    options = grain.ReadOptions(
        num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch
    )
    return iter(dataset.to_iter_dataset(options))


def local_rows(outputs: Sequence[Any], host_batch: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """This process's rows of per-pair outputs of a step fed with process-local batches.

    make_array_from_process_local_data lays process p's rows at [p * b, (p + 1) * b).
    """
    rows = len(next(iter(host_batch.values())))
    start = jax.process_index() * rows if jax.process_count() > 1 else 0
    return tuple(to_host(x)[start : start + rows] for x in outputs)
