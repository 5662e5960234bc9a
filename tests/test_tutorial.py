"""The tutorial (shared/seed/flux-dpo-tutorial.txt), block by block, with `from flux_jax import`.

Two substitutions, both in the config rather than the code: `model_path` points at a tiny random
Qwen3 saved in the test's directory (no hub here, and an 8B model does not train in a test), and
num_steps / save_steps are cut from 1000 / 200 to 6 / 3. Everything else is the tutorial verbatim,
run in a fresh working directory so its relative paths (preferences.jsonl, outputs/dpo) resolve.
"""

# ruff: noqa: E501  (the tutorial's code is quoted verbatim, long lines included)
from __future__ import annotations

import json
import math
import os
import pathlib

import pytest

TUTORIAL_YAML = (pathlib.Path(__file__).parent.parent / "configs" / "dpo-config.yaml").read_text()

PREPARE_DPO_DATA = """
import json

# Preference pairs
preferences = [
    {
        "prompt": "Explain quantum computing.",
        "chosen": "Quantum computing uses quantum bits (qubits) that can exist in multiple states simultaneously, unlike classical bits which are either 0 or 1. This allows quantum computers to solve certain problems much faster.",
        "rejected": "Quantum computing is complicated. It uses quantum stuff to compute things faster. I don't really understand it myself."
    },
    {
        "prompt": "Write a professional email.",
        "chosen": "Dear Mr. Smith,\\n\\nThank you for your inquiry. I would be happy to schedule a meeting at your earliest convenience.\\n\\nBest regards,\\nJohn",
        "rejected": "hey john whats up, yeah we can meet whenever lol"
    },
    # Add more pairs...
]

# Save to JSONL
with open("preferences.jsonl", "w") as f:
    for p in preferences:
        f.write(json.dumps(p) + "\\n")

print(f"Created {len(preferences)} preference pairs")
"""

TRAIN_DPO = """
from flux_jax import FluxConfig, FluxTrainer

# Load config
config = FluxConfig.from_yaml("dpo-config.yaml")

# Create trainer
trainer = FluxTrainer(config)

@trainer.add_step_callback
def log_dpo_metrics(result):
    metrics = result.metrics
    print(f"Step {result.step}: "
          f"loss={metrics['loss']:.4f}, "
          f"chosen_reward={metrics.get('chosen_reward', 0):.3f}, "
          f"rejected_reward={metrics.get('rejected_reward', 0):.3f}, "
          f"reward_margin={metrics.get('reward_margin', 0):.3f}")

# Train with preference data
result = trainer.fit(
    prompts="preferences.jsonl",
    data_format="preferences",  # Indicates DPO format
)

print(f"Training complete!")
print(f"Final loss: {result.final_loss:.4f}")
"""

EVALUATE = """
from flux_jax import FluxTrainer

trainer = FluxTrainer(config)
trainer.load_checkpoint("outputs/dpo/best")

# Test prompts
test_prompt = "Explain machine learning."

# Generate response
response = trainer.generate(test_prompt)
print(f"Trained model: {response}")
"""


@pytest.fixture
def tutorial_dir(tmp_path, monkeypatch):
    from flux_jax.tiny_tokenizer import build_tiny_tokenizer
    from tests.hf_reference import make_hf_model

    model_dir = tmp_path / "Qwen3-tiny"
    make_hf_model("qwen3_gqa_untied", vocab_size=512, layers=2).save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    yaml_text = TUTORIAL_YAML.replace("model_path: Qwen/Qwen3-8B", f"model_path: {model_dir}")
    yaml_text = yaml_text.replace("num_steps: 1000", "num_steps: 6")
    yaml_text = yaml_text.replace("save_steps: 200", "save_steps: 3")
    assert yaml_text.count(str(model_dir)) == 1 and "num_steps: 6" in yaml_text
    work = tmp_path / "work"
    work.mkdir()
    (work / "dpo-config.yaml").write_text(yaml_text)
    monkeypatch.chdir(work)
    return work


def test_tutorial_runs_as_written(tutorial_dir, capsys):
    namespace: dict = {}
    exec(PREPARE_DPO_DATA, namespace)
    assert "Created 2 preference pairs" in capsys.readouterr().out

    exec(TRAIN_DPO, namespace)
    out = capsys.readouterr().out
    assert "Training complete!" in out
    for step in range(1, 7):
        assert f"Step {step}: loss=" in out
    result = namespace["result"]
    assert result.num_steps == 6 and math.isfinite(result.final_loss)
    # Policy == reference at step 1: the DPO loss is exactly ln 2.
    # Up to beta (0.1) x the rounding of the four summed log-probs (~1e-6 relative each).
    first = result.history[0]
    tol = 1e-7 * (abs(first["chosen_logps"]) + abs(first["rejected_logps"]))
    assert first["loss"] == pytest.approx(math.log(2), abs=tol)
    assert os.path.isdir("outputs/dpo/best")
    assert os.path.isdir("outputs/dpo/checkpoints")
    records = [json.loads(line) for line in open("outputs/dpo/metrics.jsonl")]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 7))

    exec(EVALUATE, namespace)
    out = capsys.readouterr().out
    assert "Trained model: " in out
    assert isinstance(namespace["response"], str)
