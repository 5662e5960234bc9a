"""The persistent compilation cache: where it lives, that a second process reuses what the first
compiled (seen in the cache directory's files and JAX's cache-hit events), and the off switch.

Each case runs in fresh processes: JAX reads its cache settings once per process, and this test
session's own JAX must not start writing to a test directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux_jax.compile_cache import cache_entries, default_cache_dir

REPO = Path(__file__).resolve().parents[1]

# Compiles one small function with the cache pointed at argv[1] (enabled unless argv[2] == "off")
# and prints the cache events JAX recorded.
PROBE = """
import json, sys
import jax, jax.numpy as jnp
from flux_jax.compile_cache import enable_compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
path = enable_compile_cache(sys.argv[1], min_compile_time_s=0, enabled=sys.argv[2] != "off")
jax.jit(lambda x: jnp.tanh(x @ x.T) + 1)(jnp.ones((32, 32))).block_until_ready()
print(json.dumps({"path": path, "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def run_probe(directory: Path, mode: str = "on") -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(directory), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "flux_jax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "flux_jax" / "xla"


def test_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "xla"
    first = run_probe(cache)
    assert first["path"] == str(cache)
    assert first["misses"] >= 1 and first["hits"] == 0
    stored = cache_entries(cache)
    assert stored >= 1
    second = run_probe(cache)
    assert second["hits"] >= 1 and second["misses"] == 0
    assert cache_entries(cache) == stored  # nothing compiled anew


def test_off_switch_writes_nothing(tmp_path):
    result = run_probe(tmp_path / "xla", mode="off")
    assert result == {"path": None, "hits": 0, "misses": 0}
    assert cache_entries(tmp_path / "xla") == 0


def test_unwritable_directory_names_the_key(tmp_path):
    from flux_jax.compile_cache import enable_compile_cache

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="compile_cache.dir"):
        enable_compile_cache(str(blocker / "xla"))


@pytest.mark.slow
def test_trainer_run_twice_reuses_the_compiled_steps(tmp_path):
    """Two training runs of the demo config in fresh processes, one cache: the second compiles
    nothing new. Prints time to the first step, cold and warm (not asserted: a shared CPU)."""
    from flux_jax.trainer import DEMO_TRAIN

    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    worker = [sys.executable, str(REPO / "tests" / "workers" / "train_worker.py")]
    overrides = [
        f"--config.compile_cache.dir={cache}",
        "--config.compile_cache.min_compile_time_s=0",
    ]
    timings, entries = [], []
    for run in ("cold", "warm"):
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*worker, str(tmp_path / run), DEMO_TRAIN, "2", *overrides],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        first_step, lines = None, []
        for line in proc.stdout:
            lines.append(line)
            if first_step is None and re.match(r"STEP 1 ", line):
                first_step = time.perf_counter() - start
        assert proc.wait(timeout=600) == 0, "".join(lines[-40:])
        timings.append(first_step)
        entries.append(cache_entries(cache))
    print(
        f"time to first step: cold {timings[0]:.1f} s, warm {timings[1]:.1f} s; entries {entries}"
    )
    assert entries[0] >= 1
    assert entries[1] == entries[0]
