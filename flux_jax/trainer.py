"""FluxTrainer: the DPO training loop behind the tutorial's API.

    trainer = FluxTrainer(FluxConfig.from_yaml("dpo-config.yaml"))
    result = trainer.fit(prompts="preferences.jsonl", data_format="preferences")

The trainer holds the policy (flux_jax.policy: model, tokenizer, mesh), the frozen reference and
the DPO settings (flux_jax.dpo); with algorithm.ref_sync (TR-DPO) the reference is part of the
train state and a hook moves it towards the policy every N steps (flux_jax.ref_sync). With LoRA
(model.lora.rank > 0, flux_jax.lora) the policy is a frozen base plus adapters, only the adapters
train, and the reference is that same base with the adapters off: no reference copy is made.
fit() sets up the data (flux_jax.train_data), the state and the parts built from the config
(flux_jax.run_parts: checkpointer, jitted step, metrics log), then runs the loop:
one jitted step per batch, and everything else as hooks with an interval (flux_jax.hooks): step
callbacks, eval, checkpoint saves, `best`.

Metrics reach the host one step late, so the host never blocks the device on a fresh step; but a
step's metrics are always finished before any hook sees its state, so the non-finite guard stops
the run before anything could evaluate or save a state after a bad step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from flux_jax import checkpoint as ckpt_lib
from flux_jax import optim, ref_sync, run_lock, run_parts, train_data
from flux_jax import train_step as ts
from flux_jax.adapter_checkpoint import BaseModel, check_matches
from flux_jax.best_checkpoint import BestTracker, load_params
from flux_jax.compile_cache import enable_compile_cache
from flux_jax.config import FluxConfig
from flux_jax.distributed import initialize_distributed, is_main_process
from flux_jax.dpo import DPOSettings, initial_loss_state
from flux_jax.hooks import Hooks, StepState
from flux_jax.lora import LoraSettings, init_adapters
from flux_jax.metrics_log import summarise
from flux_jax.model_setup import ModelOptions, load_model, load_tokenizer
from flux_jax.peft_io import load_peft_adapter_onto
from flux_jax.policy import Policy, as_reference
from flux_jax.preemption import install_preemption_handler
from flux_jax.run_files import check_resumable, checkpoint_metadata, write_run_files
from flux_jax.sharding import mesh_from_config, shard_batch, to_host
from flux_jax.sharding_check import check_sharding
from flux_jax.step_metrics import StepMetrics, StepResult
from flux_jax.trackers import check_tracker_packages, tracker_settings
from flux_jax.train_data import DEMO_EVAL, DEMO_TRAIN  # noqa: F401  (imported from here too)

PyTree = Any


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


class FluxTrainer:
    """DPO trainer for Qwen models. See the module docstring and README for the walkthrough."""

    def __init__(self, config: FluxConfig, *, mesh: jax.sharding.Mesh | None = None):
        self.config = config.validate() if isinstance(config, FluxConfig) else config
        # A tracker whose package is missing fails here, not after data loading and compiling.
        check_tracker_packages(tracker_settings(self.config.logging))
        initialize_distributed()
        # Before the first compile: JAX reads the cache settings once per process.
        enable_compile_cache(
            config.compile_cache.dir,
            min_compile_time_s=config.compile_cache.min_compile_time_s,
            enabled=config.compile_cache.enabled,
        )
        self.mesh = mesh or mesh_from_config(config.mesh)
        self.step_hooks: Hooks[StepResult] = Hooks()
        tokenizer = load_tokenizer(config.model_path, config.tokenizer_path)
        model = load_model(config.model_path, ModelOptions.from_config(config), self.mesh)
        self.policy = Policy.from_model(model, tokenizer, self.mesh, self.config)
        self.lora = LoraSettings.from_config(config.model.lora)
        if self.lora is not None:  # the loaded model is the frozen base; adapters are trained
            if config.model.lora.init_from:  # a PEFT adapter, e.g. from an SFT run
                adapters = load_peft_adapter_onto(
                    config.model.lora.init_from,
                    self.policy.params,
                    self.policy.model_config,
                    self.lora,
                )
            else:
                adapters = init_adapters(self.policy.params, self.lora, jax.random.key(config.seed))
            self.policy = self.policy.with_adapters(adapters, self.lora)
        self.settings = self.policy.dpo_settings()
        # The reference is the initial policy (None: reference-free, or freed once its log-probs
        # are precomputed); with LoRA it is the frozen base itself, adapters off: not a copy.
        self.ref_params: PyTree | None = None
        if not config.algorithm.reference_free:
            self.ref_params = (
                self.policy.params
                if self.lora is not None
                else as_reference(self.params, config.model.compute_dtype)
            )

    # The policy's parts, as attributes of the trainer (the tutorial's API).
    tokenizer = property(lambda self: self.policy.tokenizer)
    graphdef = property(lambda self: self.policy.graphdef)
    model = property(lambda self: self.policy.model)

    @property
    def params(self) -> PyTree:
        """The trained parameters: the policy's weights, or with LoRA its adapters (the frozen
        base is `base_params()`)."""
        return self.policy.trainable

    @params.setter
    def params(self, params: PyTree) -> None:
        self.policy = self.policy.with_trainable(params)

    # ------------------------------------------------------------------------------------------
    # Public API

    def add_step_callback(
        self, fn: Callable[[StepResult], Any], *, every: int = 1
    ) -> Callable[[StepResult], Any]:
        """Registers fn(result) to be called after every step (or every `every` steps and the
        last one); usable as a decorator."""
        return self.step_hooks.add(fn, every=every)

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
        sources = train_data.data_sources(cfg, prompts, data_format, eval_prompts)
        train_data.check_batch_shape(cfg, self.mesh)
        output_dir = os.path.abspath(cfg.output_dir)
        # Held before anything is written to output_dir (config.yaml, checkpoints, metrics).
        with run_lock.hold_output_dir(
            output_dir, is_main=is_main_process(), process_count=jax.process_count()
        ):
            examples, eval_examples = train_data.run_examples(
                cfg, self.tokenizer, self.mesh, sources, self._reference()
            )
            if cfg.algorithm.precompute_ref_logps:
                self.ref_params = None  # no reference forward is left to run: free its memory
            run = _Run(cfg, self.policy, self.ref_params, self.settings, self.step_hooks)
            result, params = run.train(output_dir, examples, eval_examples)
        self.params = params
        if run.final_reference is not None:  # TR-DPO: the reference the run ended with
            self.ref_params = run.final_reference
        return result

    def evaluate(self, path: str, data_format: str | None = None) -> dict[str, float]:
        """DPO loss and reward metrics of the current policy on every pair at `path`."""
        if self.ref_params is None and not self.settings.reference_free:
            self.ref_params = self.base_params()  # freed after precomputing: reload for eval
        return self.policy.evaluate_file(
            path, data_format, reference=self.ref_params, settings=self.settings
        )

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Loads the parameters (with LoRA: the adapters) of a checkpoint (`output_dir/best`, or
        a step directory) and returns its metadata. A LoRA checkpoint must match this trainer's
        LoRA settings and base weights (a clear ValueError otherwise)."""
        meta = ckpt_lib.read_metadata(path)
        cfg = self.config
        base = BaseModel.of(cfg.model_path, cfg.seed, cfg.model.lora) if self.lora else None
        check_matches(meta, path, settings=self.lora, base=base, action="load")
        self.params = load_params(path, ckpt_lib.abstract_of(self.params))
        return meta

    def export(self, out_dir: str, *, dtype: str | None = None) -> str:
        """Writes the current policy as a Hugging Face model directory (with tokenizer files)."""
        return self.policy.export(out_dir, dtype=dtype)

    def generate(self, prompts: str | list[str], **sampling: Any) -> str | list[str]:
        """Completions of the current policy; sampling defaults come from config.generation."""
        return self.policy.generate(prompts, **sampling)

    def base_params(self) -> dict[str, Any]:
        """The parameters the run started from (the reference), e.g. to compare generations."""
        if self.ref_params is not None:
            return self.ref_params
        return self.policy.base_params(purpose="base_params()")

    def _reference(self) -> train_data.Reference | None:
        if self.ref_params is None:
            return None
        return train_data.Reference(
            self.graphdef, self.ref_params, self.settings.logprob_chunk_size
        )


class _Run:
    """One call of fit(): the state, the checkpointer, the metric sinks, the hooks and the loop.

    Given the trainer's policy, reference, settings and step callbacks; it returns the final
    parameters and never touches the trainer.
    """

    def __init__(
        self,
        config: FluxConfig,
        policy: Policy,
        ref_params: PyTree | None,
        settings: DPOSettings,
        step_hooks: Hooks[StepResult],
    ):
        self.cfg, self.policy, self.ref_params = config, policy, ref_params
        self.settings, self.step_hooks = settings, step_hooks
        self.main = is_main_process()
        # TR-DPO (flux_jax.ref_sync): the reference is updated during the run, so it is part of
        # the train state (read by the step, saved in every checkpoint: resume is exact).
        self.syncs_reference = config.algorithm.ref_sync.every_steps > 0
        self.final_reference: PyTree | None = None

    # -- the run, top down -------------------------------------------------------------------

    def train(
        self, output_dir: str, examples: list, eval_examples: list | None
    ) -> tuple[FitResult, PyTree]:
        """Sets up the run, runs the loop, and returns its result and final parameters."""
        cfg, policy = self.cfg, self.policy
        self.output_dir, self.eval_examples, self.eval_metrics = output_dir, eval_examples, None
        self.iterator = train_data.data_iterator(cfg, policy.tokenizer, policy.mesh, examples)
        tx, schedule = optim.from_config(cfg)
        # + BCO's running mean when selected: checkpointed and restored with the rest.
        state = ts.init_train_state(policy.trainable, tx, initial_loss_state(self.settings))
        # LoRA: the step's frozen argument is the base (also the online reference); the big
        # arrays to check are the base's; the adapters and their moments are reported only.
        self.frozen = policy.params if policy.lora is not None else self.ref_params
        self.base_model = None
        if policy.lora is None:
            check_sharding(state, policy.mesh, reference=self.ref_params)
        else:
            check_sharding({"params": policy.params, "adapters": state}, policy.mesh)
            self.base_model = BaseModel.of(cfg.model_path, cfg.seed, cfg.model.lora)
        if self.syncs_reference:  # donated to the first step: the state now owns it
            state[ref_sync.STATE_KEY], self.frozen = self.ref_params, None
        self.checkpointer = run_parts.train_checkpointer(cfg, output_dir)
        resumed_from, state = self._restore(state, self.iterator)
        self.best = BestTracker(
            os.path.join(output_dir, "best"), has_eval=eval_examples is not None
        )
        start = int(to_host(state["step"]))
        step_fn = run_parts.train_step_fn(cfg, policy, tx, schedule, self.settings, state)
        self.mlog = run_parts.metrics_log(cfg, output_dir, start, self.main)
        if resumed_from is not None:
            self.mlog.message(f"resumed from {self.checkpointer.directory} step {resumed_from}")
        if self.main:
            write_run_files(self.cfg, self.output_dir, self.policy)
        self.metadata = checkpoint_metadata(self.cfg, self.output_dir, self.policy, self.base_model)
        self.steps = StepMetrics(cfg, self.checkpointer, self.mlog, self.step_hooks)
        hooks = self._state_hooks(has_eval=eval_examples is not None)
        t0 = time.perf_counter()
        is_preempted = install_preemption_handler()
        try:
            state, preempted = self._loop(state, step_fn, hooks, is_preempted)
        finally:
            is_preempted.uninstall()
            try:  # close() waits for the last save and raises its error (e.g. disk full)
                self.checkpointer.close()
            finally:
                self.mlog.close()
        result = self._result(state, preempted, resumed_from, time.perf_counter() - t0)
        self.final_reference = state.get(ref_sync.STATE_KEY)
        return result, state["params"]

    def _loop(
        self,
        state: dict[str, Any],
        step_fn: Callable[..., Any],
        hooks: Hooks[StepState],
        is_preempted: Callable[[int], bool],
    ) -> tuple[dict[str, Any], bool]:
        """One jitted step per batch, then the hooks that are due. Returns the last state and
        whether SIGTERM stopped the run."""
        last, mesh, steps = self.cfg.num_steps, self.policy.mesh, self.steps
        preempted = False
        for step in range(int(to_host(state["step"])) + 1, last + 1):
            batch = shard_batch(next(self.iterator), mesh)
            state, metrics = step_fn(state, batch, self.frozen)
            steps.push(step, metrics)  # finishes step - 1: the device is already busy with `step`
            preempted = is_preempted(step)  # every process, every step (multi-host sync)
            due = hooks.due(step, last, stopping=preempted)
            if due:
                steps.flush()  # the guard sees `step` before any hook evaluates or saves it
                for hook in due:
                    hook.fn(StepState(step, state))
            if preempted:
                self.mlog.message(f"SIGTERM: checkpoint saved at step {step}; stopping")
                break
        steps.flush()
        return state, preempted

    # -- hooks on the fresh state ------------------------------------------------------------

    def _evaluate(self, event: StepState) -> None:
        policy = self.policy.with_trainable(event.state["params"])
        reference = event.state.get(ref_sync.STATE_KEY, self.ref_params)  # TR-DPO: the current
        metrics = policy.evaluate(self.eval_examples, reference=reference, settings=self.settings)
        self.eval_metrics = metrics
        self.mlog.eval_step(event.step, metrics)
        self.best.offer(event.step, metrics["loss"], event.state["params"], self.metadata)

    def _save(self, event: StepState) -> None:
        step, state = event.step, event.state
        saved = self.checkpointer.save(
            step, state, data_iterator=self.iterator, metadata=self.metadata, force=True
        )
        if saved:
            self.steps.guard.last_good_checkpoint = self.checkpointer.step_dir(step)
        window = self.steps.loss_window
        if self.eval_examples is None and window:  # no eval data: `best` by train loss
            self.best.offer(step, float(np.mean(window)), state["params"], self.metadata)
        window.clear()

    # -- set-up and result -------------------------------------------------------------------

    def _state_hooks(self, has_eval: bool) -> Hooks[StepState]:
        """TR-DPO's reference update (algorithm.ref_sync.every_steps), eval (eval.every_steps
        and the last step), then the checkpoint save (every checkpoint.save_steps, the last step,
        and on SIGTERM): the eval and the checkpoint of a step see its updated reference."""
        hooks: Hooks[StepState] = Hooks()
        sync = self.cfg.algorithm.ref_sync
        if sync.every_steps > 0:
            hooks.add(
                ref_sync.sync_reference_hook(sync.mixup_alpha),
                every=sync.every_steps,
                at_last=False,  # as TRL: on multiples of every_steps only
            )
        if has_eval:
            hooks.add(self._evaluate, every=self.cfg.eval.every_steps)
        hooks.add(self._save, every=self.cfg.checkpoint.save_steps, on_stop=True)
        return hooks

    def _restore(self, state: dict[str, Any], iterator: Any) -> tuple[int | None, dict[str, Any]]:
        """The newest step that restores (damaged newer ones are set aside), else `state`."""
        if self.cfg.checkpoint.resume:
            check_resumable(
                self.checkpointer, self.policy.lora, self.base_model, self.syncs_reference
            )
            restored = self.checkpointer.restore_latest(
                ckpt_lib.abstract_of(state), data_iterator=iterator
            )
            if restored is not None:
                return restored
        return None, state

    def _result(
        self, state: dict[str, Any], preempted: bool, resumed_from: int | None, wall_s: float
    ) -> FitResult:
        history = self.steps.history
        if self.main:
            print(summarise(history, wall_s), flush=True)
            if self.steps.divergence.warned:  # said once mid-run; repeated where it is read
                print(f"WARNING: {self.steps.divergence.message}", flush=True)
        finite_losses = [h["loss"] for h in history if math.isfinite(h["loss"])]
        return FitResult(
            final_loss=finite_losses[-1] if finite_losses else float("nan"),
            num_steps=int(to_host(state["step"])),
            history=history,
            best_checkpoint=self.best.path if self.best.saved else None,
            output_dir=self.output_dir,
            eval_metrics=self.eval_metrics,
            preempted=preempted,
            resumed_from=resumed_from,
        )
