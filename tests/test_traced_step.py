"""The traced train step kept beside the compilation cache (flux_jax.traced_step): a repeated run
reads it instead of tracing and trains bit-identically; another setting is another program; a
damaged file is traced again with a warning; the off switch."""

from __future__ import annotations

import logging
import shutil

import jax

from flux_jax import FluxTrainer, run_parts
from flux_jax.traced_step import SUBDIR, ReusedStep, reuse_traced_step
from flux_jax.trainer import DEMO_TRAIN
from tests.test_trainer import _config


def _runs(tmp_path, monkeypatch):
    """fit(name, **overrides) -> (losses, the ReusedStep of that run or the plain step)."""
    data = str(tmp_path / "pairs.jsonl")  # not the demo path: no automatic eval split
    shutil.copyfile(DEMO_TRAIN, data)
    made = []
    make = run_parts.reuse_traced_step

    def recording(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(run_parts, "reuse_traced_step", recording)

    def fit(name, **overrides):
        overrides = {"num_steps": 2, "compile_cache.dir": str(tmp_path / "xla"), **overrides}
        config = _config(tmp_path / name, **overrides)
        result = FluxTrainer(config).fit(prompts=data)
        return [h["loss"] for h in result.history], made[-1]

    return fit


def test_a_repeated_run_reads_the_step_and_trains_the_same(tmp_path, monkeypatch, caplog):
    fit = _runs(tmp_path, monkeypatch)
    first, step = fit("a")
    assert isinstance(step, ReusedStep) and step.written >= 1 and step.loaded == 0
    # Another output_dir and logging: not part of the program, so the same key.
    again, step = fit("b", **{"logging.every_steps": 2})
    assert step.loaded >= 1 and step.written == 0
    assert again == first  # one program, one executable: bit-identical
    # A setting the step reads is another program.
    _, step = fit("c", **{"algorithm.beta": 0.2})
    assert step.loaded == 0 and step.written >= 1
    # A damaged program is traced again, with a warning naming the file.
    for path in (tmp_path / "xla" / SUBDIR).glob("*.jaxexport"):
        path.write_bytes(b"not a program")
    with caplog.at_level(logging.WARNING, logger="flux_jax.traced_step"):
        damaged, step = fit("d")
    assert step.loaded == 0 and damaged == first
    assert "could not be read" in caplog.text and ".jaxexport" in caplog.text


def test_off_switch_and_no_cache_give_the_plain_step():
    def step(state, batch, frozen):
        return state, {}

    assert reuse_traced_step(step, enabled=False, context={}, state_shardings=None) is step
    previous = jax.config.jax_enable_compilation_cache
    try:
        jax.config.update("jax_enable_compilation_cache", False)  # compile_cache.enabled: false
        assert reuse_traced_step(step, enabled=True, context={}, state_shardings=None) is step
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
