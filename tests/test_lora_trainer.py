"""LoRA through FluxTrainer on the built-in tiny model (8 CPU devices, fsdp 8): adapters-only
training from ln 2 with the base as the reference, checkpoints that name their base and settings,
exact resume, clear errors on a mismatched resume, and `best` served as merged weights.

Resume tolerance: bit-exact on the same machine and mesh (the same programs on the same inputs).
"""

from __future__ import annotations

import math
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from flux_jax import FluxConfig, FluxTrainer, lora
from flux_jax.checkpoint import read_metadata
from flux_jax.demo import demo_config
from flux_jax.policy import Policy

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "model.lora.dropout": 0.05}


def _config(output_dir, **overrides) -> FluxConfig:
    config = demo_config()
    config.output_dir = str(output_dir)
    config.num_steps = 4
    config.learning_rate = 1e-2
    config.checkpoint.save_steps = 2
    config.checkpoint.max_to_keep = 5
    config.checkpoint.async_save = False
    config.eval.every_steps = 4
    config.eval.max_batches = 1
    config.logging.progress_bar = False
    config.data.max_length = 64
    config.data.max_prompt_length = 32
    config.apply_overrides([f"{k}={v}" for k, v in {**LORA, **overrides}.items()])
    return config.validate()


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, _host(a), _host(b))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    trainer = FluxTrainer(_config(out))
    base_before = _host(trainer.policy.params)
    losses = []
    trainer.add_step_callback(lambda r: losses.append(r.metrics["loss"]))
    result = trainer.fit()
    return trainer, result, base_before, losses


def test_lora_config_keys():
    config = _config("unused")
    assert lora.LoraSettings.from_config(config.model.lora) == lora.LoraSettings(
        rank=4, alpha=8.0, dropout=0.05
    )
    assert lora.LoraSettings.from_config(FluxConfig().model.lora) is None  # rank 0 = off
    with pytest.raises(ValueError, match=r"model.lora.target_modules \['attn'\] unknown; valid"):
        _config("unused", **{"model.lora.target_modules": "q_proj,attn"})
    with pytest.raises(ValueError, match="unknown key 'model.lora.rnak'; did you mean"):
        FluxConfig({"model": {"lora": {"rnak": 4}}})


@pytest.mark.slow  # a ~35 s trainer fixture; test_lora.py checks LoRA steps by default
def test_fit_trains_only_the_adapters_from_ln2(run):
    trainer, result, base_before, losses = run
    assert len(losses) == 4 and result.num_steps == 4
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6)  # B = 0: the policy is the base
    assert losses[-1] < losses[0]
    settings = trainer.policy.lora
    want = jax.tree.map(lambda s: s.shape, lora.adapter_shapes(trainer.policy.params, settings))
    assert jax.tree.map(lambda x: x.shape, trainer.params) == want  # trainer.params: adapters
    _assert_trees_equal(trainer.policy.params, base_before)  # the base never moved
    assert trainer.ref_params is trainer.policy.params  # reference = the base: no copy
    assert result.eval_metrics is not None  # eval ran on the merged weights


@pytest.mark.slow  # a ~35 s trainer fixture; test_lora.py checks LoRA steps by default
def test_checkpoints_name_the_base_and_settings(run):
    trainer, result, _, _ = run
    meta = read_metadata(os.path.join(result.output_dir, "checkpoints", "4"))
    assert meta["lora"] == trainer.policy.lora.to_dict()
    assert meta["base_model"]["model_path"] == "builtin:tiny-qwen3"
    assert len(meta["base_model"]["fingerprint"]) == 64


@pytest.mark.slow  # a ~35 s trainer fixture; test_lora.py checks LoRA steps by default
def test_best_loads_into_a_trainer_and_serves_merged_weights(run, tmp_path):
    trainer, result, _, _ = run
    other = FluxTrainer(_config(tmp_path / "other"))
    meta = other.load_checkpoint(result.best_checkpoint)
    assert meta["step"] == 4
    _assert_trees_equal(other.params, trainer.params)
    policy = Policy.from_checkpoint(result.best_checkpoint)
    assert policy.lora == trainer.policy.lora
    merged = lora.merge(trainer.policy.params, trainer.params, trainer.policy.lora)
    _assert_trees_equal(policy.serving_params(), merged)
    # export's single-device load: the same merged weights, on one device (the fp32 sum
    # W + s * A @ B is computed in other blocks there: last-bit differences).
    alone = _host(
        Policy.from_checkpoint(result.best_checkpoint, single_device=True).serving_params()
    )
    for got, want in zip(jax.tree.leaves(alone), jax.tree.leaves(_host(merged)), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.slow  # a ~35 s trainer fixture; test_lora.py checks LoRA steps by default
def test_resume_is_exact_and_refuses_other_settings_or_base(run, tmp_path):
    first, result, _, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(result.output_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")  # as if killed after step 2's checkpoint
    shutil.rmtree(resumed / "best")
    trainer = FluxTrainer(_config(resumed))
    again = trainer.fit()
    assert again.resumed_from == 2
    # Steps 3 and 4 again, dropout masks and data included: the same numbers, bit for bit.
    assert [h["loss"] for h in again.history] == [h["loss"] for h in result.history[2:]]
    _assert_trees_equal(trainer.params, first.params)

    for overrides, message in (
        ({"model.lora.rank": 8}, "model.lora.rank: checkpoint 4, this run 8"),
        ({"model.lora.rank": 0}, "holds LoRA adapters"),
        ({"seed": 1}, "trained on the base model_path 'builtin:tiny-qwen3'"),
    ):
        with pytest.raises(ValueError, match=message):
            FluxTrainer(_config(resumed, **overrides)).fit()


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """The kill/resume worker of tests/test_resume.py with LoRA on: losses and adapters equal."""
    from flux_jax.trainer import DEMO_TRAIN
    from tests import test_resume as tr

    data = str(tmp_path / "pairs.jsonl")
    shutil.copyfile(DEMO_TRAIN, data)
    flags = ["--config.model.lora.rank=4", "--config.model.lora.dropout=0.1"]
    reference = tmp_path / "uninterrupted"
    tr._run(reference, data, *flags)
    out_dir = tmp_path / "run"
    proc = tr._start(out_dir, data, *flags)
    for line in proc.stdout:
        if line.startswith("STEP 4 "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    out = tr._run(out_dir, data, *flags)
    assert "DONE 12" in out
    tr._assert_same_run(reference, out_dir, rtol=1e-6)
