"""Runs a suite of benchmark settings back to back and prints them as one Markdown table.

    python tools/bench_table.py --suite cpu --trl-python /tmp/trl-venv/bin/python
    python tools/bench_table.py --suite bigvocab
    python tools/bench_table.py --suite accelerator --json-out results.jsonl   # GPU / TPU
    python tools/bench_table.py --suite cpu --dry-run                          # the commands only

Each row is one run of tools/bench.py (or tools/bench_trl.py, in TRL's own virtualenv) in its own
process, one after another, so that the rows of a table share the machine's state: on a shared
CPU host wall times move by 15% or more between sessions, and only rows measured together compare.
The tables in BUILD.md were made this way. Rows whose tool fails are printed as FAILED with the end
of its stderr, and the suite goes on.

Suites (fp32 unless named; all at the shapes of BUILD.md):
  cpu          qwen3-40m, 4 pairs of 128 + U[64, 128]: TRL, flux standard / no window / prefix /
               remat / bf16, and the precomputed-reference pair (TRL rows need --trl-python)
  bigvocab     the big-vocabulary shape: unchunked with and without the window, the chunk caps
  accelerator  Qwen3-0.6B and 1.7B shapes in bf16 with remat full and attention auto, 8 pairs of
               512 + U[256, 512] tokens, and the 0.6B with the reference precomputed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CPU_BASE = ["--model", "qwen3-40m", "--batch", "4", "--prompt-len", "128", "--response-len", "128"]
CPU_BASE += ["--steps", "4", "--warmup", "1"]
ACCEL_BASE = ["--batch", "8", "--prompt-len", "512", "--response-len", "512", "--dtype", "bfloat16"]
ACCEL_BASE += ["--remat", "full", "--attention", "auto", "--steps", "5", "--warmup", "2"]

# (label, tool, arguments): tool "flux" is tools/bench.py, "trl" is tools/bench_trl.py.
SUITES: dict[str, list[tuple[str, str, list[str]]]] = {
    "cpu": [
        ("TRL DPOTrainer, reference model", "trl", CPU_BASE),
        ("flux_jax, standard layout", "flux", CPU_BASE),
        ("flux_jax, --score-window off", "flux", [*CPU_BASE, "--score-window", "off"]),
        ("flux_jax, prefix sharing", "flux", [*CPU_BASE, "--layout", "prefix"]),
        ("flux_jax, --remat full", "flux", [*CPU_BASE, "--remat", "full"]),
        ("flux_jax, --dtype bfloat16", "flux", [*CPU_BASE, "--dtype", "bfloat16"]),
        ("TRL, precomputed reference", "trl", [*CPU_BASE, "--reference", "precomputed"]),
        ("flux_jax, precomputed reference", "flux", [*CPU_BASE, "--reference", "precomputed"]),
        (
            "flux_jax, prefix + precomputed",
            "flux",
            [*CPU_BASE, "--layout", "prefix", "--reference", "precomputed"],
        ),
    ],
    "bigvocab": [
        (
            "unchunked, no window",
            "flux",
            [*CPU_BASE, "--model", "bigvocab", "--chunk", "0", "--score-window", "off"],
        ),
        ("unchunked, window", "flux", [*CPU_BASE, "--model", "bigvocab", "--chunk", "0"]),
        ("--chunk-mib 0", "flux", [*CPU_BASE, "--model", "bigvocab", "--chunk-mib", "0"]),
        ("default --chunk-mib (the config's)", "flux", [*CPU_BASE, "--model", "bigvocab"]),
        ("--chunk-mib 128", "flux", [*CPU_BASE, "--model", "bigvocab", "--chunk-mib", "128"]),
        ("--chunk-mib 64", "flux", [*CPU_BASE, "--model", "bigvocab", "--chunk-mib", "64"]),
    ],
    "accelerator": [
        ("Qwen3-0.6B shape, bf16", "flux", ["--model", "qwen3-0.6b", *ACCEL_BASE]),
        ("Qwen3-1.7B shape, bf16", "flux", ["--model", "qwen3-1.7b", *ACCEL_BASE]),
        (
            "Qwen3-0.6B shape, bf16, precomputed reference",
            "flux",
            ["--model", "qwen3-0.6b", *ACCEL_BASE, "--reference", "precomputed"],
        ),
    ],
}

HEADERS = ["run", "step s", "tokens/s", "pairs/s", "mfu", "HFU", "compiled temp", "peak memory"]
HEADERS.append("cpu share")


def command(tool: str, args: list[str], trl_python: str) -> list[str]:
    if tool == "trl":
        return [trl_python, str(REPO / "tools" / "bench_trl.py"), *args]
    return [sys.executable, str(REPO / "tools" / "bench.py"), *args]


def gigabytes(n: float | None) -> str:
    return "–" if not n else f"{n / 1e9:.2f} GB"


def parse_result(stdout: str) -> dict:
    """The tool's JSON object: all of stdout, or (when a library printed first) from the last
    line that opens an object."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        lines = stdout.splitlines()
        start = max(i for i, line in enumerate(lines) if line.startswith("{"))
        return json.loads("\n".join(lines[start:]))


def table_row(label: str, result: dict) -> str:
    """One Markdown row from a bench.py / bench_trl.py JSON result."""
    temp = (result.get("compiled_memory") or {}).get("temp_bytes")
    hfu = result.get("hardware_flops_utilisation")
    share = result.get("cpu_share")
    cells = [
        label,
        f"{result['step_time_s']:.2f}",
        f"{result['tokens_per_s']:.0f}",
        f"{result['pairs_per_s']:.2f}",
        f"{result['mfu']:.3f}",
        "–" if hfu is None else f"{hfu:.3f}",
        gigabytes(temp),
        gigabytes(result.get("peak_memory_bytes")),
        "–" if share is None else f"{share:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument(
        "--trl-python", default="", help="python of a venv with trl (no TRL rows if empty)"
    )
    parser.add_argument("--json-out", default="", help="also append each run's JSON line here")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    rows = [r for r in SUITES[args.suite] if r[1] != "trl" or args.trl_python]
    if args.dry_run:
        for label, tool, tool_args in rows:
            print(f"# {label}\n{' '.join(command(tool, tool_args, args.trl_python))}")
        return 0
    print("| " + " | ".join(HEADERS) + " |")
    print("|---" * len(HEADERS) + "|", flush=True)
    failures = 0
    for label, tool, tool_args in rows:
        proc = subprocess.run(
            command(tool, tool_args, args.trl_python), capture_output=True, text=True, cwd=REPO
        )
        if proc.returncode != 0:
            failures += 1
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
            print(f"| {label} | FAILED (exit {proc.returncode}): {tail[0][:200]} |", flush=True)
            continue
        result = parse_result(proc.stdout)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps({"label": label, **result}) + "\n")
        print(table_row(label, result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
