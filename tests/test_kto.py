"""KTO on unpaired data (flux_jax.losses.unpaired, flux_jax.data.unpaired*): the loss against the
paper's equations in float64 NumPy and against TRL 1.16's own `KTOTrainer` code, its gradient
by finite differences, the step-1 value, the records' errors, the KL rows against TRL's
cycling, and a tiny end-to-end fit.

The referees are independent of our code: `paper_kto` is written from Ethayarajh et al. 2024
(arXiv:2402.01306, eq. 8: L = E[lambda_y - v(x, y)], v = lambda_D sig(b (r - z0)) for desirable
y, lambda_U sig(b (z0 - r)) for undesirable; z0 = max(0, mean KL-row log-ratio)), and TRL's
`_compute_loss` runs unbound on a stand-in `self` with a stand-in model returning the log-probs
we give it (as tests/trl_referee.py does for DPO).
"""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax.losses import DPOSettings, kto_loss

B = 7
BETAS = (0.05, 0.5, 3.0)
WEIGHTS = ((1.0, 1.0), (1.33, 0.7))  # (desirable_weight, undesirable_weight)


def _logps(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.uniform(-60, -5, B)
    ref_kl = rng.uniform(-80, -10, B)
    return {
        "pi": ref + rng.normal(0, 2, B),
        "pi_kl": ref_kl + rng.normal(0.5, 2, B),  # mean KL-row log-ratio > 0: z0 not clamped
        "ref": ref,
        "ref_kl": ref_kl,
        "labels": np.array([1, 0, 1, 1, 0, 0, 1], bool),
    }


def _sig(z):
    return 1 / (1 + np.exp(-z))


def paper_kto(x, *, beta, dw, uw, loss_type="kto"):
    """The paper's eq. 8 (KTO) or APO-zero's unpaired form, in float64 NumPy."""
    r = x["pi"] - x["ref"]
    z0 = max(0.0, float(np.mean(x["pi_kl"] - x["ref_kl"]))) if loss_type == "kto" else 0.0
    lam = np.where(x["labels"], dw, uw)
    if loss_type == "kto":
        v = np.where(x["labels"], dw * _sig(beta * (r - z0)), uw * _sig(beta * (z0 - r)))
        return float(np.mean(lam - v)), z0
    v = np.where(x["labels"], dw * _sig(beta * r), uw * (1 - _sig(beta * r)))
    return float(np.mean(lam - v)), z0


def _ours(x, dtype, **kw):
    args = [jnp.asarray(x[k], dtype) for k in ("pi", "pi_kl", "ref", "ref_kl")]
    return kto_loss(*args, jnp.asarray(x["labels"]), **kw)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_matches_the_paper_in_float64(loss_type):
    x = _logps(0)
    worst = 0.0
    with jax.enable_x64(True):
        for beta in BETAS:
            for dw, uw in WEIGHTS:
                loss, metrics = _ours(
                    x,
                    jnp.float64,
                    loss_type=loss_type,
                    beta=beta,
                    desirable_weight=dw,
                    undesirable_weight=uw,
                )
                want, z0 = paper_kto(x, beta=beta, dw=dw, uw=uw, loss_type=loss_type)
                assert loss.dtype == jnp.float64
                np.testing.assert_allclose(float(loss), want, rtol=1e-12)
                np.testing.assert_allclose(float(metrics["kl"]), z0, rtol=1e-12)
                worst = max(worst, abs(float(loss) - want) / abs(want))
    print(f"max relative difference to float64 paper ({loss_type}): {worst:.1e}")


def test_kl_baseline_is_clamped_at_zero_and_has_no_gradient():
    x = _logps(1)
    x["pi_kl"] = x["ref_kl"] - 3.0  # a negative KL estimate
    with jax.enable_x64(True):
        loss, metrics = _ours(x, jnp.float64, beta=0.5)
        assert float(metrics["kl"]) == 0.0
        np.testing.assert_allclose(float(loss), paper_kto(x, beta=0.5, dw=1, uw=1)[0], rtol=1e-12)
        args = [jnp.asarray(x[k]) for k in ("pi", "pi_kl", "ref", "ref_kl")]
        x["pi_kl"] = x["ref_kl"] + 2.0
        args = [jnp.asarray(x[k]) for k in ("pi", "pi_kl", "ref", "ref_kl")]
        grad_kl = jax.grad(lambda kl: kto_loss(args[0], kl, *args[2:], x["labels"])[0])(args[1])
        assert np.all(np.asarray(grad_kl) == 0)  # z0 is a baseline, not trained through


def test_gradient_matches_finite_differences():
    x = _logps(2)
    with jax.enable_x64(True):
        rest = [jnp.asarray(x[k]) for k in ("pi_kl", "ref", "ref_kl")]

        def f(pi):
            return kto_loss(
                pi, *rest, x["labels"], beta=0.7, desirable_weight=1.2, undesirable_weight=0.8
            )[0]

        pi = jnp.asarray(x["pi"])
        grad = np.asarray(jax.grad(f)(pi))
        eps = 1e-6
        fd = np.array(
            [(f(pi.at[i].add(eps)) - f(pi.at[i].add(-eps))) / (2 * eps) for i in range(B)]
        )
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-12)
    assert np.abs(grad).min() > 1e-4  # every example's loss moves with its own log-prob


def test_step_one_value_is_one_half_per_example_weighted():
    """policy == reference: every log-ratio is 0 and z0 = 0, so each example's loss is
    weight * (1 - sig(0)) = weight / 2."""
    x = _logps(3)
    x["pi"], x["pi_kl"] = x["ref"].copy(), x["ref_kl"].copy()
    loss, metrics = _ours(x, jnp.float32, beta=0.1, desirable_weight=2.0, undesirable_weight=1.0)
    n_desirable = x["labels"].sum()
    want = (2.0 * n_desirable + 1.0 * (B - n_desirable)) / 2 / B
    np.testing.assert_allclose(float(loss), want, rtol=1e-7)
    assert float(metrics["kl"]) == 0.0
    assert float(_ours(x, jnp.float32, beta=0.1)[0]) == pytest.approx(0.5, rel=1e-7)


# --- TRL 1.16's own KTO code as the referee -------------------------------------------------


class _Accelerator:
    import torch as _torch

    device = _torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x


def trl_kto(x, *, loss_type="kto", beta=0.1, dw=1.0, uw=1.0, grad=False):
    """TRL 1.16 `KTOTrainer._compute_loss` on summed log-probs (each row's sum sits in its first
    scored column; the loss reads only the sums). Returns (loss, metrics, d loss / d pi)."""
    import torch
    from trl.trainer.kto_trainer import KTOTrainer

    t = 4
    pi = torch.tensor(x["pi"], dtype=torch.float64, requires_grad=grad)
    pi_kl = torch.tensor(x["pi_kl"], dtype=torch.float64)

    def per_token(sums):
        return torch.cat([sums[:, None], torch.zeros(len(sums), t - 2, dtype=sums.dtype)], 1)

    inputs = {
        "input_ids": torch.zeros(B, t, dtype=torch.long),
        "attention_mask": torch.ones(B, t, dtype=torch.long),
        "completion_mask": torch.ones(B, t, dtype=torch.long),
        "KL_input_ids": torch.ones(B, t, dtype=torch.long),
        "KL_attention_mask": torch.ones(B, t, dtype=torch.long),
        "KL_completion_mask": torch.ones(B, t, dtype=torch.long),
        "label": torch.tensor(x["labels"]),
        "ref_logps": torch.tensor(x["ref"], dtype=torch.float64),
        "ref_KL_logps": torch.tensor(x["ref_kl"], dtype=torch.float64),
    }

    def model(input_ids, **_):
        sums = pi_kl if input_ids is inputs["KL_input_ids"] else pi
        zeros = torch.zeros(B, t - 1, dtype=torch.float64)
        return SimpleNamespace(
            log_probs=per_token(sums), entropy=zeros, mean_logits=zeros, aux_loss=None
        )

    model.training = True
    this = SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=loss_type == "kto",
        loss_type=loss_type,
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    this._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(this, m, b)
    loss = KTOTrainer._compute_loss(this, model, inputs, return_outputs=False)
    d_pi = None
    if grad:
        loss.backward()
        d_pi = pi.grad.numpy()
    metrics = {k: float(v[-1]) for k, v in this._metrics["train"].items()}
    return float(loss.detach()), metrics, d_pi


def _grad_pi(x, **kw):
    """d loss / d policy log-probs of the examples (float64 when x64 is on)."""
    rest = [jnp.asarray(x[k]) for k in ("pi_kl", "ref", "ref_kl")]
    return jax.grad(lambda pi: kto_loss(pi, *rest, x["labels"], **kw)[0])(jnp.asarray(x["pi"]))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_matches_trl_kto_trainer(loss_type):
    pytest.importorskip("trl")
    worst = {"loss": 0.0, "grad": 0.0}
    for seed in (0, 4):
        x = _logps(seed)
        for beta in BETAS:
            for dw, uw in WEIGHTS:
                kw = dict(beta=beta, desirable_weight=dw, undesirable_weight=uw)
                want, trl_metrics, trl_grad = trl_kto(
                    x, loss_type=loss_type, beta=beta, dw=dw, uw=uw, grad=True
                )
                with jax.enable_x64(True):
                    loss, metrics = _ours(x, jnp.float64, loss_type=loss_type, **kw)
                    grad = _grad_pi(x, loss_type=loss_type, **kw)
                np.testing.assert_allclose(float(loss), want, rtol=1e-12)
                np.testing.assert_allclose(np.asarray(grad), trl_grad, rtol=1e-10, atol=1e-15)
                for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
                    np.testing.assert_allclose(float(metrics[name]), trl_metrics[name], rtol=1e-12)
                np.testing.assert_allclose(
                    float(metrics["rewards/margins"]), trl_metrics["rewards/margins"], rtol=1e-10
                )
                worst["loss"] = max(worst["loss"], abs(float(loss) - want) / abs(want))
                scale = np.abs(trl_grad).max()
                worst["grad"] = max(
                    worst["grad"], np.abs(np.asarray(grad) - trl_grad).max() / scale
                )
        # fp32 inputs (what training computes in) against TRL in float64 on the same values.
        x32 = {
            k: (v.astype(np.float32).astype(np.float64) if v.dtype != bool else v)
            for k, v in x.items()
        }
        want, _, _ = trl_kto(x32, loss_type=loss_type, beta=0.5)
        got, _ = _ours(x32, jnp.float32, loss_type=loss_type, beta=0.5)
        np.testing.assert_allclose(float(got), want, rtol=2e-6)
    print(f"max relative difference to TRL ({loss_type}): {worst}")


# --- settings and config ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(loss_type=("kto", "sigmoid")), "mixes unpaired losses"),
        (dict(loss_type="kto", sft_coef=0.1), "sft_coef does not apply"),
        (dict(loss_type="kto", reference_free=True), "reference_free does not apply"),
        (dict(loss_type="kto", label_smoothing=0.1), "no effect"),
        (dict(loss_type="kto", desirable_weight=-1.0), "desirable_weight and"),
    ],
)
def test_settings_refuse_what_kto_cannot_do(kw, match):
    with pytest.raises(ValueError, match=match):
        DPOSettings(**kw)


def test_pairwise_objective_refuses_kto_without_labels():
    from flux_jax import dpo

    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="needs their labels"):
        dpo.dpo_loss(x, x, x, x, loss_type="kto")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- data: records, KL rows ---------------------------------------------------------------

UNPAIRED_ROWS = [
    {"prompt": "What is 2 + 2? ", "completion": "4, of course.", "label": True},
    {"prompt": "Name a colour: ", "completion": "Green.", "label": False},
    {"prompt": "Say hello. ", "completion": "Hello there, friend!", "label": True},
    {"prompt": "Count to three: ", "completion": "1 2 3", "label": False},
    # A long completion, then a long prompt: the last row's KL row (its prompt + this
    # completion) is over max_length and must be cut as TRL's collator cuts it.
    {"prompt": "Is water wet? ", "completion": "No idea at all, " * 6, "label": True},
    {"prompt": "A long prompt: " + "word " * 12, "completion": "ok", "label": False},
]


@pytest.fixture(scope="module")
def tokenizer():
    from flux_jax.tiny_tokenizer import build_tiny_tokenizer

    texts = [r["prompt"] + r["completion"] for r in UNPAIRED_ROWS]
    return build_tiny_tokenizer(texts * 4, vocab_size=400)


@pytest.mark.parametrize(
    "record, field, reason",
    [
        ({"prompt": "p", "completion": "c", "label": "true"}, "label", "expected a JSON boolean"),
        ({"prompt": "p", "completion": "c", "label": 1}, "label", "has type number"),
        ({"prompt": "p", "completion": "c"}, "label", "is missing"),
        ({"prompt": "p", "label": True}, "completion", "is missing"),
        ({"prompt": "p", "completion": "  ", "label": False}, "completion", "is empty"),
        (
            {"prompt": [], "completion": [{"role": "user"}], "label": True},
            "completion[0].content",
            "is missing",
        ),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, tokenizer, record, field, reason):
    from flux_jax.data import DataError
    from flux_jax.data.unpaired import load_unpaired_examples

    path = _write_jsonl(tmp_path / "kto.jsonl", [UNPAIRED_ROWS[0], record])
    with pytest.raises(DataError, match=reason) as err:
        load_unpaired_examples(path, tokenizer, max_length=64, max_prompt_length=32)
    assert str(err.value).startswith(f"{path}:2: field '{field}'")
    skipped, stats = load_unpaired_examples(
        path, tokenizer, max_length=64, max_prompt_length=32, on_bad_record="skip"
    )
    assert len(skipped) == 1 and stats.bad_records == 1


def test_chat_records_render_like_the_paired_formats(tmp_path, tokenizer):
    from flux_jax.data import load_preference_examples
    from flux_jax.data.unpaired import load_unpaired_examples

    user = [{"role": "user", "content": "Name a colour."}]
    answer = {"role": "assistant", "content": "Green."}
    other = {"role": "assistant", "content": "No."}
    unpaired = _write_jsonl(
        tmp_path / "u.jsonl", [{"prompt": user, "completion": answer, "label": True}]
    )
    paired = _write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": user, "chosen": answer, "rejected": other}]
    )
    opts = dict(max_length=64, max_prompt_length=32)
    (ours,), _ = load_unpaired_examples(unpaired, tokenizer, **opts)
    (pair,), _ = load_preference_examples(paired, tokenizer, data_format="conversational", **opts)
    assert ours.label is True
    np.testing.assert_array_equal(ours.prompt_ids, pair.prompt_ids)
    np.testing.assert_array_equal(ours.completion_ids, pair.chosen_ids)


def test_kl_partners_rotate_within_each_micro_batch():
    from flux_jax.data.unpaired_batching import kl_partner_indices

    np.testing.assert_array_equal(kl_partner_indices(4), [3, 0, 1, 2])  # TRL: (x1,y4),(x2,y1)...
    # grad_accum's strided split: micro-batch 0 = rows 0, 2, 4; micro-batch 1 = rows 1, 3, 5.
    np.testing.assert_array_equal(kl_partner_indices(6, 2), [4, 5, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 examples per micro-batch"):
        kl_partner_indices(4, 4)


def test_kl_rows_match_trl_cycling_and_collator(tmp_path, tokenizer):
    """Our batch's rows against TRL 1.16's own `_prepare_dataset` (joint tokenisation, KL
    completions cycled by +1 within a batch) and `DataCollatorForUnpairedPreference` (which
    truncates the KL rows to max_length), token for token."""
    datasets = pytest.importorskip("datasets")
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    datasets.disable_progress_bars()
    from flux_jax.data.unpaired import load_unpaired_examples
    from flux_jax.data.unpaired_batching import collate_unpaired

    n, max_length = len(UNPAIRED_ROWS), 40
    stand_in = SimpleNamespace(
        _tokenizer=tokenizer, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0
    )
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, per_device_train_batch_size=n)
    prepared = kto.KTOTrainer._prepare_dataset(
        stand_in, datasets.Dataset.from_list(UNPAIRED_ROWS), tokenizer, args, "t"
    )
    collator = kto.DataCollatorForUnpairedPreference(
        pad_token_id=tokenizer.pad_token_id, max_length=max_length
    )
    trl_batch = collator([dict(r) for r in prepared])

    path = _write_jsonl(tmp_path / "kto.jsonl", UNPAIRED_ROWS)
    examples, _ = load_unpaired_examples(
        path, tokenizer, max_length=max_length, max_prompt_length=30, tokenization="joint"
    )
    batch = collate_unpaired(examples, tokenizer.pad_token_id, (64,), max_length=max_length)
    np.testing.assert_array_equal(batch["label"], [r["label"] for r in UNPAIRED_ROWS])
    for ours, theirs in (("chosen", ""), ("rejected", "KL_")):
        for i in range(n):
            length = int(trl_batch[f"{theirs}attention_mask"][i].sum())
            assert batch[f"{ours}_segment_ids"][i].sum() == length, (ours, i)
            np.testing.assert_array_equal(
                batch[f"{ours}_input_ids"][i, :length], trl_batch[f"{theirs}input_ids"][i, :length]
            )
            np.testing.assert_array_equal(
                batch[f"{ours}_loss_mask"][i, :length],
                trl_batch[f"{theirs}completion_mask"][i, :length],
            )
    assert batch["rejected_segment_ids"][n - 1].sum() == max_length  # the KL row was cut
    assert batch["chosen_segment_ids"].sum(axis=1).max() < max_length  # no other row was


# --- config and training --------------------------------------------------------------------


def _kto_config(tmp_path, **overrides):
    from flux_jax.demo import demo_config

    config = demo_config()
    config.output_dir = str(tmp_path / "run")
    config.num_steps = 3
    config.batch_size = 8  # one example per fake CPU device
    config.logging.progress_bar = False
    config.logging.every_steps = 1
    config.data.max_length = 64
    config.data.max_prompt_length = 32
    settings = {
        "data.format": "unpaired",
        "algorithm.loss_type": "kto",  # data.token_cache stays at its default (true)
        **overrides,
    }
    config.apply_overrides([f"{k}={v}" for k, v in settings.items()])
    return config


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"algorithm.loss_type": "sigmoid"}, r"algorithm.loss_type=\['sigmoid'\] and data.format"),
        ({"data.format": "preferences"}, r"algorithm.loss_type=\['kto'\] and data.format"),
        ({"algorithm.precompute_ref_logps": "true"}, "precompute_ref_logps is not supported"),
        ({"model.packing": "true"}, "model.packing is not supported"),
        ({"data.eval_path": "x.jsonl"}, "data.eval_path is not supported"),
        ({"batch_size": "2", "grad_accum_steps": "2"}, ">= 2 examples per micro-batch"),
        ({"algorithm.desirable_weight": "-1"}, "desirable_weight and"),
    ],
)
def test_config_refuses_what_unpaired_training_cannot_do(tmp_path, overrides, match):
    from flux_jax.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=match):
        _kto_config(tmp_path, **overrides).validate()


def test_cli_names_both_keys_when_loss_and_format_disagree(capsys):
    from flux_jax.cli import main

    assert main(["train", "--config.algorithm.loss_type=kto"]) == 2
    err = capsys.readouterr().err
    assert "algorithm.loss_type=['kto'] and data.format='preferences' do not match" in err


def _unpaired_batch(n=6, seed=0):
    from flux_jax.data.unpaired import UnpairedExample
    from flux_jax.data.unpaired_batching import collate_unpaired
    from tests.train_fixtures import TINY

    rng = np.random.default_rng(seed)
    examples = [
        UnpairedExample(
            prompt_ids=rng.integers(3, TINY.vocab_size, int(rng.integers(2, 8))).astype(np.int32),
            completion_ids=rng.integers(3, TINY.vocab_size, int(rng.integers(1, 9))).astype(
                np.int32
            ),
            label=bool(i % 2),
            source="mem",
            line=i + 1,
        )
        for i in range(n)
    ]
    return collate_unpaired(examples, 0, (16,), max_length=16)


def test_train_step_objective_is_kto_of_the_rows():
    """dpo_loss_fn on an unpaired batch: chosen rows = the examples, rejected rows = their KL
    rows, labels from the batch; its value is kto_loss of the rows' summed log-probs, and 0.5
    when the policy is the reference."""
    from flux_jax import batch_logprobs
    from flux_jax import train_step as ts
    from flux_jax.models.qwen.model import build_model
    from tests.train_fixtures import TINY

    graphdef, ref_params = ts.split_model(build_model(TINY, seed=0))
    params = jax.tree.map(lambda p: p * 1.05, ref_params)
    batch = {k: jnp.asarray(v) for k, v in _unpaired_batch().items()}
    settings = DPOSettings(
        loss_type="kto", beta=0.5, undesirable_weight=1.5, logprob_chunk_size=None
    )
    kw = dict(graphdef=graphdef, ref_params=ref_params, settings=settings)
    objective = jax.jit(lambda p: ts.dpo_loss_fn(p, batch, **kw))
    at_start, _ = objective(ref_params)
    assert float(at_start) == pytest.approx((0.5 * 3 + 0.75 * 3) / 6, rel=1e-6)
    loss, metrics = objective(params)

    @jax.jit
    def sums(p):
        tokens, *_ = batch_logprobs.token_logprobs(graphdef, p, batch, None)
        return batch_logprobs.pair_sums(tokens, batch)

    (pi, pi_kl), (ref, ref_kl) = sums(params), sums(ref_params)
    want, want_metrics = kto_loss(
        pi, pi_kl, ref, ref_kl, batch["label"], beta=0.5, undesirable_weight=1.5
    )
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(float(want_metrics["kl"]), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="does not train on paired data"):
        paired = {k: v for k, v in batch.items() if k != "label"}
        jax.eval_shape(lambda p: ts.dpo_loss_fn(p, paired, **kw), params)
    with pytest.raises(ValueError, match="does not train on unpaired data"):
        pairwise = {**kw, "settings": DPOSettings(logprob_chunk_size=None)}
        jax.eval_shape(lambda p: ts.dpo_loss_fn(p, batch, **pairwise), params)


@pytest.mark.slow
def test_fit_on_unpaired_jsonl_starts_at_one_half(tmp_path):
    """A tiny KTO run: step 1's policy is the reference, so every log-ratio and z0 are 0 and
    the loss is exactly 0.5 (equal weights); the weights then scale it, and training moves."""
    from flux_jax import FluxTrainer
    from flux_jax.trainer import DEMO_TRAIN

    rows = []
    with open(DEMO_TRAIN) as f:
        for i, line in enumerate(f):
            pair = json.loads(line)
            answer = pair["chosen"] if i % 3 else pair["rejected"]
            rows.append({"prompt": pair["prompt"], "completion": answer, "label": i % 3 != 0})
    data = _write_jsonl(tmp_path / "kto.jsonl", rows[:24])
    config = _kto_config(tmp_path, **{"algorithm.beta": "0.5", "learning_rate": "1e-3"})
    result = FluxTrainer(config.validate()).fit(prompts=data)
    first, last = result.history[0], result.history[-1]
    assert first["loss"] == pytest.approx(0.5, rel=1e-6)
    assert first["kl"] == 0.0 and first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert len(result.history) == 3 and last["loss"] != first["loss"]
    assert "reward_accuracy" not in first and 0 < first["desirable_fraction"] < 1
