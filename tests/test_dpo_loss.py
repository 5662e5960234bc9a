"""The public DPO API (`dpo_loss`, `dpo_objective`) and the regularisers against independent NumPy
formulas, by-hand metrics and finite-difference gradients in float64. Every loss of the family is
checked against its paper in tests/test_loss_family.py and against TRL in
tests/test_loss_family_trl.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import dpo
from flux_jax.dpo import LOSS_TYPES, dpo_loss, dpo_objective, kl_penalty, sft_loss

N = 6
CLASSIC = ("sigmoid", "ipo", "hinge", "robust")  # the four this file's NumPy formulas cover


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)  # log(1 / (1 + e^-x)), overflow-free


def _numpy_dpo(pc, pr, rc, rr, *, loss_type, beta, ls, reference_free, nc=None, nr=None):
    """The published per-pair formulas (TRL DPOTrainer), in float64, averaged over pairs."""
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    if loss_type == "ipo":  # TRL length-normalises every log-prob for IPO
        pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
    h = (pc - pr) - (0.0 if reference_free else (rc - rr))
    if loss_type == "sigmoid":
        losses = -(1 - ls) * _log_sigmoid(beta * h) - ls * _log_sigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - ls) * _log_sigmoid(beta * h) + ls * _log_sigmoid(-beta * h)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
    return losses.mean(), {
        "chosen_reward": chosen_r.mean(),
        "rejected_reward": rejected_r.mean(),
        "reward_margin": (chosen_r - rejected_r).mean(),
        "reward_accuracy": (chosen_r > rejected_r).mean(),
        "chosen_logps": pc.mean(),
        "rejected_logps": pr.mean(),
    }


def _random_logps(seed):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (-rng.uniform(5, 60, size=N).astype(np.float32) for _ in range(4))
    nc = rng.integers(3, 40, size=N).astype(np.int32)
    nr = rng.integers(3, 40, size=N).astype(np.int32)
    return pc, pr, rc, rr, nc, nr


@pytest.mark.parametrize("loss_type", CLASSIC)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reference_free", [False, True])
def test_loss_matches_numpy_formula(loss_type, label_smoothing, reference_free):
    if label_smoothing and not dpo.LOSSES[loss_type].uses_label_smoothing:
        label_smoothing = 0.0  # refused with a non-zero value (test_validation)
    pc, pr, rc, rr, nc, nr = _random_logps(0)
    beta = 0.3 if loss_type != "ipo" else 0.5
    loss, metrics = dpo_loss(
        jnp.asarray(pc),
        jnp.asarray(pr),
        jnp.asarray(rc),
        jnp.asarray(rr),
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        chosen_token_counts=jnp.asarray(nc),
        rejected_token_counts=jnp.asarray(nr),
    )
    want_loss, want_metrics = _numpy_dpo(
        pc,
        pr,
        rc,
        rr,
        loss_type=loss_type,
        beta=beta,
        ls=label_smoothing,
        reference_free=reference_free,
        nc=nc,
        nr=nr,
    )
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=2e-5, atol=1e-6)
    for key, want in want_metrics.items():
        np.testing.assert_allclose(metrics[key], want, rtol=2e-5, atol=1e-6, err_msg=key)


def test_sigmoid_is_ln2_when_policy_equals_reference():
    pc, pr, _, _, _, _ = _random_logps(1)
    loss, metrics = dpo_loss(
        jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(pc), jnp.asarray(pr), beta=0.1
    )
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
    assert float(metrics["reward_margin"]) == 0.0 and float(metrics["reward_accuracy"]) == 0.0
    # Label smoothing cannot move it: both terms are log 2 at h = 0.
    loss_ls, _ = dpo_loss(
        jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(pc), jnp.asarray(pr), label_smoothing=0.3
    )
    np.testing.assert_allclose(loss_ls, math.log(2.0), rtol=1e-6)


def test_metrics_by_hand():
    # beta 0.5; chosen rewards 0.5 * [1, 0] = [0.5, 0]; rejected 0.5 * [-1, 1] = [-0.5, 0.5].
    loss, m = dpo_loss(
        jnp.asarray([-1.0, -2.0]),
        jnp.asarray([-3.0, -1.0]),
        jnp.asarray([-2.0, -2.0]),
        jnp.asarray([-2.0, -2.0]),
        beta=0.5,
    )
    assert float(m["chosen_reward"]) == pytest.approx(0.25)
    assert float(m["rejected_reward"]) == pytest.approx(0.0)
    assert float(m["reward_margin"]) == pytest.approx(0.25)
    assert float(m["reward_accuracy"]) == pytest.approx(0.5)  # pair 0 right, pair 1 wrong
    assert float(m["chosen_logps"]) == pytest.approx(-1.5)
    assert float(m["rejected_logps"]) == pytest.approx(-2.0)
    # h = [2, -1]: loss = mean(log(1 + e^-1), log(1 + e^0.5)).
    want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)


def test_reference_free_ignores_ref_in_loss_but_not_in_rewards():
    pc, pr, rc, rr = (jnp.asarray(x) for x in _random_logps(2)[:4])
    loss_a, m_a = dpo_loss(pc, pr, rc, rr, reference_free=True)
    loss_b, m_b = dpo_loss(pc, pr, rc + 3.0, rr - 7.0, reference_free=True)
    assert float(loss_a) == float(loss_b)
    # TRL: the reward metrics still use the ref log-probs passed in.
    np.testing.assert_allclose(m_b["chosen_reward"], m_a["chosen_reward"] - 0.1 * 3.0, rtol=1e-5)


@pytest.mark.parametrize("loss_type", CLASSIC)
def test_gradients_match_finite_differences(loss_type):
    pc, pr, rc, rr, nc, nr = _random_logps(3)
    # Small log-ratios keep every pair away from the hinge's kink at beta * h = 1.
    pr = pc + np.random.default_rng(4).normal(size=N).astype(np.float32)
    with jax.enable_x64(True):
        x0 = np.stack([pc, pr, rc, rr]).astype(np.float64)
        counts = {"chosen_token_counts": jnp.asarray(nc), "rejected_token_counts": jnp.asarray(nr)}

        @jax.jit
        def f(x):
            ls = 0.1 if dpo.LOSSES[loss_type].uses_label_smoothing else 0.0
            loss, _ = dpo_loss(
                x[0], x[1], x[2], x[3], loss_type=loss_type, beta=0.2, label_smoothing=ls, **counts
            )
            return loss

        grad = np.asarray(jax.grad(f)(jnp.asarray(x0)))
        assert grad.dtype == np.float64
        eps = 1e-6
        fd = np.zeros_like(x0)
        for idx in np.ndindex(*x0.shape):
            step = np.zeros_like(x0)
            step[idx] = eps
            fd[idx] = (float(f(jnp.asarray(x0 + step))) - float(f(jnp.asarray(x0 - step)))) / (
                2 * eps
            )
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    assert np.abs(grad).max() > 1e-4  # a real gradient, not trivially zero


def test_validation():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="valid loss types.*sigmoid.*ipo.*hinge.*robust"):
        dpo_loss(x, x, x, x, loss_type="not_a_loss")
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(x, x, x, x, beta=beta)
    for ls in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(x, x, x, x, label_smoothing=ls)
    with pytest.raises(ValueError, match="token_counts"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_token_counts"):
        dpo_objective(x, x, x, x, sft_coef=0.1)
    with pytest.raises(ValueError, match="policy_token_logps"):
        dpo_objective(x, x, x, x, kl_coef=0.1)


def test_jit_and_metrics_carry_no_gradient():
    pc, pr, rc, rr = (jnp.asarray(x) for x in _random_logps(5)[:4])
    loss = jax.jit(lambda *a: dpo_loss(*a)[0])(pc, pr, rc, rr)
    np.testing.assert_allclose(loss, dpo_loss(pc, pr, rc, rr)[0], rtol=1e-6)
    grad = jax.grad(lambda p: dpo_loss(p, pr, rc, rr)[1]["chosen_reward"])(pc)
    assert float(jnp.abs(grad).max()) == 0.0


def test_sft_loss_by_hand():
    # Per-token NLLs 12 / 4 = 3 and 5 / 5 = 1, averaged over pairs (not tokens): 2.
    assert float(sft_loss(jnp.asarray([-12.0, -5.0]), jnp.asarray([4, 5]))) == pytest.approx(2.0)
    # A pair with no response tokens contributes 0, not NaN.
    assert float(sft_loss(jnp.asarray([0.0, -5.0]), jnp.asarray([0, 5]))) == pytest.approx(0.5)


def test_kl_penalty_matches_numpy_k3():
    rng = np.random.default_rng(6)
    pi = -rng.uniform(0.1, 5, size=(4, 9)).astype(np.float32)
    ref = pi + rng.normal(scale=0.5, size=pi.shape).astype(np.float32)
    mask = (rng.uniform(size=pi.shape) < 0.6).astype(np.int32)
    mask[:, 0] = 1  # column 0 is never a scored token and must be ignored
    pi_masked = np.where(mask.astype(bool), pi, 1e4)  # garbage off-mask must not leak
    kl = kl_penalty(jnp.asarray(pi_masked), jnp.asarray(ref), jnp.asarray(mask))
    scored = mask.astype(bool)
    scored[:, 0] = False
    d = (ref - pi).astype(np.float64)[scored]
    want = np.mean(np.exp(d) - d - 1)
    np.testing.assert_allclose(kl, want, rtol=1e-5)
    assert float(kl) > 0
    assert float(kl_penalty(jnp.asarray(pi), jnp.asarray(pi), jnp.asarray(mask))) == 0.0
    # Its gradient pushes pi toward ref: d/dpi k3 = 1 - exp(ref - pi).
    g = jax.grad(lambda p: kl_penalty(p, jnp.asarray(ref), jnp.asarray(mask)))(jnp.asarray(pi))
    want_g = np.where(scored, 1 - np.exp(ref - pi), 0.0) / scored.sum()
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)


def test_dpo_objective_combines_terms():
    pc, pr, rc, rr, nc, nr = (jnp.asarray(x) for x in _random_logps(7))
    rng = np.random.default_rng(8)
    pol_tok = jnp.asarray(-rng.uniform(0.1, 3, size=(2 * N, 10)), jnp.float32)
    ref_tok = pol_tok + jnp.asarray(rng.normal(scale=0.3, size=(2 * N, 10)), jnp.float32)
    mask = jnp.ones((2 * N, 10), jnp.int32)
    kw = dict(chosen_token_counts=nc, rejected_token_counts=nr, beta=0.2)

    base, base_m = dpo_objective(pc, pr, rc, rr, **kw)
    dpo, _ = dpo_loss(pc, pr, rc, rr, **kw)
    assert float(base) == float(dpo) and "sft_loss" not in base_m and "kl" not in base_m

    total, m = dpo_objective(
        pc,
        pr,
        rc,
        rr,
        sft_coef=0.5,
        kl_coef=0.25,
        policy_token_logps=pol_tok,
        ref_token_logps=ref_tok,
        token_loss_mask=mask,
        **kw,
    )
    sft = float(np.mean(-np.asarray(pc) / np.asarray(nc)))
    kl = float(kl_penalty(pol_tok, ref_tok, mask))
    np.testing.assert_allclose(m["sft_loss"], sft, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-6)
    np.testing.assert_allclose(total, float(dpo) + 0.5 * sft + 0.25 * kl, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], total, rtol=1e-6)
    np.testing.assert_allclose(m["dpo_loss"], dpo, rtol=1e-6)


# -- one settings object and the loss registry ---------------------------------------------------


def test_the_step_entry_equals_the_keyword_api():
    pc, pr, rc, rr, nc, nr = (jnp.asarray(x) for x in _random_logps(9))
    for loss_type in CLASSIC:
        kw = dict(loss_type=loss_type, beta=0.3, label_smoothing=0.0, reference_free=False)
        settings = dpo.DPOSettings(**kw, sft_coef=0.5)
        counts = dict(chosen_token_counts=nc, rejected_token_counts=nr)
        want, want_m = dpo_objective(pc, pr, rc, rr, sft_coef=0.5, **kw, **counts)
        pair = dpo.PairLogps(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr)
        got, got_m = dpo.dpo_objective_for(settings, pair)
        assert float(got) == float(want), loss_type
        assert {k: float(v) for k, v in got_m.items()} == {k: float(v) for k, v in want_m.items()}


def test_settings_from_config_and_checks():
    from flux_jax import FluxConfig

    config = FluxConfig.default()
    config.apply_overrides(
        ["algorithm.loss_type=ipo", "algorithm.beta=0.5", "grad_accum_steps=2", "batch_size=8"]
    )
    settings = dpo.DPOSettings.from_config(config.validate(), logprob_chunk_size=64)
    assert settings == dpo.DPOSettings(
        loss_type="ipo",
        beta=0.5,
        logprob_chunk_size=64,
        grad_accum_steps=2,
        logits_metrics=True,  # logging.logits_metrics: on in the config, as TRL logs them
    )
    assert settings.loss_type == ("ipo",) and settings.loss_weights == (1.0,)
    assert settings.loss.length_normalised
    hash(settings)  # static under jit
    with pytest.raises(ValueError, match="sft_coef and kl_coef must be >= 0"):
        dpo.DPOSettings(kl_coef=-1.0)


def test_the_schema_choices_are_the_registry():
    from flux_jax.config_schema import SCHEMA

    assert SCHEMA["algorithm"]["loss_type"].choices == tuple(dpo.LOSSES) == LOSS_TYPES
    for loss in dpo.LOSSES.values():  # each documents its formula and its paper
        assert "arXiv:" in loss.losses.__doc__, loss.name


def test_a_registered_loss_is_usable_by_name():
    from flux_jax.losses import registry

    @dpo.register_loss("squared_margin")
    def squared_margin(x, s):
        """A toy loss for this test."""
        return (1 - s.beta * x.delta_score) ** 2

    try:
        pc, pr, rc, rr = (jnp.asarray(x) for x in _random_logps(10)[:4])
        loss, _ = dpo.dpo_loss(pc, pr, rc, rr, loss_type="squared_margin")
        h = (np.asarray(pc) - np.asarray(pr)) - (np.asarray(rc) - np.asarray(rr))
        np.testing.assert_allclose(loss, np.mean((1 - 0.1 * h) ** 2), rtol=1e-5)
        with pytest.raises(ValueError, match="already registered"):
            dpo.register_loss("sigmoid")(squared_margin)
    finally:  # the registration ends with the test
        del registry.LOSSES["squared_margin"]
