"""TR-DPO reference updates (flux_jax/ref_sync.py): the update's numbers, the step reading the
reference from the train state, the config's refusals, and exact resume with the reference in
the checkpoints."""

from __future__ import annotations

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import FluxConfig, optim, ref_sync
from flux_jax import train_step as ts
from flux_jax.config import ConfigError
from flux_jax.hooks import StepState
from flux_jax.models.qwen.model import build_model
from tests.train_fixtures import TINY, random_pair_batch


def test_the_update_is_alpha_policy_plus_one_minus_alpha_reference_in_place():
    rng = np.random.default_rng(0)
    policy = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    reference = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16)}
    expected = 0.6 * np.asarray(policy["w"], np.float64) + 0.4 * np.asarray(
        reference["w"], np.float64
    )
    old = reference["w"]
    new = ref_sync.make_reference_update(0.6)(policy, reference)
    assert new["w"].dtype == jnp.bfloat16  # stored in the reference's own dtype
    np.testing.assert_allclose(np.asarray(new["w"], np.float64), expected, rtol=2**-7)
    assert old.is_deleted()  # donated: updated in place, no second copy
    hard = ref_sync.mix_into_reference(policy, {"w": jnp.zeros((4, 3))}, 1.0)
    np.testing.assert_array_equal(np.asarray(hard["w"]), np.asarray(policy["w"]))


def test_a_hard_sync_makes_the_next_step_start_from_policy_equal_reference():
    graphdef, params = ts.split_model(build_model(TINY, seed=0))
    tx = optim.make_optimizer(learning_rate=1e-2, num_steps=4)
    schedule = optim.make_schedule(learning_rate=1e-2, num_steps=4)
    settings = ts.DPOSettings(beta=0.5, logprob_chunk_size=8)
    state = ts.init_train_state(jax.tree.map(jnp.copy, params), tx)
    state[ref_sync.STATE_KEY] = jax.tree.map(jnp.copy, params)  # the reference, in the state
    step = ts.make_train_step(graphdef, tx, schedule, settings)
    batch = {k: jnp.asarray(v) for k, v in random_pair_batch(4, 16, seed=1).items()}

    state, m1 = step(state, batch, None)  # policy == reference at step 1: ln 2
    assert float(m1["loss"]) == pytest.approx(math.log(2), rel=1e-6)
    state, m2 = step(state, batch, None)  # the policy moved; the reference did not
    assert abs(float(m2["reward_margin"])) > 1e-6
    ref_sync.sync_reference_hook(1.0)(StepState(2, state))  # hard copy into the state's ref
    _, m3 = step(state, batch, None)
    assert float(m3["loss"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(m3["reward_margin"]) == 0.0


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"algorithm": {"precompute_ref_logps": True}},
            "set algorithm.precompute_ref_logps to false",
        ),
        (
            {"algorithm": {"reference_free": True, "loss_type": "simpo"}},
            "algorithm.reference_free is true",
        ),
        ({"model": {"lora": {"rank": 4}}}, r"not supported with LoRA \(model.lora.rank > 0\)"),
        ({"algorithm": {"ref_sync": {"mixup_alpha": 0.0}}}, r"mixup_alpha must be in \(0, 1\]"),
    ],
)
def test_the_config_refuses_what_cannot_sync(values, message):
    values = {**values, "algorithm": {**values.get("algorithm", {})}}
    values["algorithm"]["ref_sync"] = {"every_steps": 2, **values["algorithm"].get("ref_sync", {})}
    with pytest.raises(ConfigError, match=message):
        FluxConfig(values)


def test_resuming_across_a_ref_sync_change_is_refused_naming_the_key():
    synced = {"flux_config": {"algorithm": {"ref_sync": {"every_steps": 4}}}}
    plain = {"flux_config": {"algorithm": {}}}  # also a checkpoint from before the key existed
    ref_sync.check_resume_matches(synced, "ckpt/8", syncs=True)
    ref_sync.check_resume_matches(plain, "ckpt/8", syncs=False)
    with pytest.raises(ValueError, match="ckpt/8: .*algorithm.ref_sync.every_steps=4"):
        ref_sync.check_resume_matches(synced, "ckpt/8", syncs=False)
    with pytest.raises(ValueError, match="algorithm.ref_sync.every_steps=0, this run has it > 0"):
        ref_sync.check_resume_matches(plain, "ckpt/8", syncs=True)


def _config(output_dir, num_steps: int) -> FluxConfig:
    from flux_jax.demo import demo_config

    config = demo_config()
    config.output_dir = str(output_dir)
    config.num_steps = num_steps
    config.checkpoint.save_steps = 3
    config.checkpoint.max_to_keep = 10
    config.checkpoint.async_save = False
    config.eval.every_steps = 0
    config.logging.progress_bar = False
    config.logging.every_steps = 1
    config.data.max_length = 48
    config.data.max_prompt_length = 24
    config.algorithm.ref_sync.every_steps = 2
    config.algorithm.ref_sync.mixup_alpha = 0.5
    return config.validate()


@pytest.mark.slow  # two FluxTrainer runs: ~60 s on a quiet CPU
def test_resume_with_ref_sync_is_exact(tmp_path):
    from flux_jax import FluxTrainer

    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = FluxTrainer(_config(full_dir, 6))
    full_result = full.fit()
    # The checkpoint of step 3 holds the reference as synced at step 2; resume from it alone.
    shutil.copytree(full_dir, resumed_dir)
    for name in os.listdir(resumed_dir / "checkpoints"):
        if name.isdigit() and int(name) > 3:
            shutil.rmtree(resumed_dir / "checkpoints" / name)
    resumed = FluxTrainer(_config(resumed_dir, 6))
    resumed_result = resumed.fit()
    assert resumed_result.resumed_from == 3
    full_losses = [h["loss"] for h in full_result.history]
    resumed_losses = [h["loss"] for h in resumed_result.history]  # steps 4, 5, 6
    assert resumed_losses == pytest.approx(full_losses[3:], rel=1e-6)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(full.params)),
        jax.tree.leaves(jax.device_get(resumed.params)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    # The trainer's reference after the run is the synced one (steps 2, 4, 6), not the start.
    for a, b in zip(
        jax.tree.leaves(jax.device_get(full.ref_params)),
        jax.tree.leaves(jax.device_get(resumed.ref_params)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
