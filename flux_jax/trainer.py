"""FluxTrainer: the DPO training loop behind the tutorial's API.

    trainer = FluxTrainer(FluxConfig.from_yaml("dpo-config.yaml"))
    result = trainer.fit(prompts="preferences.jsonl", data_format="preferences")

The trainer owns the run: the mesh, the tokenizer, the policy and the frozen reference, the data
iterator, the jitted step, checkpoints (resume, best), periodic eval, metrics sinks and callbacks.
The math lives in train_step.py / dpo.py; the pieces of the loop live in their own modules.
Metrics reach callbacks one step late, so the host never blocks the device on a fresh step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_jax import checkpoint as ckpt_lib
from flux_jax import logprobs, optim, ref_logps, run_lock, train_batches
from flux_jax import train_step as ts
from flux_jax.compile_cache import enable_compile_cache
from flux_jax.config import FluxConfig
from flux_jax.data import load_preference_examples
from flux_jax.data.pipeline import pad_token_id
from flux_jax.distributed import initialize_distributed, is_main_process
from flux_jax.metrics_log import MetricsLog, summarise
from flux_jax.model_assets import MODEL_ASSETS_DIR, save_model_assets
from flux_jax.model_setup import (
    ModelOptions,
    is_builtin,
    load_model,
    load_tokenizer,
    resolve_model_dir,
)
from flux_jax.preference_eval import evaluate_examples
from flux_jax.sharding import check_sharding, mesh_from_config, to_host
from flux_jax.training_health import DivergenceWatch, NonFiniteGuard

log = logging.getLogger(__name__)

DEMO_TRAIN = os.path.join(os.path.dirname(__file__), "assets", "demo_preferences.jsonl")
DEMO_EVAL = os.path.join(os.path.dirname(__file__), "assets", "demo_eval_preferences.jsonl")


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What a step callback receives: the 1-based step number and its metrics as floats."""

    step: int
    metrics: dict[str, float]


@dataclasses.dataclass
class FitResult:
    final_loss: float
    num_steps: int
    history: list[dict[str, float]]
    best_checkpoint: str | None
    output_dir: str
    eval_metrics: dict[str, float] | None = None
    preempted: bool = False
    resumed_from: int | None = None


def _to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(to_host(v)) for k, v in metrics.items()}


class FluxTrainer:
    """DPO trainer for Qwen models. See the module docstring and README for the walkthrough."""

    def __init__(self, config: FluxConfig, *, mesh: jax.sharding.Mesh | None = None):
        self.config = config.validate() if isinstance(config, FluxConfig) else config
        initialize_distributed()
        # Before the first compile: JAX reads the cache settings once per process.
        enable_compile_cache(
            config.compile_cache.dir,
            min_compile_time_s=config.compile_cache.min_compile_time_s,
            enabled=config.compile_cache.enabled,
        )
        self.mesh = mesh or mesh_from_config(config.mesh)
        self._callbacks: list[Callable[[StepResult], Any]] = []
        self.tokenizer = load_tokenizer(config.model_path, config.tokenizer_path)
        self.model = load_model(config.model_path, ModelOptions.from_config(config), self.mesh)
        self._check_vocab()
        self.graphdef, self.params = ts.split_model(self.model)
        self.settings = ts.DPOSettings(
            loss_type=config.algorithm.loss_type,
            beta=config.algorithm.beta,
            label_smoothing=config.algorithm.label_smoothing,
            reference_free=config.algorithm.reference_free,
            sft_coef=config.algorithm.sft_coef,
            kl_coef=config.algorithm.kl_coef,
            logprob_chunk_size=self._logprob_chunk_size(),
            grad_accum_steps=config.grad_accum_steps,
        )
        # The reference is the initial policy, kept in the compute dtype (bf16 halves its memory).
        self.ref_params = None
        if not config.algorithm.reference_free:
            dtype = jnp.dtype(config.model.compute_dtype)
            self.ref_params = jax.tree.map(lambda x: jnp.copy(x.astype(dtype)), self.params)
        self._eval_step = None

    def _logprob_chunk_size(self) -> int | None:
        """model.logprob_chunk_size, capped so one chunk's logits fit model.logprob_chunk_mib."""
        cfg, shape = self.config, self.mesh.shape
        rows = 2 * cfg.batch_size // cfg.grad_accum_steps  # chosen + rejected rows per micro-batch
        return logprobs.capped_chunk_size(
            cfg.model.logprob_chunk_size or None,
            rows_per_device=-(-rows // (shape["data"] * shape["fsdp"])),
            vocab_per_device=-(-self.model.config.vocab_size // shape["tensor"]),
            max_chunk_mib=cfg.model.logprob_chunk_mib,
        )

    # ------------------------------------------------------------------------------------------
    # Public API

    def add_step_callback(self, fn: Callable[[StepResult], Any]) -> Callable[[StepResult], Any]:
        """Registers fn(result) to be called after every step; usable as a decorator."""
        self._callbacks.append(fn)
        return fn

    def fit(
        self,
        prompts: str | None = None,
        data_format: str | None = None,
        eval_prompts: str | None = None,
    ) -> FitResult:
        """Trains for config.num_steps on the pairs at `prompts` and returns the result.

        Args:
          prompts: training pairs (.jsonl, .jsonl.gz, a directory or glob of shards); default
            config.data.train_path, else the bundled demo pairs.
          data_format: "preferences" or "conversational" (default config.data.format).
          eval_prompts: held-out pairs for periodic eval and the choice of `best`; default
            config.data.eval_path (for the bundled demo data, its bundled eval split).
        """
        cfg = self.config
        train_path = prompts or cfg.data.train_path or DEMO_TRAIN
        eval_path = (
            eval_prompts or cfg.data.eval_path or (DEMO_EVAL if train_path == DEMO_TRAIN else None)
        )
        data_format = data_format or cfg.data.format
        run = _Run(self, train_path, eval_path, data_format)
        # Held before anything is written to output_dir (config.yaml, checkpoints, metrics).
        with run_lock.hold_output_dir(
            run.output_dir, is_main=run.main, process_count=jax.process_count()
        ):
            return run.train()

    def evaluate(self, path: str, data_format: str | None = None) -> dict[str, float]:
        """DPO loss and reward metrics of the current policy on every pair at `path`."""
        examples, stats = self._load_examples(path, data_format or self.config.data.format)
        if self.ref_params is None and not self.settings.reference_free:
            self.ref_params = self.base_params()  # freed after precomputing: reload for eval
        metrics = self._evaluate_examples(self.params, examples)
        return metrics | {"pairs_truncated": float(stats.pairs_truncated)}

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Loads the parameters of a checkpoint (`output_dir/best`, or a step directory)."""
        self.params = ckpt_lib.load_params(path, ckpt_lib.abstract_of(self.params))
        self.model = nnx.merge(self.graphdef, self.params)
        return ckpt_lib.read_metadata(path)

    def export(self, out_dir: str, *, dtype: str | None = None) -> str:
        """Writes the current policy as a Hugging Face model directory (with tokenizer files)."""
        from flux_jax.hf_io import save_pretrained

        model = nnx.merge(self.graphdef, self.params)
        source = (
            None
            if is_builtin(self.config.model_path)
            else resolve_model_dir(self.config.tokenizer_path or self.config.model_path)
        )
        out = save_pretrained(model, out_dir, tokenizer_from=source, dtype=dtype)
        if source is None and is_main_process():
            self.tokenizer.save_pretrained(out_dir)
        return out

    def generate(self, prompts: str | list[str], **sampling: Any) -> str | list[str]:
        """Completions of the current policy; sampling defaults come from config.generation."""
        from flux_jax.generation import generate_text

        options = {**self.config.generation.to_dict(), **sampling}
        model = nnx.merge(self.graphdef, self.params)
        return generate_text(model, self.tokenizer, prompts, mesh=self.mesh, **options)

    def base_params(self) -> dict[str, Any]:
        """The parameters the run started from (the reference), e.g. to compare generations."""
        if self.ref_params is not None:
            return self.ref_params
        base = load_model(self.config.model_path, ModelOptions.from_config(self.config), self.mesh)
        return ts.split_model(base)[1]

    # ------------------------------------------------------------------------------------------
    # Shared pieces

    def _check_vocab(self) -> None:
        vocab = self.model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is "
                f"{vocab}: token ids would index past the embedding"
            )

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        """data.bucket_lengths, else the data.bucket_ratio ladder (flux_jax.train_batches)."""
        return train_batches.bucket_ladder(self.config.data)

    def _load_examples(self, path: str, data_format: str, *, shard: bool = False):
        cfg = self.config.data
        examples, stats = load_preference_examples(
            path,
            self.tokenizer,
            data_format=data_format,
            max_length=cfg.max_length,
            max_prompt_length=cfg.max_prompt_length,
            drop_truncated=cfg.drop_truncated,
            on_bad_record=cfg.on_bad_record,
            max_record_bytes=cfg.max_record_bytes,
            process_index=jax.process_index() if shard else 0,
            process_count=jax.process_count() if shard else 1,
        )
        return examples, stats

    def _batch_multiple(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _evaluate_examples(self, params, examples) -> dict[str, float]:
        """DPO metrics over every pair (flux_jax.preference_eval), against the reference."""
        multiple = self._batch_multiple()
        batch_size = max(multiple, math.ceil(self.config.eval.batch_size / multiple) * multiple)
        if self.config.eval.max_batches:
            examples = examples[: self.config.eval.max_batches * batch_size]
        return evaluate_examples(
            self.graphdef,
            params,
            self.ref_params,
            examples,
            pad_id=pad_token_id(self.tokenizer),
            bucket_lengths=self.bucket_lengths,
            batch_size=batch_size,
            loss_type=self.settings.loss_type,
            beta=self.settings.beta,
            label_smoothing=self.settings.label_smoothing,
            reference_free=self.settings.reference_free,
            logprob_chunk_size=self.settings.logprob_chunk_size,
            mesh=self.mesh,
        )


class _Run:
    """One call of fit(): data, state, checkpoints and the loop."""

    def __init__(self, trainer: FluxTrainer, train_path: str, eval_path: str | None, fmt: str):
        self.t = trainer
        self.cfg = trainer.config
        self.train_path, self.eval_path, self.data_format = train_path, eval_path, fmt
        self.output_dir = os.path.abspath(self.cfg.output_dir)
        self.main = is_main_process()
        self._check_batch_shape()

    def _check_batch_shape(self) -> None:
        cfg, multiple = self.cfg, self.t._batch_multiple()
        micro = cfg.batch_size // cfg.grad_accum_steps
        if micro % multiple:
            raise ValueError(
                f"batch_size / grad_accum_steps = {cfg.batch_size} / {cfg.grad_accum_steps} = "
                f"{micro} pairs per micro-batch must divide evenly over the mesh's data x fsdp = "
                f"{multiple} devices"
            )
        if cfg.batch_size % jax.process_count():
            raise ValueError(
                f"batch_size={cfg.batch_size} must divide over {jax.process_count()} processes"
            )

    # -- set-up --------------------------------------------------------------------------------

    def _examples(self):
        """This process's training pairs and all eval pairs, with reference log-probs if asked."""
        examples, stats = self.t._load_examples(self.train_path, self.data_format, shard=True)
        if stats.pairs_truncated or stats.bad_records or stats.shards_cut_short:
            log.warning("training data %s: %s", self.train_path, stats.to_dict())
        self.data_stats = stats
        eval_examples = None
        if self.eval_path:
            eval_examples, _ = self.t._load_examples(self.eval_path, self.data_format)
        if self.cfg.algorithm.precompute_ref_logps:
            examples = self._with_ref_logps(examples, self.train_path)
            if eval_examples is not None:
                eval_examples = self._with_ref_logps(eval_examples, self.eval_path)
            self.t.ref_params = None  # no reference forward is left to run: free its memory
        return examples, eval_examples

    def _with_ref_logps(self, examples, data_path: str):
        t, cfg = self.t, self.cfg
        model_source = (
            cfg.model_path if is_builtin(cfg.model_path) else resolve_model_dir(cfg.model_path)
        )
        settings = {
            "format": self.data_format,
            "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.data.max_prompt_length,
            "drop_truncated": cfg.data.drop_truncated,
            "compute_dtype": cfg.model.compute_dtype,
            "tokenizer": t.tokenizer.name_or_path,
            "vocab": len(t.tokenizer),
        }
        key = ref_logps.cache_key(
            ref_logps.model_fingerprint(model_source, cfg.seed),
            ref_logps.data_fingerprint(data_path),
            settings,
        )
        step = ts.make_ref_logps_step(t.graphdef, t.settings.logprob_chunk_size)
        local_batch = max(1, cfg.eval.batch_size // jax.process_count())
        buckets = t.bucket_lengths if jax.process_count() == 1 else (cfg.data.max_length,)

        def compute():
            return ref_logps.compute_ref_logps(
                examples,
                lambda host: _local_rows(step(t.ref_params, ts.shard_batch(host, t.mesh)), host),
                batch_size=local_batch,
                pad_id=pad_token_id(t.tokenizer),
                bucket_lengths=buckets,
                score_windows=jax.process_count() == 1,
            )

        values, source = ref_logps.load_or_compute(key, examples, compute)
        log.info("reference log-probs for %d pairs: %s (key %s)", len(examples), source, key)
        self.ref_source = source
        return ref_logps.attach_ref_logps(examples, values)

    def _data_iterator(self, examples):
        """This process's batches (flux_jax.train_batches: layout, buckets, length grouping, and
        one batch shape on every process), as grain's resumable iterator."""
        cfg = self.cfg
        counts = train_batches.gather_token_counts(train_batches.token_counts(examples))
        plan = train_batches.batch_plan(
            cfg,
            batch_multiple=self.t._batch_multiple(),
            counts=counts,
            process_index=jax.process_index(),
        )
        dataset = train_batches.training_batches(
            examples, plan, pad_id=pad_token_id(self.t.tokenizer), counts=counts
        )
        options = grain.ReadOptions(
            num_threads=cfg.data.num_threads, prefetch_buffer_size=cfg.data.prefetch
        )
        return iter(dataset.to_iter_dataset(options))

    def _optimizer(self):
        cfg, opt = self.cfg, self.cfg.optimizer
        common = dict(
            learning_rate=cfg.learning_rate,
            num_steps=cfg.num_steps,
            warmup_steps=opt.warmup_steps,
            schedule=opt.schedule,
            min_lr_ratio=opt.min_lr_ratio,
        )
        tx = optim.make_optimizer(
            **common,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            max_grad_norm=opt.max_grad_norm or None,
        )
        return tx, optim.make_schedule(**common)

    def _metadata(self) -> dict[str, Any]:
        return {
            "model_path": self.cfg.model_path,
            "tokenizer_path": self.cfg.tokenizer_path or self.cfg.model_path,
            "hf_config": self.t.model.config.to_hf_config(),
            "flux_config": self.cfg.to_dict(),
            # Stored relative to each checkpoint (checkpoint.py): a moved output_dir still works.
            ckpt_lib.MODEL_ASSETS_KEY: os.path.join(self.output_dir, MODEL_ASSETS_DIR),
        }

    def _health_checks(self, checkpointer) -> tuple[NonFiniteGuard, DivergenceWatch]:
        """The non-finite policy and the divergence warning of this run (training_health)."""
        training = self.cfg.training
        latest = checkpointer.latest_step()
        guard = NonFiniteGuard(
            policy=training.on_nonfinite,
            max_consecutive_skips=training.max_consecutive_skips,
            last_good_checkpoint=checkpointer.step_dir(latest) if latest is not None else None,
        )
        divergence = DivergenceWatch(
            factor=training.divergence_factor,
            window=training.divergence_window,
            learning_rate=self.cfg.learning_rate,
        )
        return guard, divergence

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> FitResult:
        t, cfg = self.t, self.cfg
        self.ref_source = None
        examples, eval_examples = self._examples()
        iterator = self._data_iterator(examples)
        tx, schedule = self._optimizer()
        state = ts.init_train_state(t.params, tx)
        check_sharding(state, t.mesh, reference=t.ref_params)
        checkpointer = ckpt_lib.TrainCheckpointer(
            os.path.join(self.output_dir, "checkpoints"),
            max_to_keep=cfg.checkpoint.max_to_keep,
            save_interval_steps=cfg.checkpoint.save_steps,
            async_save=cfg.checkpoint.async_save,
        )
        resumed_from = None
        if cfg.checkpoint.resume:  # the newest step that restores; damaged newer ones set aside
            restored = checkpointer.restore_latest(
                ckpt_lib.abstract_of(state), data_iterator=iterator
            )
            if restored is not None:
                resumed_from, state = restored
        best_dir = os.path.join(self.output_dir, "best")
        best = _BestTracker(best_dir, has_eval=eval_examples is not None)
        start = int(to_host(state["step"]))
        step_fn = ts.make_train_step(
            t.graphdef, tx, schedule, t.settings, state_shardings=ts.state_shardings_of(state)
        )
        mlog = MetricsLog(
            self.output_dir,
            num_steps=cfg.num_steps,
            start_step=start,
            every_steps=cfg.logging.every_steps,
            tensorboard=cfg.logging.tensorboard,
            progress_bar=cfg.logging.progress_bar,
            enabled=self.main,
        )
        if resumed_from is not None:
            mlog.message(f"resumed from {checkpointer.directory} step {resumed_from}")
        if self.main:
            os.makedirs(self.output_dir, exist_ok=True)
            cfg.to_yaml(os.path.join(self.output_dir, "config.yaml"))
            save_model_assets(
                self.output_dir,
                hf_config=t.model.config.to_hf_config(),
                tokenizer=t.tokenizer,
                model_path=cfg.model_path,
                tokenizer_path=cfg.tokenizer_path,
            )
        is_preempted = ckpt_lib.install_preemption_handler()
        history: list[dict[str, float]] = []
        eval_metrics = None
        pending = None
        window: list[float] = []
        t0 = last_time = time.perf_counter()
        preempted = False
        guard, divergence = self._health_checks(checkpointer)

        def finish_step(step: int, device_metrics) -> None:
            """Metrics of `step` to the host, the sinks and callbacks. Runs before any eval or
            save of a state at or after `step`, so a non-finite step stops the run first."""
            nonlocal last_time
            metrics = _to_floats(device_metrics)
            now = time.perf_counter()
            metrics["step_time_s"] = now - last_time
            metrics["tokens_per_s"] = metrics["tokens"] / max(now - last_time, 1e-9)
            last_time = now
            try:
                guard.observe(step, metrics)
            finally:  # the step that stops the run is logged too
                history.append(metrics)
                if math.isfinite(metrics["loss"]):
                    window.append(metrics["loss"])
                mlog.train_step(step, metrics)
            if warning := divergence.observe(step, metrics["loss"]):
                log.warning(warning)
            result = StepResult(step=step, metrics=metrics)
            for callback in t._callbacks:
                callback(result)

        try:
            for step in range(start + 1, cfg.num_steps + 1):
                host_batch = next(iterator)
                state, metrics = step_fn(state, ts.shard_batch(host_batch, t.mesh), t.ref_params)
                if pending is not None:  # one step late: the device is already busy with `step`
                    finish_step(*pending)
                pending = (step, metrics)
                is_last = step == cfg.num_steps
                eval_due = eval_examples is not None and (
                    is_last or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0)
                )
                save_due = step % cfg.checkpoint.save_steps == 0 or is_last
                preempted = is_preempted(step)  # every process, every step (multi-host sync)
                if eval_due or save_due or preempted:
                    finish_step(*pending)
                    pending = None
                if eval_due:
                    eval_metrics = t._evaluate_examples(state["params"], eval_examples)
                    mlog.eval_step(step, eval_metrics)
                    best.offer(step, eval_metrics["loss"], state["params"], self._metadata())
                if save_due or preempted:
                    if checkpointer.save(
                        step, state, data_iterator=iterator, metadata=self._metadata(), force=True
                    ):
                        guard.last_good_checkpoint = checkpointer.step_dir(step)
                    if eval_examples is None and window:
                        best.offer(step, float(np.mean(window)), state["params"], self._metadata())
                    window.clear()
                if preempted:
                    mlog.message(f"SIGTERM: checkpoint saved at step {step}; stopping")
                    break
            if pending is not None:
                finish_step(*pending)
        finally:
            is_preempted.uninstall()
            try:  # close() waits for the last save and raises its error (e.g. disk full)
                checkpointer.close()
            finally:
                mlog.close()
        t.params = state["params"]
        t.model = nnx.merge(t.graphdef, t.params)
        if self.main:
            mlog_summary = summarise(history, time.perf_counter() - t0)
            print(mlog_summary, flush=True)
            if divergence.warned:  # said once mid-run; repeated where the run's outcome is read
                print(f"WARNING: {divergence.message}", flush=True)
        finite_losses = [h["loss"] for h in history if math.isfinite(h["loss"])]
        final_loss = finite_losses[-1] if finite_losses else float("nan")
        return FitResult(
            final_loss=final_loss,
            num_steps=int(to_host(state["step"])),
            history=history,
            best_checkpoint=best.path if best.saved else None,
            output_dir=self.output_dir,
            eval_metrics=eval_metrics,
            preempted=preempted,
            resumed_from=resumed_from,
        )


def _local_rows(outputs, host_batch) -> tuple[np.ndarray, ...]:
    """This process's rows of per-pair outputs of a step fed with process-local batches.

    make_array_from_process_local_data lays process p's rows at [p * b, (p + 1) * b).
    """
    rows = len(next(iter(host_batch.values())))
    start = jax.process_index() * rows if jax.process_count() > 1 else 0
    return tuple(to_host(x)[start : start + rows] for x in outputs)


class _BestTracker:
    """Keeps output_dir/best: the parameters with the lowest eval (else windowed train) loss."""

    def __init__(self, path: str, *, has_eval: bool):
        self.path = path
        self.metric_name = "eval_loss" if has_eval else "train_loss"
        self.value = math.inf
        self.saved = False
        if os.path.isdir(path):  # a resumed run continues the comparison
            meta = ckpt_lib.read_metadata(path)
            if meta.get("metric_name") == self.metric_name:
                self.value = float(meta.get("metric_value", math.inf))
                self.saved = True

    def offer(self, step: int, value: float, params, metadata: dict[str, Any]) -> None:
        if not value < self.value:
            return
        ckpt_lib.save_best(
            self.path,
            step,
            params,
            metric_name=self.metric_name,
            metric_value=value,
            metadata=metadata,
        )
        self.value, self.saved = value, True
