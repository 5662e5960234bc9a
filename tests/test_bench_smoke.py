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


def test_bench_table_rows_and_dry_run(capsys):
    """tools/bench_table.py: parses a tool's JSON (also after stray library output) into a row;
    --dry-run lists one bench command per suite entry without running any."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_table
    finally:
        sys.path.pop(0)
    result = {
        "step_time_s": 4.81,
        "tokens_per_s": 368.2,
        "pairs_per_s": 0.83,
        "mfu": 0.6,
        "hardware_flops_utilisation": 0.577,
        "compiled_memory": {"temp_bytes": 2.3e9},
        "peak_memory_bytes": 3.76e9,
        "cpu_share": 0.94,
    }
    stdout = "a library's banner\n" + json.dumps(result, indent=1) + "\n"
    row = bench_table.table_row("flux", bench_table.parse_result(stdout))
    assert row == "| flux | 4.81 | 368 | 0.83 | 0.600 | 0.577 | 2.30 GB | 3.76 GB | 0.94 |"
    trl_row = bench_table.table_row("trl", {**result, "compiled_memory": None})
    assert "| – |" in trl_row  # TRL has no compiled memory

    assert bench_table.main(["--suite", "cpu", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 7  # the TRL rows need --trl-python
    assert all("tools/bench.py" in c and "--model qwen3-40m" in c for c in commands)
