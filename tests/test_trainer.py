"""FluxTrainer end to end on the built-in tiny model and the bundled demo pairs (CPU, fp32)."""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pytest

from flux_jax import FluxConfig, FluxTrainer
from flux_jax.demo import demo_config


def _config(tmp_path, **overrides) -> FluxConfig:
    config = demo_config()
    config.output_dir = str(tmp_path / "run")
    config.num_steps = 8
    config.checkpoint.save_steps = 4
    config.eval.every_steps = 4
    config.logging.progress_bar = False
    config.logging.every_steps = 1
    config.data.max_length = 64
    config.data.max_prompt_length = 32
    config.apply_overrides([f"{k}={v}" for k, v in overrides.items()])
    return config.validate()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    trainer = FluxTrainer(_config(tmp))
    seen = []

    @trainer.add_step_callback
    def record(result):
        seen.append((result.step, dict(result.metrics)))

    every_3 = _INTERVAL_HOOK_STEPS
    trainer.add_step_callback(lambda result: every_3.append(result.step), every=3)
    result = trainer.fit()
    return trainer, result, seen


_INTERVAL_HOOK_STEPS: list[int] = []  # the steps a callback added with every=3 saw in `fitted`


def test_step_callback_with_an_interval(fitted):
    assert _INTERVAL_HOOK_STEPS == [3, 6, 8]  # every 3 steps, and the last one


def test_callbacks_metrics_jsonl_and_tensorboard(fitted):
    trainer, result, seen = fitted
    assert [step for step, _ in seen] == list(range(1, 9))
    for _, metrics in seen:
        for key in (
            "loss",
            "chosen_reward",
            "rejected_reward",
            "reward_margin",
            "reward_accuracy",
            "chosen_logps",
            "rejected_logps",
            "grad_norm",
            "learning_rate",
            "tokens",
        ):
            assert isinstance(metrics[key], float), key
    # Policy == reference: ln 2, up to beta (0.1) x the rounding of four summed log-probs.
    first = seen[0][1]
    tol = 1e-7 * (abs(first["chosen_logps"]) + abs(first["rejected_logps"]))
    assert first["loss"] == pytest.approx(math.log(2), abs=tol)
    assert result.final_loss == seen[-1][1]["loss"]
    assert result.history == [m for _, m in seen]
    records = [json.loads(line) for line in open(os.path.join(result.output_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["split"] == "eval"] == [4, 8]
    events = glob.glob(os.path.join(result.output_dir, "tensorboard", "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "eval/reward_margin" in acc.Tags()["scalars"]


def test_best_checkpoint_loads_and_evaluates(fitted, tmp_path):
    trainer, result, _ = fitted
    assert result.best_checkpoint == os.path.join(result.output_dir, "best")
    fresh = FluxTrainer(trainer.config)
    meta = fresh.load_checkpoint(result.best_checkpoint)
    assert meta["metric_name"] == "eval_loss"
    from flux_jax.trainer import DEMO_EVAL

    metrics = fresh.evaluate(DEMO_EVAL)
    assert metrics["loss"] == pytest.approx(meta["metric_value"], rel=1e-5)
    assert metrics["num_pairs"] == 40


def test_export_reloads_in_transformers(fitted, tmp_path):
    import torch
    import transformers

    trainer, _, _ = fitted
    out = trainer.export(str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = np.asarray([tokenizer("Explain machine learning.")["input_ids"]], np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    ours = np.asarray(trainer.model(ids))
    assert np.max(np.abs(ours - ref)) < 1e-4 * max(1.0, float(np.abs(ref).max()))  # scale-aware


def test_plot_writes_png(fitted):
    from flux_jax.plot import plot_metrics

    _, result, _ = fitted
    path = plot_metrics(result.output_dir)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_precomputed_reference_matches_online(tmp_path, monkeypatch):
    import shutil

    from flux_jax.trainer import DEMO_EVAL, DEMO_TRAIN

    monkeypatch.setenv("FLUX_JAX_CACHE", str(tmp_path / "cache"))
    data = str(tmp_path / "pairs.jsonl")  # not the demo path: no automatic eval split
    shutil.copyfile(DEMO_TRAIN, data)
    online = FluxTrainer(_config(tmp_path / "a", num_steps=3)).fit(prompts=data)
    pre_config = _config(tmp_path / "b", num_steps=3)
    pre_config.algorithm.precompute_ref_logps = True
    pre = FluxTrainer(pre_config).fit(prompts=data)
    for a, b in zip(online.history, pre.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        # The margin is beta x a difference of summed log-probs: its rounding scales with them.
        tol = 1e-7 * (abs(a["chosen_logps"]) + abs(a["rejected_logps"]))
        assert b["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-4, abs=tol)
    cached = glob.glob(str(tmp_path / "cache" / "ref_logps" / "*.npz"))
    assert len(cached) == 1
    # A second run on the same data reuses the cache.
    again_config = _config(tmp_path / "c", num_steps=1)
    again_config.algorithm.precompute_ref_logps = True
    again = FluxTrainer(again_config).fit(prompts=data, eval_prompts=DEMO_EVAL)
    assert again.eval_metrics["num_pairs"] == 40  # eval against precomputed eval log-probs too
    # The training pairs' entry was reused; only the eval file's is new.
    assert len(glob.glob(str(tmp_path / "cache" / "ref_logps" / "*.npz"))) == 2


def test_demo_command_learns(tmp_path, monkeypatch, capsys):
    """The README's first command, shortened: the final loss ends below ln 2."""
    from flux_jax.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "demo",
            "--config.num_steps=60",
            "--config.logging.progress_bar=false",
            "--config.eval.every_steps=0",
        ]
    )
    assert code == 0
    records = [json.loads(r) for r in open(tmp_path / "outputs/tiny_demo/metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < math.log(2) - 0.05
    assert train[-1]["reward_margin"] > 0


def test_cli_config_errors_name_the_key(tmp_path, capsys):
    from flux_jax.cli import main

    assert main(["train", "--config.algorithm.bta=0.2"]) == 2
    assert "flux-jax: error: " in capsys.readouterr().err
    assert main(["train", "--config.algorithm.beta=-1"]) == 2
    assert "algorithm.beta must be > 0" in capsys.readouterr().err
