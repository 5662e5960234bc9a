"""Policy (flux_jax.policy): a checkpoint's model for eval, generate and export, with no trainer.

The checkpoint is written directly (no training run): `best` holds the built-in tiny model's
initial weights, so against its own base model every pair has h = 0 and the DPO loss is ln 2.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from flux_jax import best_checkpoint, commands
from flux_jax import checkpoint as ckpt
from flux_jax.demo import demo_config
from flux_jax.model_assets import MODEL_ASSETS_DIR, save_model_assets
from flux_jax.model_setup import ModelOptions, load_model, load_tokenizer
from flux_jax.policy import Policy
from flux_jax.sharding import to_host
from flux_jax.train_data import DEMO_EVAL
from flux_jax.trainer import FluxTrainer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(the `best` directory, the parameters in it)."""
    run = tmp_path_factory.mktemp("policy") / "run"
    config = demo_config()
    config.output_dir = str(run)
    config.data.max_length = 64
    config.data.max_prompt_length = 32
    model = load_model(config.model_path, ModelOptions.from_config(config), mesh=None)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    hf_config = model.config.to_hf_config()
    save_model_assets(
        str(run),
        hf_config=hf_config,
        tokenizer=load_tokenizer(config.model_path),
        model_path=config.model_path,
    )
    best = run / "best"
    best_checkpoint.save_best(
        best,
        3,
        params,
        metric_name="eval_loss",
        metric_value=1.0,
        metadata={
            "model_path": config.model_path,
            "tokenizer_path": config.model_path,
            "hf_config": hf_config,
            "flux_config": config.to_dict(),
            ckpt.MODEL_ASSETS_KEY: str(run / MODEL_ASSETS_DIR),
        },
    )
    return best, params


@pytest.fixture
def no_trainer(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a FluxTrainer was built")

    monkeypatch.setattr(FluxTrainer, "__init__", refuse)


def _assert_same_params(got, want):
    got, want = jax.tree.map(to_host, got), jax.tree.map(to_host, want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_from_checkpoint_holds_its_params_tokenizer_and_mesh(checkpoint, no_trainer):
    best, params = checkpoint
    policy = Policy.from_checkpoint(str(best))
    _assert_same_params(policy.params, params)
    assert policy.checkpoint == str(best)
    assert policy.tokenizer_source == os.path.join(best.parent, MODEL_ASSETS_DIR)
    assert policy.mesh is not None and policy.mesh.size == jax.device_count()
    [completion] = policy.generate(["Hello there"], max_new_tokens=3)
    assert isinstance(completion, str)


def test_single_device_export_reloads_with_the_same_logits(checkpoint, no_trainer, tmp_path):
    from flux_jax.hf_io import load_pretrained

    best, params = checkpoint
    policy = Policy.from_checkpoint(str(best), single_device=True)
    assert policy.mesh is None
    assert {len(x.devices()) for x in jax.tree.leaves(policy.params)} == {1}
    out = policy.export(str(tmp_path / "hf"))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.exists(os.path.join(out, name)), name
    ids = np.asarray([[5, 17, 99, 3]], np.int32)
    want = np.asarray(policy.model(ids))
    got = np.asarray(load_pretrained(out)(ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_eval_command_scores_against_the_base_without_a_trainer(checkpoint, no_trainer, tmp_path):
    best, _ = checkpoint
    metrics = commands.evaluate(str(best), DEMO_EVAL, None, str(tmp_path / "eval.json"))
    assert metrics["num_pairs"] == 40
    # The checkpoint is its base model: h = 0 for every pair, so the loss is ln 2, no margin.
    assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6)
    scale = abs(metrics["chosen_logps"]) + abs(metrics["rejected_logps"])
    assert abs(metrics["reward_margin"]) <= 1e-6 * scale
    assert os.path.exists(tmp_path / "eval.json")


def test_a_missing_base_model_is_named(checkpoint, tmp_path):
    best, _ = checkpoint
    policy = Policy.from_checkpoint(str(best))
    gone = str(tmp_path / "deleted_base")
    with pytest.raises(FileNotFoundError, match=r"--compare-base needs the base model .*deleted"):
        policy.base_params(gone, purpose="--compare-base")
