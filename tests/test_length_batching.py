"""Less padding: the geometric bucket ladder, length-grouped batches (exact resume), the
trainer's batch plan, and one batch shape on every process (multi-process packing)."""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import grain
import numpy as np
import pytest

from flux_jax.config import FluxConfig
from flux_jax.data.batching import (
    collate_pairs,
    default_bucket_lengths,
    geometric_bucket_lengths,
    real_and_computed_tokens,
)
from flux_jax.data.length_grouping import length_grouped_order
from flux_jax.data.loading import process_share
from flux_jax.data.packing import pair_length
from flux_jax.data.pipeline import preference_batches
from flux_jax.data.tokenization import PreferenceExample
from flux_jax.train_batches import (
    AgreedWidths,
    batch_plan,
    layout_lengths,
    token_counts,
    training_batches,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from make_length_mix import mix_lengths  # noqa: E402

sys.path.pop(0)


def examples_of(lengths: np.ndarray) -> list[PreferenceExample]:
    """Pairs with the given (prompt, chosen, rejected) word counts; responses get an eos (id 2).
    Token ids encode the pair index so tests can tell pairs apart."""
    out = []
    for i, (p, c, r) in enumerate(lengths):
        ids = np.full(max(p, c, r) + 1, 3 + i % 500, np.int32)
        chosen, rejected = ids[: c + 1].copy(), ids[: r + 1].copy()
        chosen[-1] = rejected[-1] = 2
        out.append(PreferenceExample(ids[:p], chosen, rejected, source="mix", line=i))
    return out


@pytest.fixture(scope="module")
def longtail():
    lengths = mix_lengths("longtail", 256, max_length=1024, max_prompt_length=512, seed=0)
    return examples_of(lengths)


def padded_fraction(batches) -> float:
    real = computed = 0
    for batch in batches:
        r, c = real_and_computed_tokens(batch)
        real, computed = real + r, computed + c
    return 1 - real / computed


def config(**overrides) -> FluxConfig:
    cfg = FluxConfig.default()
    cfg.batch_size = 8
    cfg.apply_overrides([f"{k}={v}" for k, v in overrides.items()])
    return cfg.validate()


def plan_batches(examples, cfg, steps, *, batch_multiple=1):
    counts = [token_counts(examples)]
    plan = batch_plan(cfg, batch_multiple=batch_multiple, counts=counts)
    dataset = training_batches(examples, plan, pad_id=0, counts=counts)
    return plan, list(itertools.islice(dataset, steps))


# ---------------------------------------------------------------------------------------------
# The ladder


def test_geometric_ladder():
    ladder = geometric_bucket_lengths(1024)
    assert len(ladder) == 22  # the count the config doc states
    assert ladder[0] == 64 and ladder[-1] == 1024
    assert all(b % 32 == 0 for b in ladder)
    assert all(b / a <= 1.125 or b - a == 32 for a, b in zip(ladder, ladder[1:], strict=False))
    assert len(geometric_bucket_lengths(4096)) == 34
    # ratio 2 in steps of 64 is the old powers-of-two ladder
    assert geometric_bucket_lengths(1024, ratio=2, multiple=64) == default_bucket_lengths(1024)
    assert geometric_bucket_lengths(300, ratio=2, multiple=64) == default_bucket_lengths(300)
    assert geometric_bucket_lengths(48) == (48,)
    with pytest.raises(ValueError, match="ratio >= 1"):
        geometric_bucket_lengths(1024, ratio=0.5)


def test_config_keys_are_range_checked():
    for key, bad in [
        ("data.bucket_ratio", 0.9),
        ("data.bucket_multiple", 0),
        ("data.length_group_batches", 0),
        ("compile_cache.min_compile_time_s", -1),
    ]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            config(**{key: bad})


# ---------------------------------------------------------------------------------------------
# Length-grouped order


def test_grouped_order_covers_each_epoch_and_groups_by_length():
    lengths = np.random.default_rng(0).integers(10, 1000, 203)
    order = length_grouped_order(lengths, batch_size=8, window_batches=4, seed=3)
    per_epoch = order.batches_per_epoch
    assert per_epoch == 203 // 8
    for epoch in range(2):
        batches = [order.batch_pairs(epoch * per_epoch + j) for j in range(per_epoch)]
        pairs = np.concatenate(batches)
        assert len(set(pairs.tolist())) == len(pairs) == per_epoch * 8  # no pair twice
        for w in range(0, per_epoch, 4):  # within a window the batches tile a sorted order
            window = batches[w : w + 4]
            spans = sorted((lengths[b].max(), lengths[b].min()) for b in window)
            assert all(lo >= hi for (_, lo), (hi, _) in zip(spans[1:], spans, strict=False))
    first = [order.batch_pairs(j).tolist() for j in range(per_epoch)]
    second = [order.batch_pairs(per_epoch + j).tolist() for j in range(per_epoch)]
    assert first != second  # a fresh shuffle per epoch
    again = length_grouped_order(lengths, batch_size=8, window_batches=4, seed=3)
    assert [again.batch_pairs(j).tolist() for j in range(per_epoch)] == first
    other = length_grouped_order(lengths, batch_size=8, window_batches=4, seed=4)
    assert [other.batch_pairs(j).tolist() for j in range(per_epoch)] != first


def test_grouped_order_with_fewer_pairs_than_a_batch():
    order = length_grouped_order([5, 9, 7], batch_size=8, window_batches=2, seed=0)
    batch = order.batch_pairs(0)
    assert len(batch) == 8 and set(batch.tolist()) == {0, 1, 2}


def test_shuffled_order_is_the_old_pipeline(longtail):
    """group_lengths=None keeps the pre-grouping batches exactly (old checkpoints resume)."""
    collate = functools.partial(collate_pairs, pad_id=0, bucket_lengths=(512, 1024))
    old = (
        grain.MapDataset.source(longtail)
        .shuffle(seed=5)
        .repeat(None, reseed_each_epoch=True)
        .batch(8, drop_remainder=True, batch_fn=collate)
    )
    new = preference_batches(
        longtail, batch_size=8, seed=5, num_epochs=None, pad_id=0, bucket_lengths=(512, 1024)
    )
    for k in (0, 1, 31, 32, 33, 70):
        a, b = old[k], new[k]
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_grouped_iterator_resumes_exactly(longtail):
    def iterator():
        dataset = preference_batches(
            longtail[:60],
            batch_size=8,
            seed=1,
            num_epochs=None,
            pad_id=0,
            bucket_lengths=geometric_bucket_lengths(1024),
            group_lengths=[e.longest_sequence for e in longtail[:60]],
            window_batches=3,
        )
        return iter(
            dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=3))
        )

    original = iterator()
    for _ in range(5):
        next(original)
    state = original.get_state()
    expected = [next(original) for _ in range(9)]  # crosses the epoch boundary (7 per epoch)
    restored = iterator()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


# ---------------------------------------------------------------------------------------------
# The trainer's plan: padding before / after


def test_padding_before_and_after(longtail):
    standard = {"model.prefix_sharing": False}
    old = config(
        **standard,
        **{"data.group_by_length": False, "data.bucket_ratio": 2, "data.bucket_multiple": 64},
    )
    _, before = plan_batches(longtail, old, 64)
    _, after = plan_batches(longtail, config(**standard), 64)
    _, shared = plan_batches(longtail, config(), 64)  # the default: prefix_sharing auto -> on
    assert "branch_ids" in shared[0]
    fractions = [padded_fraction(b) for b in (before, after, shared)]
    print("padded fraction (old, standard rows, default):", [round(f, 3) for f in fractions])
    assert fractions[0] > 0.5
    # Standard rows: what is left is mostly chosen vs rejected length (both pad to one width).
    assert fractions[1] < 0.25
    assert fractions[2] < 0.10  # the target, by default
    widths = {b["chosen_input_ids"].shape[1] for b in after}
    assert widths <= set(geometric_bucket_lengths(1024))


def test_layout_lengths_match_packing(longtail):
    counts = token_counts(longtail)
    for flags, share in [
        ({}, True),  # prefix_sharing auto: on with attention xla
        ({"model.prefix_sharing": True}, True),
        ({"model.packing": True, "model.prefix_sharing": False}, False),
    ]:
        plan = batch_plan(config(**flags), batch_multiple=1, counts=[counts])
        want = [pair_length(e, share_prefix=share) for e in longtail]
        np.testing.assert_array_equal(layout_lengths(counts, plan), want)
    plan = batch_plan(config(**{"model.prefix_sharing": False}), batch_multiple=1, counts=[counts])
    np.testing.assert_array_equal(
        layout_lengths(counts, plan), [e.longest_sequence for e in longtail]
    )


# ---------------------------------------------------------------------------------------------
# Several processes: one shape per step


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"data.group_by_length": False},
        {"model.prefix_sharing": True, "model.packing": True},
        {"model.packing": True, "data.max_length": 2048, "data.max_prompt_length": 1024},
    ],
)
def test_processes_agree_on_every_batch_shape(longtail, flags):
    """Two processes' shares (as the loader cuts them) with their own lengths: every batch k has
    one shape on both, the width the wider of the two needs, and the same pairs per row."""
    cfg = config(**flags, batch_size=16)
    shares = [process_share(longtail, p, 2) for p in range(2)]
    counts = [token_counts(share) for share in shares]
    plans = [batch_plan(cfg, batch_multiple=2, counts=counts, process_index=p) for p in range(2)]
    assert plans[0].pairs_per_row == plans[1].pairs_per_row
    if "data.max_length" in flags:
        assert plans[0].pairs_per_row > 1  # short pairs for this max_length: really packed
    streams = [
        training_batches(share, plan, pad_id=0, counts=counts)
        for share, plan in zip(shares, plans, strict=True)
    ]
    agreed = AgreedWidths(plans[0], counts)
    widths, disagreements = set(), 0
    for k in range(40):
        a, b = streams[0][k], streams[1][k]
        assert a.keys() == b.keys()
        assert all(a[key].shape == b[key].shape for key in a)
        assert not any(key.endswith("scored_positions") for key in a)
        width = next(v for key, v in a.items() if key.endswith("input_ids")).shape[1]
        needed = [agreed.needed(p, k) for p in range(2)]
        assert width == max(needed)
        disagreements += needed[0] != needed[1]
        widths.add(width)
    assert disagreements  # on their own the processes would have built different shapes
    assert len(widths) > 1  # not one worst-case shape: each step its own bucket


# ---------------------------------------------------------------------------------------------
# The file benchmark, tiny (a smoke test, not a timing)


def test_bench_file_tiny(tmp_path):
    """tools/make_length_mix.py writes a file and a model dir; tools/bench_file.py trains on them
    and prints JSON with the documented keys."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["JAX_PLATFORMS"] = "cpu"
    tools = REPO / "tools"
    mix = [sys.executable, str(tools / "make_length_mix.py"), "--mix", "longtail", "--pairs", "8"]
    mix += ["--out", str(tmp_path / "mix"), "--model", "tiny", "--max-length", "96"]
    mix += ["--max-prompt-length", "48"]
    subprocess.run(mix, check=True, env=env, cwd=REPO, capture_output=True, timeout=120)
    cmd = [
        sys.executable,
        str(tools / "bench_file.py"),
        "--data",
        str(tmp_path / "mix/train.jsonl"),
    ]
    cmd += ["--model-dir", str(tmp_path / "mix/model"), "--batch", "2", "--steps", "2"]
    cmd += ["--warmup", "1", "--max-length", "96", "--max-prompt-length", "48"]
    cmd += ["--compile-cache", str(tmp_path / "xla")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    for key in ("startup_s", "time_to_first_step_s", "step_time_s", "tokens_per_s"):
        assert result[key] > 0, key
    assert result["startup_s"] <= result["time_to_first_step_s"]
    assert 0 <= result["padded_fraction"] < 1
    assert result["compiles"] >= 1 and result["compiled_shapes"] >= 1
    assert len(result["losses"]) == 3


# ---------------------------------------------------------------------------------------------
# Packing across two real processes, with exact resume

PACKED_WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from flux_jax import FluxTrainer
from flux_jax.demo import demo_config

output_dir, data, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = demo_config()
config.output_dir = output_dir
config.num_steps = num_steps
config.batch_size = 16
config.checkpoint.save_steps = 2
config.checkpoint.async_save = False
config.logging.progress_bar = False
config.logging.tensorboard = False
config.compile_cache.enabled = False
config.data.max_length = 256
config.model.prefix_sharing = True
config.model.packing = True
trainer = FluxTrainer(config)
rows = []
trainer.add_step_callback(lambda r: rows.append((r.step, r.metrics["loss"])))
result = trainer.fit(prompts=data)
norm = jax.jit(lambda p: sum((x ** 2).sum() for x in jax.tree.leaves(p)))(trainer.params)
print("RESULT " + json.dumps({"losses": rows, "norm": float(norm),
                              "resumed": result.resumed_from, "steps": result.num_steps}))
"""


def run_two_processes(output_dir: Path, data: str, num_steps: int) -> list[dict]:
    import json
    import os
    import subprocess

    from tests.test_distributed import _free_port

    port = _free_port()
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
            "PYTHONPATH": str(REPO),
        }
        cmd = [sys.executable, "-c", PACKED_WORKER, str(output_dir), data, str(num_steps)]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    results = []
    for i, proc in enumerate(procs):
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, f"process {i}:\n{out[-4000:]}"
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
    return results


@pytest.mark.slow
def test_packing_across_two_processes_resumes_exactly(tmp_path):
    """model.packing on 2 processes x 4 CPU devices (it used to refuse): both processes see the
    same global losses, and a run stopped at step 2 and resumed ends where an uninterrupted
    run does."""
    from flux_jax.trainer import DEMO_TRAIN

    whole = run_two_processes(tmp_path / "whole", DEMO_TRAIN, 4)
    assert whole[0]["losses"] == whole[1]["losses"] and len(whole[0]["losses"]) == 4
    first = run_two_processes(tmp_path / "split", DEMO_TRAIN, 2)
    assert first[0]["steps"] == 2
    resumed = run_two_processes(tmp_path / "split", DEMO_TRAIN, 4)
    assert resumed[0]["resumed"] == 2
    np.testing.assert_allclose(
        [loss for _, loss in resumed[0]["losses"]],
        [loss for _, loss in whole[0]["losses"][2:]],
        rtol=1e-5,
    )
    np.testing.assert_allclose(resumed[0]["norm"], whole[0]["norm"], rtol=1e-5)
