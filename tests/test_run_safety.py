"""A run that goes wrong stops without overwriting good work, and says so in one line.

- Non-finite steps: the jitted step never applies a NaN/inf update; `training.on_nonfinite=stop`
  stops the run at that step, before any save, leaving the last good checkpoint to resume from;
  `skip_step` counts skips and stops after `max_consecutive_skips` in a row.
- Divergence: a pure detector, warned once per run.
- The output_dir lock, against real second processes (live, SIGKILLed, other host).
- The `flux-jax` command: user errors are one `flux-jax: error:` message and a non-zero exit,
  no traceback unless --debug / FLUX_DEBUG=1; `~` and `$VARS` in path flags are expanded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from flux_jax import optim, run_lock
from flux_jax import train_step as ts
from flux_jax.errors import UsageError
from flux_jax.models.qwen.model import build_model
from flux_jax.training_health import (
    DivergenceWatch,
    NonFiniteGuard,
    NonFiniteStepError,
    is_diverging,
)
from tests.train_fixtures import TINY, random_pair_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FLUX_DEBUG", None)
    env.update(extra)
    return env


def _flux_jax(*args: str, cwd, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flux_jax.cli", *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the step: a non-finite update is never applied -----------------------------------------------


def test_nonfinite_step_keeps_params_and_optimizer_state():
    graphdef, params = ts.split_model(build_model(TINY, seed=0))
    tx = optim.make_optimizer(learning_rate=1e-2, num_steps=10, max_grad_norm=None)
    schedule = optim.make_schedule(learning_rate=1e-2, num_steps=10)
    step = ts.make_train_step(graphdef, tx, schedule, ts.DPOSettings(logprob_chunk_size=8))
    batch = random_pair_batch(4, 20, seed=3)
    finite_ref = {"ref_chosen_logps": np.full(4, -30.0), "ref_rejected_logps": np.full(4, -20.0)}
    nan_ref = {**finite_ref, "ref_chosen_logps": np.array([-30.0, np.nan, -30.0, -30.0])}

    state = ts.init_train_state(params, tx)
    state, metrics = step(state, ts.shard_batch({**batch, **finite_ref}, None), None)
    assert float(metrics["nonfinite"]) == 0.0
    before = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state")})

    state, metrics = step(state, ts.shard_batch({**batch, **nan_ref}, None), None)
    assert float(metrics["nonfinite"]) == 1.0 and math.isnan(float(metrics["loss"]))
    assert int(state["step"]) == 2  # the step counter advances: the batch was consumed
    after = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state")})
    jax.tree.map(np.testing.assert_array_equal, after, before)  # bit for bit unchanged

    state, metrics = step(state, ts.shard_batch({**batch, **finite_ref}, None), None)
    assert float(metrics["nonfinite"]) == 0.0
    changed = jax.tree.map(np.asarray, state["params"])
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(changed), jax.tree.leaves(before["params"]), strict=True)
    )


# -- host-side policy ------------------------------------------------------------------------------


def _metrics(loss: float, grad_norm: float = 1.0) -> dict[str, float]:
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    return {"loss": loss, "grad_norm": grad_norm, "nonfinite": 0.0 if finite else 1.0}


def test_stop_policy_names_the_step_the_quantity_and_the_resume_point():
    guard = NonFiniteGuard(policy="stop", last_good_checkpoint="/run/checkpoints/4")
    guard.observe(5, _metrics(0.7))
    with pytest.raises(NonFiniteStepError) as info:
        guard.observe(6, _metrics(0.69, float("nan")))
    message = str(info.value)
    assert info.value.step == 6
    assert "step 6" in message and "gradient norm = nan" in message and "loss" not in message[:40]
    assert "/run/checkpoints/4" in message


def test_skip_policy_counts_skips_and_stops_after_too_many_in_a_row():
    guard = NonFiniteGuard(policy="skip_step", max_consecutive_skips=3)
    seen = []
    for step, loss in enumerate([0.7, math.inf, math.nan, 0.6, math.nan, math.nan], start=1):
        metrics = _metrics(loss)
        guard.observe(step, metrics)
        seen.append(metrics["skipped_steps"])
    assert seen == [0, 1, 2, 2, 3, 4]  # cumulative; the finite step 4 resets the run of skips
    with pytest.raises(NonFiniteStepError, match=r"3 non-finite steps in a row \(5-7"):
        guard.observe(7, _metrics(math.nan))


def test_divergence_detector():
    # learning_rate=10 on the demo: ln 2 at step 1, thousands from step 2 on
    blown_up = [0.6931, 1520.0, 5714.2, 4870.6, 6961.5, 4992.1, 3383.9, 2248.0, 2900.0, 2500.0]
    assert not is_diverging(blown_up, factor=4.0, window=10)  # 9 steps after the start so far
    assert is_diverging(blown_up + [3000.0], factor=4.0, window=10)
    assert not is_diverging(blown_up + [2.0], factor=4.0, window=10)  # 2.0 < 4 x ln 2: a dip
    start = [0.69, 0.70, 0.68]  # the baseline is the first step's loss, 0.69
    assert not is_diverging(start + [3.0] * 9, factor=4.0, window=10)  # window not full yet
    assert is_diverging(start + [3.0] * 10, factor=4.0, window=10)  # 3.0 > 4 x 0.69
    assert not is_diverging(start + [3.0] * 9 + [2.0], factor=4.0, window=10)  # one dips below
    assert not is_diverging(start + [3.0] * 10, factor=0.0, window=10)  # switched off
    assert not is_diverging([-0.1, -0.1, -0.1] + [5.0] * 10, factor=4.0, window=10)  # no scale
    assert not is_diverging(start + [math.nan] * 10, factor=4.0, window=10)


def test_divergence_is_warned_once():
    watch = DivergenceWatch(factor=4.0, window=2, learning_rate=10.0)
    said = [watch.observe(s, x) for s, x in enumerate([0.69, 0.69, 0.69, 50.0, 900.0, 1e4], 1)]
    assert said[:4] == [None] * 4 and said[5] is None
    assert "steps 4-5" in said[4] and "learning_rate (now 10)" in said[4]


# -- the output_dir lock ---------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from flux_jax.run_lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("HELD", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
    """
)


def _hold(output_dir, seconds: float = 120) -> subprocess.Popen:
    """A second process holding the lock on output_dir (returns once it holds it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output_dir), str(seconds)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "HELD", proc.stderr.read()
    return proc


def test_lock_refuses_a_live_holder_and_takes_over_from_a_killed_one(tmp_path, caplog):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(run_lock.RunLockedError) as info:
            run_lock.RunLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert os.path.join(tmp_path, run_lock.LOCK_NAME) in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(tmp_path / run_lock.LOCK_NAME)  # SIGKILL left the file behind
    lock = run_lock.RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="flux_jax.run_lock"):
        lock.acquire()
    assert "stale lock" in caplog.text and f"pid {holder.pid}" in caplog.text
    record = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())
    assert record["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(tmp_path / run_lock.LOCK_NAME)


def test_lock_from_another_host_is_refused(tmp_path):
    holder = run_lock.LockHolder(pid=1, host="other-host", started_at="2026-01-01T00:00:00")
    (tmp_path / run_lock.LOCK_NAME).write_text(holder.to_text())
    with pytest.raises(run_lock.RunLockedError, match="pid 1 on host other-host"):
        run_lock.RunLock(tmp_path).acquire()


def test_lock_without_flock_falls_back_to_the_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "_flock", lambda fd: None)  # e.g. a FUSE mount
    path = tmp_path / run_lock.LOCK_NAME
    live = run_lock.LockHolder(pid=os.getppid(), host=socket.gethostname(), started_at="t")
    path.write_text(live.to_text())
    with pytest.raises(run_lock.RunLockedError, match="still running"):
        run_lock.RunLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(run_lock.LockHolder(dead.pid, socket.gethostname(), "t").to_text())
    lock = run_lock.RunLock(tmp_path)
    lock.acquire()
    lock.release()


TWO_PROCESS_WORKER = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from flux_jax.distributed import initialize_distributed
    initialize_distributed()
    from flux_jax import run_lock
    for output_dir in sys.argv[1:]:
        try:
            with run_lock.hold_output_dir(
                output_dir, is_main=jax.process_index() == 0, process_count=jax.process_count()
            ):
                print("ENTERED", flush=True)
        except run_lock.RunLockedError as e:
            print("REFUSED", e, flush=True)
    """
)


def test_multi_process_run_agrees_with_process_0(tmp_path):
    """Only process 0 takes the lock; when it cannot, process 1 stops too (no hang)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    locked, free = tmp_path / "locked", tmp_path / "free"
    holder = _hold(locked)
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", TWO_PROCESS_WORKER, str(locked), str(free)],
                env=_env(
                    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(i),
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        holder.kill()
        holder.wait()
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        lines = [line for line in out.splitlines() if line.startswith(("REFUSED", "ENTERED"))]
        assert len(lines) == 2 and lines[0].startswith("REFUSED") and lines[1] == "ENTERED", out
    assert (
        f"REFUSED output_dir {locked} is in use by another training run: pid {holder.pid}"
        in (outs[0][0])
    )
    assert f"REFUSED process 0 could not lock output_dir {locked}" in outs[1][0]
    assert not os.path.exists(free / run_lock.LOCK_NAME)


# -- the flux-jax command ------------------------------------------------------------------------


def test_cli_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    plain = _flux_jax("train", "--config", missing, cwd=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        f"flux-jax: error: {missing}: cannot read config file: No such file or directory"
    ]
    for debug in (
        _flux_jax("train", "--debug", "--config", missing, cwd=tmp_path),
        _flux_jax("train", "--config", missing, cwd=tmp_path, FLUX_DEBUG="1"),
    ):
        assert debug.returncode != 0
        assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_cli_expands_home_and_variables_in_path_flags(monkeypatch, tmp_path):
    from flux_jax.cli import _expand_paths, _parser

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RUN", "r1")
    args = _parser().parse_args(["export", "--checkpoint", "~/$RUN/best", "--out", "${RUN}/hf"])
    _expand_paths(args)
    assert args.checkpoint == f"{tmp_path}/r1/best" and args.out == "r1/hf"
    monkeypatch.delenv("RUN")
    args = _parser().parse_args(["plot", "$RUN/out"])
    with pytest.raises(UsageError, match=r"output_dir: environment variable \$RUN is not set"):
        _expand_paths(args)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    """The demo pairs as a user's file (so no bundled eval split runs at the end)."""
    from flux_jax.trainer import DEMO_TRAIN

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text(open(DEMO_TRAIN).read())
    return str(path)


def _train_args(output_dir, data: str, *overrides: str) -> list[str]:
    return [
        "train",
        "--data",
        data,
        f"--config.output_dir={output_dir}",
        "--config.logging.progress_bar=false",
        "--config.logging.tensorboard=false",
        "--config.checkpoint.save_steps=2",
        "--config.checkpoint.max_to_keep=5",
        "--config.data.max_length=64",
        "--config.data.max_prompt_length=32",
        "--config.optimizer.max_grad_norm=0",  # no clipping (it changes the optimiser state)
        *overrides,
    ]


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("flux-jax: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _saved_steps(run) -> list[int]:
    return sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())


@pytest.mark.slow  # ~40 s: a real `flux-jax train` start-up
def test_cli_refuses_a_locked_output_dir(tmp_path, pairs):
    holder = _hold(tmp_path / "run")
    try:
        proc = _flux_jax(
            *_train_args(tmp_path / "run", pairs, "--config.num_steps=2"), cwd=tmp_path
        )
    finally:
        holder.kill()
        holder.wait()
    error = _error_line(proc)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in error
    assert not os.path.exists(tmp_path / "run" / "config.yaml")  # nothing of the holder touched


@pytest.mark.slow  # ~2 min: three real `flux-jax train` runs
def test_cli_stops_on_nan_keeps_the_good_checkpoint_and_resumes(tmp_path, pairs):
    """Two good steps, then lr 1e30 without clipping: step 3 is finite but moves the weights to
    ~1e30, step 4's gradient norm is NaN. The run stops at step 4 before saving it; the step-2
    checkpoint stays the resume point, and a run with a sane learning rate continues from it."""
    from flux_jax.checkpoint import read_metadata

    run = tmp_path / "run"
    assert _flux_jax(*_train_args(run, pairs, "--config.num_steps=2"), cwd=tmp_path).returncode == 0
    blown = ["--config.num_steps=6", "--config.learning_rate=1e30"]
    error = _error_line(_flux_jax(*_train_args(run, pairs, *blown), cwd=tmp_path))
    assert "training stopped at step 4: " in error and "gradient norm = nan" in error, error
    assert str(run / "checkpoints" / "2") in error
    assert _saved_steps(run) == [2]
    assert read_metadata(run / "best")["step"] == 2
    assert not os.path.exists(run / run_lock.LOCK_NAME)  # released on the way out

    resumed = _flux_jax(*_train_args(run, pairs, "--config.num_steps=4"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr
    assert _saved_steps(run) == [2, 4]


@pytest.mark.slow  # ~1 min: a real `flux-jax train` run
def test_cli_warns_once_when_the_loss_diverges(tmp_path, pairs):
    """learning_rate=10 (clipping on): loss ln 2 -> thousands; the run goes on, warned once."""
    args = _train_args(
        tmp_path / "run",
        pairs,
        "--config.num_steps=12",
        "--config.learning_rate=10",
        "--config.training.divergence_window=5",
        "--config.optimizer.max_grad_norm=1",  # the later override wins
    )
    proc = _flux_jax(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "the loss is diverging" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert warnings[0].startswith("WARNING flux_jax.trainer: the loss is diverging: steps 2-6")
    assert "WARNING: the loss is diverging" in proc.stdout  # repeated under the final summary
