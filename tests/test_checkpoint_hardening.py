"""Checkpoints under damage: a damaged newest step falls back to the previous one, a full disk
names the save that failed, metrics.jsonl keeps one line per step after a resume, checkpoints
work without the original model directory, and loading says nothing about unread items.

The training scenarios run the `flux-jax` command in child processes (1 CPU device, the tiny
builtin model); the rest uses TrainCheckpointer directly on small states.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import best_checkpoint
from flux_jax import checkpoint as ckpt
from flux_jax.cli import main
from flux_jax.metrics_log import MetricsLog, drop_lines_after
from flux_jax.tiny_tokenizer import build_tiny_tokenizer
from flux_jax.trainer import DEMO_TRAIN
from tests.test_checkpoint import make_iterator  # the resume tests' iterator settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- damaged newest checkpoint: TrainCheckpointer.restore_latest --------------------------------


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _damage(step_dir: str, kind: str) -> None:
    state = os.path.join(step_dir, "state")
    if kind == "truncated _METADATA":
        _truncate(os.path.join(state, "_METADATA"))
    elif kind == "no state/":
        shutil.rmtree(state)
    elif kind == "garbage data files":
        files = glob.glob(os.path.join(state, "**", "d", "*"), recursive=True)
        assert files
        for path in files:
            open(path, "wb").write(b"not an array")
    else:
        raise AssertionError(kind)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    records = [{"prompt": f"q{i:02d}", "chosen": f"yes {i}", "rejected": "no"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _iterator(data_path: str):
    return make_iterator(data_path, build_tiny_tokenizer())


def _state(step: int) -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    w = jax.random.normal(jax.random.key(step), (64, 64))
    return jax.device_put({"step": jnp.asarray(step), "w": w}, device)


def _save_steps_1_and_2(directory, data_path):
    """Step 1 after one batch, step 2 after two; returns the batch that follows step 1."""
    iterator = _iterator(data_path)
    with ckpt.TrainCheckpointer(directory, save_interval_steps=1) as checkpointer:
        next(iterator)
        checkpointer.save(1, _state(1), data_iterator=iterator)
        checkpointer.wait_until_finished()
        after_step_1 = next(iterator)
        checkpointer.save(2, _state(2), data_iterator=iterator)
    return after_step_1


@pytest.mark.parametrize("kind", ["truncated _METADATA", "no state/", "garbage data files"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, data_path, kind, caplog
):
    directory = tmp_path / "checkpoints"
    after_step_1 = _save_steps_1_and_2(directory, data_path)
    _damage(str(directory / "2"), kind)

    iterator = _iterator(data_path)
    with caplog.at_level(logging.WARNING, logger="flux_jax.checkpoint"):
        with ckpt.TrainCheckpointer(directory, save_interval_steps=1) as checkpointer:
            step, state = checkpointer.restore_latest(
                ckpt.abstract_of(_state(0)), data_iterator=iterator
            )
            assert step == 1
            np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(1)["w"]))
            # The iterator is where step 1 left it, whatever the failed attempt did to it.
            got = next(iterator)
            for key in after_step_1:
                np.testing.assert_array_equal(got[key], after_step_1[key])
            # The damaged step is set aside, so the run can save that step number again.
            assert checkpointer.all_steps() == [1]
            assert checkpointer.save(2, _state(2), data_iterator=iterator)
            assert checkpointer.all_steps() == [1, 2]
    assert sorted(os.listdir(directory)) == ["1", "2", "2.damaged"]
    warning = next(r.getMessage() for r in caplog.records if "could not be restored" in r.message)
    assert str(directory / "2") in warning


def test_no_restorable_checkpoint_lists_every_step_and_keeps_them(tmp_path, data_path):
    directory = tmp_path / "checkpoints"
    _save_steps_1_and_2(directory, data_path)
    _damage(str(directory / "1"), "no state/")
    _damage(str(directory / "2"), "truncated _METADATA")
    with ckpt.TrainCheckpointer(directory, save_interval_steps=1) as checkpointer:
        with pytest.raises(ckpt.CheckpointRestoreError) as err:
            checkpointer.restore_latest(ckpt.abstract_of(_state(0)))
    message = str(err.value)
    assert f"{directory / '2'}: JSONDecodeError" in message
    assert f"{directory / '1'}: FileNotFoundError" in message
    assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing renamed, nothing started over


def test_another_models_checkpoint_is_an_error_not_damage(tmp_path):
    directory = tmp_path / "checkpoints"
    with ckpt.TrainCheckpointer(directory, save_interval_steps=1) as checkpointer:
        checkpointer.save(1, _state(1))
        checkpointer.save(2, _state(2))
    other = ckpt.abstract_of({**_state(0), "w": jnp.zeros((32, 64))})
    with ckpt.TrainCheckpointer(directory, save_interval_steps=1) as checkpointer:
        with pytest.raises(ckpt.CheckpointMismatchError, match="w: \\(64, 64\\) -> \\(32, 64\\)"):
            checkpointer.restore_latest(other)
    assert sorted(os.listdir(directory)) == ["1", "2"]


def test_restore_latest_of_an_empty_directory_is_none(tmp_path):
    with ckpt.TrainCheckpointer(tmp_path, save_interval_steps=1) as checkpointer:
        assert checkpointer.restore_latest(ckpt.abstract_of(_state(0))) is None


# -- metrics.jsonl after a resume ---------------------------------------------------------------


def test_metrics_log_drops_the_lines_past_its_start_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0}) for s in range(1, 6)]
    lines.insert(3, json.dumps({"step": 3, "split": "eval", "loss": 0.5}))
    path.write_text("\n".join(lines) + "\n" + '{"step": 6, "spl')  # cut short by a kill
    log = MetricsLog(
        str(tmp_path), num_steps=9, start_step=3, tensorboard=False, progress_bar=False
    )
    log.train_step(4, {"loss": 0.25})
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (3, "eval"),
        (4, "train"),
    ]
    assert records[-1]["loss"] == 0.25
    assert drop_lines_after(str(path), 4) == 0
    assert not glob.glob(str(tmp_path / "metrics.jsonl.tmp*"))


# -- item 5: loading says nothing about the items it does not read -------------------------------


def test_loading_params_warns_about_nothing(tmp_path, data_path, caplog):
    _save_steps_1_and_2(tmp_path / "checkpoints", data_path)
    params = {"w": _state(3)["w"]}
    best_checkpoint.save_best(tmp_path / "best", 3, params, metric_name="loss", metric_value=1.0)
    abstract = ckpt.abstract_of({"w": _state(0)["w"]})
    with caplog.at_level(logging.WARNING):
        best_checkpoint.load_params(tmp_path / "best", abstract)
    assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]
    # A step directory's params: the state item holds "step" and "w", not a params subtree.
    with pytest.raises(ValueError, match="holds no 'params' subtree"):
        best_checkpoint.load_params(tmp_path / "checkpoints" / "1", abstract)
    assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]


# -- the command, end to end: disk full, resume, damaged newest ---------------------------------

# Runs `flux-jax train` with RLIMIT_FSIZE lowered once checkpoint 3 is committed: step 6's state
# file (~700 kB) exceeds the limit, `best` (~400 kB) and the logs do not. SIGXFSZ is ignored so
# the write fails with EFBIG instead of killing the process.
TRAIN_WITH_FILE_LIMIT = """
import os, resource, signal, sys, time
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from flux_jax import cli, trainer

output_dir, limit = sys.argv[1], int(sys.argv[2])
init = trainer.FluxTrainer.__init__

def limit_after_first_save(result):
    if result.step == 4 and limit:
        deadline = time.time() + 120
        while not os.path.isdir(os.path.join(output_dir, "checkpoints", "3")):
            assert time.time() < deadline, "checkpoint 3 never committed"
            time.sleep(0.05)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

def init_with_callback(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.add_step_callback(limit_after_first_save)

trainer.FluxTrainer.__init__ = init_with_callback
sys.exit(cli.main(sys.argv[3:]))
"""


def _train(output_dir, *, file_limit: int = 0) -> subprocess.CompletedProcess:
    args = [
        "train",
        f"--data={DEMO_TRAIN}",
        f"--config.output_dir={output_dir}",
        "--config.num_steps=6",
        "--config.checkpoint.save_steps=3",
        "--config.checkpoint.max_to_keep=5",
        "--config.logging.progress_bar=false",
        "--config.logging.tensorboard=false",
        "--config.logging.every_steps=1",
        "--config.data.max_length=64",
        "--config.data.max_prompt_length=32",
    ]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    script = textwrap.dedent(TRAIN_WITH_FILE_LIMIT)
    return subprocess.run(
        [sys.executable, "-c", script, str(output_dir), str(file_limit), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def _train_steps(output_dir) -> list[int]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory):
    """A run whose step-6 save hits the file-size limit: (output_dir, the finished process)."""
    out = tmp_path_factory.mktemp("disk_full") / "run"
    return out, _train(out, file_limit=550_000)


@pytest.mark.slow  # ~25 s; its timing needs a quiet machine
def test_disk_full_stops_the_run_naming_the_failed_save(disk_full_run):
    out, failed = disk_full_run
    checkpoints = out / "checkpoints"
    assert failed.returncode == 1, failed.stderr[-3000:]
    # One line of ours among orbax's logs (and tensorstore's "Event loop is closed" tracebacks
    # of the writes still in flight, which may print after it).
    ours = [line for line in failed.stderr.splitlines() if line.startswith("flux-jax: error:")]
    assert len(ours) == 1, failed.stderr[-3000:]
    assert ours[0].startswith("flux-jax: error: saving checkpoint"), ours
    assert f"{checkpoints / '6'} failed: File too large (EFBIG)" in ours[0]
    assert f"the last complete checkpoint is {checkpoints / '3'}" in ours[0]
    assert "3" in os.listdir(checkpoints) and "6" not in os.listdir(checkpoints)


@pytest.mark.slow
def test_resume_after_disk_full_then_after_damage(disk_full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(disk_full_run[0], out)
    checkpoints = out / "checkpoints"

    # Space is back: the same command resumes from step 3, and each step is logged once.
    resumed = _train(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints} step 3" in resumed.stderr
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(checkpoints)) == ["3", "6"]

    # The newest checkpoint is damaged: a warning, then the run goes on from the previous one.
    _damage(str(checkpoints / "6"), "truncated _METADATA")
    again = _train(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoint {checkpoints / '6'} could not be restored (JSONDecodeError" in again.stderr
    assert f"resumed from {checkpoints} step 3" in again.stderr
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(checkpoints)) == ["3", "6", "6.damaged"]


# -- checkpoints without the original model directory --------------------------------------------


@pytest.fixture(scope="module")
def run_without_its_model(tmp_path_factory):
    """A 2-step run from a local model dir; then the model dir is deleted and the output_dir
    moved. Returns (moved output_dir, the deleted model dir)."""
    from flux_jax import FluxTrainer
    from flux_jax.demo import demo_config
    from flux_jax.hf_io import save_pretrained
    from flux_jax.model_setup import ModelOptions, load_model
    from flux_jax.tiny_tokenizer import save_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("standalone")
    model_dir = tmp / "base_model"
    save_pretrained(load_model("builtin:tiny-qwen3", ModelOptions(), mesh=None), model_dir)
    save_tiny_tokenizer(model_dir)
    config = demo_config()
    config.model_path = str(model_dir)
    config.output_dir = str(tmp / "run")
    config.num_steps = 2
    config.checkpoint.save_steps = 2
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    config.data.max_length = 64
    config.data.max_prompt_length = 32
    FluxTrainer(config.validate()).fit()
    assert sorted(os.listdir(tmp / "run" / "model_assets")) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    shutil.rmtree(model_dir)
    shutil.move(tmp / "run", tmp / "moved")
    return tmp / "moved", model_dir


@pytest.mark.parametrize("checkpoint", ["best", "checkpoints/2"])
def test_export_needs_only_the_checkpoint(run_without_its_model, checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from flux_jax.hf_io import load_pretrained

    out_dir, _ = run_without_its_model
    hf_dir = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(out_dir / checkpoint), "--out", str(hf_dir)]) == 0
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        assert (hf_dir / name).exists(), name
    assert load_pretrained(hf_dir).config.vocab_size == len(AutoTokenizer.from_pretrained(hf_dir))


def test_generate_needs_only_the_checkpoint_but_the_base_needs_its_weights(
    run_without_its_model, capsys
):
    out_dir, model_dir = run_without_its_model
    best = str(out_dir / "best")
    prompt = ["--prompt", "Hello there", "--max-new-tokens", "4"]
    assert main(["generate", "--checkpoint", best, *prompt]) == 0
    assert "### trained" in capsys.readouterr().out

    assert main(["generate", "--checkpoint", best, *prompt, "--compare-base"]) == 1
    err = capsys.readouterr().err
    assert (
        f"--compare-base needs the base model the run started from, model_path '{model_dir}'" in err
    )


def test_eval_against_a_deleted_base_model_says_so(run_without_its_model, capsys):
    out_dir, model_dir = run_without_its_model
    code = main(["eval", "--checkpoint", str(out_dir / "best"), "--data", DEMO_TRAIN])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"flux-jax: error: {out_dir / 'best'}: eval")
    assert f"model_path '{model_dir}', which does not exist any more" in err[-1]
