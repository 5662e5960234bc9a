"""The loss family from configs: `algorithm.loss_type` as one name or a list (MPO) with
`algorithm.loss_weights`, from YAML, a py config and the command line, and a short MPO run
through FluxTrainer that reports one `loss/<name>` metric per loss."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

from flux_jax import FluxConfig, FluxTrainer
from flux_jax.config import ConfigError
from flux_jax.demo import demo_config
from flux_jax.losses import DPOSettings

MPO = ["sigmoid", "bco_pair", "sft"]
MPO_WEIGHTS = [0.8, 0.2, 1.0]


def _settings(config: FluxConfig) -> DPOSettings:
    return DPOSettings.from_config(config, logprob_chunk_size=None)


def test_a_list_of_losses_reads_the_same_from_yaml_py_and_the_command_line(tmp_path):
    yaml_path = tmp_path / "mpo.yaml"
    yaml_path.write_text(
        textwrap.dedent(
            """\
            algorithm:
              loss_type: [sigmoid, bco_pair, sft]
              loss_weights: [0.8, 0.2, 1]
            """
        )
    )
    py_path = tmp_path / "mpo.py"
    py_path.write_text(
        textwrap.dedent(
            """\
            from flux_jax import FluxConfig

            def get_config():
                config = FluxConfig()
                config.algorithm.loss_type = ["sigmoid", "bco_pair", "sft"]
                config.algorithm.loss_weights = [0.8, 0.2, 1.0]
                return config
            """
        )
    )
    from flux_jax import cli

    overrides, _ = cli._split_overrides(
        [
            "--config.algorithm.loss_type=[sigmoid,bco_pair,sft]",
            "--config.algorithm.loss_weights",
            "[0.8, 0.2, 1]",
        ]
    )
    expected = DPOSettings(
        loss_type=tuple(MPO),
        loss_weights=tuple(MPO_WEIGHTS),
        logits_metrics=True,  # logging.logits_metrics' default
        logprob_chunk_size=None,
    )
    for config in (
        FluxConfig.from_yaml(yaml_path),
        FluxConfig.from_file(str(py_path)),
        FluxConfig().apply_overrides(overrides),
    ):
        assert config.algorithm.loss_type == tuple(MPO)
        assert _settings(config) == expected
        # The saved config.yaml reads back as the same run.
        assert _settings(FluxConfig.from_dict(config.to_dict())) == expected


def test_one_name_or_a_list_of_one_is_the_same_config():
    config = FluxConfig({"algorithm": {"loss_type": ["ipo"]}})
    assert config.algorithm.loss_type == "ipo"
    assert FluxConfig().apply_overrides(["algorithm.loss_type=ipo"]).algorithm.loss_type == "ipo"
    # Switching between one name and a list works on a live config too.
    config.algorithm.loss_type = ["sigmoid", "sft"]
    config.algorithm.loss_type = "hinge"
    assert _settings(config.validate()).loss_type == ("hinge",)


@pytest.mark.parametrize(
    "algorithm, message",
    [
        (
            {"loss_type": ["sigmoid", "simpo_typo"]},
            "algorithm.loss_type must be one of 'sigmoid', 'ipo'.*not valid: 'simpo_typo'",
        ),
        (
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]},
            r"algorithm.loss_weights has 1 weights for the 2 names of algorithm.loss_type",
        ),
        ({"loss_type": []}, "algorithm.loss_type expects a name or a non-empty list"),
        ({"loss_type": ["sigmoid", 3]}, "algorithm.loss_type expects a name or a non-empty"),
        ({"loss_weights": ["heavy"]}, r"algorithm.loss_weights expects a list of numbers"),
        ({"loss_weights": [-1.0]}, r"algorithm.loss_weights must be >= 0"),
    ],
)
def test_bad_lists_are_refused_naming_the_keys(algorithm, message):
    with pytest.raises(ConfigError, match=message):
        FluxConfig({"algorithm": algorithm})


def test_the_command_line_takes_a_list_and_refuses_an_unknown_name(capsys):
    from flux_jax import cli

    flags = [
        "--config.algorithm.loss_type=[sigmoid,bco_pair,sft]",
        "--config.algorithm.loss_weights=[0.8,0.2,1]",
    ]
    assert cli.main(["plan", *flags]) == 0
    # The process's exit status and message (one subprocess: the error path stops early).
    bad = subprocess.run(
        [sys.executable, "-m", "flux_jax.cli", "plan", "--config.algorithm.loss_type=[sigmoid,x]"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "algorithm.loss_type must be one of 'sigmoid'" in bad.stderr
    assert "not valid: 'x'" in bad.stderr


@pytest.mark.slow  # a FluxTrainer run (compile, 2 steps, eval, checkpoint): ~20 s on a quiet CPU
def test_mpo_with_wpo_trains_through_flux_trainer_with_a_metric_per_loss(tmp_path):
    config = demo_config()
    config.output_dir = str(tmp_path / "run")
    config.num_steps = 2
    config.batch_size = 8  # one pair per fake CPU device
    config.checkpoint.save_steps = 2
    config.eval.every_steps = 0  # the bundled eval split, at the last step
    config.eval.max_batches = 1
    config.logging.progress_bar = False
    config.logging.every_steps = 1
    config.data.max_length = 48
    config.data.max_prompt_length = 24
    config.apply_overrides(
        [
            "algorithm.loss_type=[sigmoid,bco_pair,sft]",
            "algorithm.loss_weights=[0.8,0.2,1]",
            "algorithm.use_weighting=true",
        ]
    )
    result = FluxTrainer(config).fit()
    assert result.num_steps == 2
    for metrics in result.history:
        parts = [metrics[f"loss/{name}"] for name in MPO]
        assert all(math.isfinite(p) for p in parts)
        weighted = sum(w * p for w, p in zip(MPO_WEIGHTS, parts, strict=True))
        assert metrics["dpo_loss"] == pytest.approx(weighted, rel=1e-5)
        assert "bco/reward_mean" in metrics
        assert 0 < metrics["wpo/weight"] < math.inf
        # logging.logits_metrics is on by default
        assert math.isfinite(metrics["logits/chosen"]) and math.isfinite(metrics["logits/rejected"])
    # The periodic eval scores the same weighted objective (it needs the WPO weights too).
    assert math.isfinite(result.eval_metrics["loss"])
