"""The `flux-jax` subcommands on a short demo run: export, eval, generate, data check, plot."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from flux_jax.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code = main(
            [
                "demo",
                "--config.num_steps=4",
                "--config.checkpoint.save_steps=2",
                "--config.eval.every_steps=2",
                "--config.logging.progress_bar=false",
            ]
        )
    finally:
        os.chdir(cwd)
    assert code == 0
    return work / "outputs" / "tiny_demo"


def test_export_then_transformers_logits_equal_ours(run_dir, tmp_path):
    import torch
    import transformers

    import flux_jax

    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run_dir / "best"), "--out", str(out)]) == 0
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).exists(), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = flux_jax.load_pretrained(out)
    ids = np.asarray([[5, 17, 99, 3, 250, 8]], np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    # Logit rounding scales with the logits: 1e-4 absolute below 1, relative above.
    assert np.max(np.abs(np.asarray(ours(ids)) - ref)) < 1e-4 * max(1.0, float(np.abs(ref).max()))
    # The exported weights are the trained ones, not the initial ones.
    meta = json.load(open(run_dir / "best" / "metadata" / "metadata.json"))
    assert meta["step"] >= 2


def test_eval_writes_json_and_table(run_dir, tmp_path, capsys):
    from flux_jax.trainer import DEMO_EVAL

    out = tmp_path / "eval.json"
    code = main(
        ["eval", "--checkpoint", str(run_dir / "best"), "--data", DEMO_EVAL, "--json", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "reward_accuracy" in printed
    saved = json.load(open(out))
    assert saved["metrics"]["num_pairs"] == 40
    assert 0.0 <= saved["metrics"]["reward_accuracy"] <= 1.0


def test_generate_with_base_comparison(run_dir, capsys):
    code = main(
        [
            "generate",
            "--checkpoint",
            str(run_dir / "best"),
            "--prompt",
            "Hello there",
            "--max-new-tokens",
            "6",
            "--compare-base",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "### trained" in out and "### base" in out


def test_data_check(tmp_path, capsys):
    from flux_jax.trainer import DEMO_TRAIN

    code = main(
        [
            "data",
            "check",
            DEMO_TRAIN,
            "--tokenizer",
            "builtin:tiny-qwen3",
            "--max-length",
            "32",
            "--max-prompt-length",
            "16",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "300" in out and "truncat" in out


def test_plan_reports_fit(capsys):
    code = main(
        ["plan", "--config", "configs/dpo_qwen3_8b.py", "--devices", "8", "--device", "h100"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "params" in out and ("fits" in out or "does not fit" in out)


def test_plot(run_dir):
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "metrics.png").exists()


def test_data_check_defaults_and_format_choices_are_the_config_s():
    """`data check` measures against the lengths training would use, and --format accepts the
    formats the config accepts: both come from the config schema, not copies."""
    from flux_jax.cli import _parser
    from flux_jax.config import FluxConfig
    from flux_jax.config_schema import LEAVES

    args = _parser().parse_args(["data", "check", "f.jsonl", "--tokenizer", "builtin:tiny-qwen3"])
    default = FluxConfig.default().data
    assert (args.format, args.max_length, args.max_prompt_length) == (
        default.format,
        default.max_length,
        default.max_prompt_length,
    )
    for fmt in LEAVES["data.format"].choices:
        assert _parser().parse_args(["train", "--format", fmt]).format == fmt
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--format", "nope"])
