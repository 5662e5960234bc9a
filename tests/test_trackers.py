"""W&B and Trackio trackers: what they are sent (the metrics.jsonl lines and the config), read back
from a real W&B offline run file and a real Trackio local database; the missing-extra error."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flux_jax import trackers
from flux_jax.metrics_log import MetricsLog
from flux_jax.trackers import TrackerPackageError, TrackerSettings

TRAIN = [{"loss": 0.69 - 0.01 * s, "reward_margin": 0.1 * s, "tokens": 100} for s in range(4)]
EVAL = {"loss": 0.6, "reward_accuracy": 0.75, "num_pairs": 40}
RUN_CONFIG = {"seed": 3, "algorithm": {"beta": 0.1}, "data": {"train_path": "x.parquet"}}


def logging_section(wandb_project="", mode="offline", trackio_project="") -> SimpleNamespace:
    return SimpleNamespace(
        wandb=SimpleNamespace(project=wandb_project, entity="", name="run-a", mode=mode),
        trackio=SimpleNamespace(project=trackio_project, name="run-b"),
    )


def log_a_run(output_dir: str, opened: list) -> list[dict]:
    """Steps 1-4 of training (logged every 2 steps, and the last) and an eval at step 4, through
    MetricsLog; returns the lines of metrics.jsonl."""
    log = MetricsLog(
        output_dir,
        num_steps=4,
        every_steps=2,
        tensorboard=False,
        progress_bar=False,
        trackers=opened,
    )
    for step, metrics in enumerate(TRAIN, start=1):
        log.train_step(step, metrics)
    log.eval_step(4, EVAL)
    log.close()
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def as_tracker_rows(lines: list[dict]) -> dict[int, dict[str, float]]:
    """metrics.jsonl lines as {step: {"train/loss": ..., "eval/loss": ...}}."""
    rows: dict[int, dict[str, float]] = {}
    for line in lines:
        split = line.pop("split")
        step = line.pop("step")
        rows.setdefault(step, {}).update({f"{split}/{k}": v for k, v in line.items()})
    return rows


class RecordingTracker:
    def __init__(self):
        self.logged, self.finished = [], 0

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def finish(self):
        self.finished += 1


def test_trackers_get_every_metrics_jsonl_line(tmp_path):
    fake = RecordingTracker()
    lines = log_a_run(str(tmp_path), [fake])
    assert [step for step, _ in fake.logged] == [2, 4, 4]
    assert fake.finished == 1
    sent: dict[int, dict[str, float]] = {}
    for step, metrics in fake.logged:
        sent.setdefault(step, {}).update(metrics)
    assert sent == as_tracker_rows(lines)


def test_a_disabled_log_opens_no_tracker_run(tmp_path):
    fake = RecordingTracker()
    log = MetricsLog(str(tmp_path), num_steps=2, enabled=False, trackers=[fake])
    log.train_step(1, TRAIN[0])
    log.close()
    assert fake.logged == [] and fake.finished == 0


def test_settings_follow_the_config():
    assert trackers.tracker_settings(logging_section()) == []
    assert trackers.tracker_settings(logging_section("p", mode="disabled")) == []
    assert trackers.tracker_settings(logging_section("p", trackio_project="t")) == [
        TrackerSettings("wandb", "p", "run-a", "", "offline"),
        TrackerSettings("trackio", "t", "run-b"),
    ]


def test_a_missing_package_names_the_extra(monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    settings = trackers.tracker_settings(logging_section("p", trackio_project="t"))
    with pytest.raises(
        TrackerPackageError, match=r"logging.wandb is set but wandb is not installed"
    ):
        trackers.check_tracker_packages(settings)
    with pytest.raises(TrackerPackageError, match=r"pip install 'flux_jax\[wandb\]'"):
        trackers.open_trackers(settings, RUN_CONFIG, "/nonexistent")


# --- real runs, read back ----------------------------------------------------------------------


def read_wandb_records(path: Path) -> list:
    """The protobuf Records of a W&B transaction log (.wandb): a 7-byte header (":W&B", magic,
    version), then LevelDB log blocks of 32 KiB holding records cut into FULL/FIRST/MIDDLE/LAST
    chunks, each behind a 7-byte header (crc32, little-endian length, type). wandb 0.31 ships no
    Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, offset, pending, out = 32768, 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_history_and_config(run_file: Path) -> tuple[dict[int, dict[str, float]], dict]:
    history: dict[int, dict[str, float]] = {}
    config: dict = {}
    for record in read_wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): item.value_json
                for item in record.history.item
            }
            step = int(json.loads(items.pop("_step")))
            history.setdefault(step, {}).update(
                {k: json.loads(v) for k, v in items.items() if not k.startswith("_")}
            )
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({u.key: json.loads(u.value_json) for u in updates if u.key != "_wandb"})
    return history, config


def test_wandb_offline_records_every_metric_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the extra; installed with flux_jax[test]
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    settings = trackers.tracker_settings(logging_section("flux-test", mode="offline"))
    opened = trackers.open_trackers(settings, RUN_CONFIG, str(tmp_path / "run"))
    lines = log_a_run(str(tmp_path / "run"), opened)
    import wandb

    wandb.teardown()  # finish() returns before wandb-core has flushed the run file; this waits
    (run_file,) = (tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb")
    history, config = wandb_history_and_config(run_file)
    assert history == as_tracker_rows(lines)
    assert config == RUN_CONFIG


TRACKIO_SCRIPT = """
import json, sys
from flux_jax import trackers
from flux_jax.metrics_log import MetricsLog
from trackio.sqlite_storage import SQLiteStorage
settings = [trackers.TrackerSettings("trackio", "flux-test", "run-b")]
opened = trackers.open_trackers(settings, json.loads(sys.argv[2]), sys.argv[1])
log = MetricsLog(sys.argv[1], num_steps=4, every_steps=2, tensorboard=False, progress_bar=False,
                 trackers=opened)
for step, metrics in enumerate(json.loads(sys.argv[3]), start=1):
    log.train_step(step, metrics)
log.eval_step(4, json.loads(sys.argv[4]))
log.close()
print("RESULT", json.dumps({"logs": SQLiteStorage.get_logs("flux-test", "run-b"),
      "config": SQLiteStorage.get_run_config("flux-test", "run-b")}))
"""


def test_trackio_records_every_metric_and_the_config(tmp_path):
    """In a subprocess: trackio fixes its database directory ($TRACKIO_DIR) at import."""
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    args = [str(tmp_path / "run"), json.dumps(RUN_CONFIG), json.dumps(TRAIN), json.dumps(EVAL)]
    done = subprocess.run(
        [sys.executable, "-c", TRACKIO_SCRIPT, *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    logged: dict[int, dict[str, float]] = {}
    for row in result["logs"]:
        step = row.pop("step")
        row.pop("timestamp")
        logged.setdefault(step, {}).update(row)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert logged == as_tracker_rows([json.loads(line) for line in f])
    assert {k: v for k, v in result["config"].items() if not k.startswith("_")} == RUN_CONFIG


# --- through the trainer -----------------------------------------------------------------------


def tiny_run_config(output_dir: Path, **overrides: str):
    from flux_jax.demo import demo_config

    config = demo_config()
    settings = {
        "output_dir": str(output_dir),
        "num_steps": 2,
        "batch_size": 8,
        "checkpoint.save_steps": 2,
        "checkpoint.async_save": False,
        "eval.every_steps": 0,  # eval once, at the end
        "eval.max_batches": 1,
        "logging.every_steps": 1,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "data.max_length": 32,
        "data.max_prompt_length": 8,
    }
    return config.apply_overrides([f"{k}={v}" for k, v in {**settings, **overrides}.items()])


def test_the_trainer_refuses_a_tracker_without_its_package_before_loading(tmp_path, monkeypatch):
    from flux_jax import FluxTrainer

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name: None if name == "trackio" else real(name)
    )
    monkeypatch.setattr(
        "flux_jax.trainer.load_model", lambda *a, **k: pytest.fail("loaded the model first")
    )
    config = tiny_run_config(tmp_path / "run", **{"logging.trackio.project": "p"})
    with pytest.raises(TrackerPackageError, match=r"pip install 'flux_jax\[trackio\]'"):
        FluxTrainer(config)


@pytest.mark.slow  # a whole fit (compiles train and eval steps); the wiring test above is fast
def test_a_training_run_logs_every_metric_to_wandb_offline(tmp_path, monkeypatch):
    """One real fit: W&B gets each metrics.jsonl line (train steps and the final eval) and the
    config."""
    from flux_jax import FluxTrainer

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = {"logging.wandb.project": "flux-test", "logging.wandb.mode": "offline"}
    config = tiny_run_config(tmp_path / "run", **overrides)
    FluxTrainer(config).fit()
    import wandb

    wandb.teardown()
    (run_file,) = (tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb")
    history, logged_config = wandb_history_and_config(run_file)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert {line["split"] for line in lines} == {"train", "eval"}
    assert history == as_tracker_rows(lines)
    assert logged_config == json.loads(json.dumps(config.to_dict()))
