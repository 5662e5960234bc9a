"""tools/bench.py runs end to end on the tiny model and prints JSON with every documented key.

Not a timing test. It runs in a subprocess with one CPU device (the session's 8 fake devices would
split a 2-pair batch unevenly) and XLA's backend optimisations off, which halves the compile time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EXPECTED_KEYS = {
    "model",
    "backend",
    "dtype",
    "remat",
    "chunk",
    "reference",
    "batch_pairs",
    "seq_len",
    "compile_s",
    "step_time_s",
    "step_times_s",
    "tokens_per_step",
    "padded_tokens_per_step",
    "tokens_per_s",
    "pairs_per_s",
    "model_flops_per_step",
    "hardware_flops_per_step",
    "peak_flops_per_s",
    "mfu",
    "hardware_flops_utilisation",
    "peak_memory_bytes",
    "compiled_memory",
}


def test_bench_tiny_prints_json():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "--model", "tiny", "--steps", "2"]
    cmd += ["--warmup", "1", "--batch", "2", "--prompt-len", "8", "--response-len", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)

    assert EXPECTED_KEYS <= result.keys(), EXPECTED_KEYS - result.keys()
    assert result["model"] == "tiny-qwen3"
    assert len(result["step_times_s"]) == 3  # warm-up + timed
    assert 0 < result["tokens_per_step"] <= result["padded_tokens_per_step"] == 2 * 2 * 16
    assert result["model_flops_per_step"] <= result["hardware_flops_per_step"]
    assert 0 < result["mfu"] <= result["hardware_flops_utilisation"]
    assert result["peak_memory_bytes"] > 0
    assert result["compiled_memory"]["temp_bytes"] > 0
    assert all(math.isfinite(loss) for loss in result["losses"])
