"""Every loss of the family against its paper's equation in float64 NumPy
(tests/loss_family_reference.py), at several betas and label smoothings; gradients by finite
differences in float64; the MPO combination, f-DPO, LD-DPO, BCO's running mean and the
settings checks. TRL's own code is the referee in tests/test_loss_family_trl.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import dpo
from flux_jax.losses import (
    LOSSES,
    DPOSettings,
    PairLogps,
    initial_loss_state,
    next_loss_state,
    reweighting,
)
from flux_jax.losses import objective as objective_lib
from tests import loss_family_reference as ref

B = 6
REFERENCE_FREE = {name for name, loss in LOSSES.items() if not loss.needs_reference}
# label smoothings each loss is checked at: 0 and 0.2 where it enters the formula
SMOOTHINGS = {name: ((1e-3, 0.2) if name == "exo_pair" else (0.0, 0.2)) for name in LOSSES}
SMOOTHINGS.update({n: (0.0,) for n, loss in LOSSES.items() if not loss.uses_label_smoothing})
BETAS = (0.1, 0.5, 2.0)
# The pairwise losses (the unpaired ones, KTO, have their own tests: tests/test_kto.py).
PAIRWISE = [name for name, loss in LOSSES.items() if not loss.unpaired]


def _logps(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    nc = rng.integers(3, 30, size=B).astype(np.float64)
    nr = rng.integers(3, 30, size=B).astype(np.float64)
    pc, rc = -nc * rng.uniform(0.3, 2.0, size=B), -nc * rng.uniform(0.3, 2.0, size=B)
    pr, rr = -nr * rng.uniform(0.3, 2.0, size=B), -nr * rng.uniform(0.3, 2.0, size=B)
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr)


def _ours(name, x, dtype, **settings):
    free = name in REFERENCE_FREE
    pair = PairLogps(
        *(jnp.asarray(x[k], dtype) for k in ("pc", "pr")),
        *((None, None) if free else (jnp.asarray(x[k], dtype) for k in ("rc", "rr"))),
        chosen_counts=jnp.asarray(x["nc"]),
        rejected_counts=jnp.asarray(x["nr"]),
    )
    s = DPOSettings(loss_type=name, reference_free=free, **settings)
    return objective_lib.preference_loss(s, pair)


def _want(name, x, **kw):
    x = dict(x)
    if name in REFERENCE_FREE:
        x["rc"] = x["rr"] = np.zeros(B)
    return ref.per_pair_losses(name, **x, **kw).mean()


@pytest.mark.parametrize("name", PAIRWISE)
def test_every_loss_matches_its_paper_in_float64(name):
    x = _logps(0)
    with jax.enable_x64(True):
        for beta in BETAS:
            for ls in SMOOTHINGS[name]:
                got, _ = _ours(name, x, jnp.float64, beta=beta, label_smoothing=ls)
                assert got.dtype == jnp.float64
                want = _want(name, x, beta=beta, ls=ls)
                np.testing.assert_allclose(float(got), want, rtol=1e-10, err_msg=f"{beta=} {ls=}")


@pytest.mark.parametrize("name", PAIRWISE)
def test_every_loss_in_float32_is_within_fp32_rounding(name):
    # fp32 inputs of |logp| up to ~60: differences like pc - pr lose ~1e-7 relative of 60, and
    # exp/log1p amplify it by the condition number: measured max 8e-7 (aot), so 5e-6.
    x = {k: v.astype(np.float32).astype(np.float64) for k, v in _logps(1).items()}
    for beta in BETAS:
        for ls in SMOOTHINGS[name]:
            got, _ = _ours(name, x, jnp.float32, beta=beta, label_smoothing=ls)
            assert got.dtype == jnp.float32
            want = _want(name, x, beta=beta, ls=ls)
            np.testing.assert_allclose(float(got), want, rtol=5e-6, err_msg=f"{beta=} {ls=}")


def test_extra_keys_enter_their_losses():
    x = _logps(2)
    with jax.enable_x64(True):
        for name, key, value in [
            ("discopop", "discopop_tau", 0.3),
            ("simpo", "simpo_gamma", 1.7),
            ("cpo", "cpo_alpha", 0.25),
        ]:
            got, _ = _ours(name, x, jnp.float64, beta=0.5, **{key: value})
            want = _want(name, x, beta=0.5, **{key: value})
            np.testing.assert_allclose(float(got), want, rtol=1e-10, err_msg=name)


def test_gradients_match_finite_differences():
    x = _logps(3)
    # Keep h small so the hinge stays on one side of its kink at beta * h = 1 for every pair.
    x["pr"] = x["pc"] - x["rc"] + x["rr"] + np.random.default_rng(4).normal(size=B)
    x["pr"] = np.minimum(x["pr"], -0.5)
    names = PAIRWISE
    with jax.enable_x64(True):
        counts = dict(chosen_counts=jnp.asarray(x["nc"]), rejected_counts=jnp.asarray(x["nr"]))
        # BCO's shift carries no gradient (as TRL: a running mean, detached); a long history
        # makes the current batch's share of it ~1e-12, so finite differences see it fixed too.
        state = {"bco_reward_mean": jnp.float64(0.3), "bco_batches": jnp.float64(1e12)}

        def every_loss(v):  # [len(names)]: one compile for all losses
            out = []
            for name in names:
                free = name in REFERENCE_FREE
                s = DPOSettings(
                    loss_type=name,
                    beta=0.3,
                    label_smoothing=max(SMOOTHINGS[name]),
                    reference_free=free,
                )
                refs = (None, None) if free else (v[2], v[3])
                out.append(
                    objective_lib.preference_loss(s, PairLogps(v[0], v[1], *refs, **counts), state)[
                        0
                    ]
                )
            return jnp.stack(out)

        v0 = np.stack([x["pc"], x["pr"], x["rc"], x["rr"]])
        jac = np.asarray(jax.jit(jax.jacrev(every_loss))(jnp.asarray(v0)))  # [L, 4, B]
        eps = 1e-6
        steps = eps * np.eye(v0.size).reshape(v0.size, *v0.shape)  # one input nudged per row
        f_all = jax.jit(jax.vmap(every_loss))
        fd = (np.asarray(f_all(v0 + steps)) - np.asarray(f_all(v0 - steps))) / (2 * eps)
        fd = fd.T.reshape(len(names), *v0.shape)
    for i, name in enumerate(names):
        np.testing.assert_allclose(jac[i], fd[i], rtol=1e-5, atol=1e-9, err_msg=name)
        assert np.abs(jac[i]).max() > 1e-4, name


def test_step_one_values_from_the_papers():
    # policy == reference: DPO's loss is ln 2 (any beta), IPO's (1 / 2 beta)^2, BCO's 2 ln 2.
    x = _logps(5)
    x["rc"], x["rr"] = x["pc"], x["pr"]
    for beta in BETAS:
        np.testing.assert_allclose(
            float(_ours("sigmoid", x, jnp.float32, beta=beta)[0]), math.log(2)
        )
        ipo, _ = _ours("ipo", x, jnp.float32, beta=beta)
        np.testing.assert_allclose(float(ipo), (1 / (2 * beta)) ** 2, rtol=1e-6)
        bco, _ = _ours("bco_pair", x, jnp.float32, beta=beta)
        np.testing.assert_allclose(float(bco), 2 * math.log(2), rtol=1e-6)


def test_several_losses_are_a_weighted_sum_with_a_metric_each():
    x = _logps(6)
    names, weights = ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)
    with jax.enable_x64(True):
        pair = PairLogps(
            *(jnp.asarray(x[k]) for k in ("pc", "pr", "rc", "rr")),
            chosen_counts=jnp.asarray(x["nc"]),
            rejected_counts=jnp.asarray(x["nr"]),
        )
        s = DPOSettings(loss_type=names, loss_weights=weights, beta=0.2)
        loss, m = objective_lib.training_objective(s, pair)
        parts = {n: _want(n, x, beta=0.2) for n in names}
        np.testing.assert_allclose(
            float(loss), sum(w * parts[n] for n, w in zip(names, weights, strict=True))
        )
        for n in names:
            np.testing.assert_allclose(float(m[f"loss/{n}"]), parts[n], rtol=1e-12)
        default, _ = objective_lib.training_objective(DPOSettings(loss_type=names, beta=0.2), pair)
        np.testing.assert_allclose(float(default), sum(parts.values()), rtol=1e-12)
    one, m1 = _ours("sigmoid", x, jnp.float32)
    assert not any(k.startswith("loss/") for k in m1)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_f_divergence_scores_match_f_dpo(kind, alpha):
    x = _logps(7)
    x["rc"] = x["pc"] + np.random.default_rng(8).normal(size=B)  # |log-ratio| ~ 1: exp stays sane
    x["rr"] = x["pr"] + np.random.default_rng(9).normal(size=B)
    with jax.enable_x64(True):
        for name in ("sigmoid", "hinge", "discopop"):
            got, _ = _ours(
                name, x, jnp.float64, f_divergence_type=kind, f_alpha_divergence_coef=alpha
            )
            sc = ref.f_scores(x["pc"] - x["rc"], kind, alpha)
            sr = ref.f_scores(x["pr"] - x["rr"], kind, alpha)
            # Every loss is a function of h = s_c - s_r; feed NumPy's h through pc with refs 0.
            fake = dict(x, pc=sc - sr, pr=np.zeros(B), rc=np.zeros(B), rr=np.zeros(B))
            want = ref.per_pair_losses(name, **fake, beta=0.1).mean()
            np.testing.assert_allclose(float(got), want, rtol=1e-10, err_msg=name)


def test_ld_dpo_down_weights_the_longer_responses_tail():
    rng = np.random.default_rng(10)
    t = 12
    tokens = -rng.uniform(0.1, 3.0, size=(2 * B, t))
    ref_tokens = tokens + rng.normal(scale=0.3, size=tokens.shape)
    lengths = rng.integers(1, t - 1, size=2 * B)
    mask = (np.arange(t)[None, :] >= 1) & (np.arange(t)[None, :] <= lengths[:, None])
    tokens, ref_tokens = tokens * mask, ref_tokens * mask
    alpha = 0.4
    # NumPy from LD-DPO eq. 9: the first min(l_c, l_r) tokens count 1, the rest alpha.
    shared = np.minimum(lengths[:B], lengths[B:])

    def ld(tok):
        out = np.zeros(2 * B)
        for i in range(2 * B):
            resp = tok[i, 1 : lengths[i] + 1]
            k = shared[i % B]
            out[i] = resp[:k].sum() + alpha * resp[k:].sum()
        return out

    pol, refs = ld(tokens), ld(ref_tokens)
    with jax.enable_x64(True):
        loss, m = dpo.dpo_objective(
            jnp.asarray(tokens.sum(1)[:B]),
            jnp.asarray(tokens.sum(1)[B:]),
            jnp.asarray(ref_tokens.sum(1)[:B]),
            jnp.asarray(ref_tokens.sum(1)[B:]),
            chosen_token_counts=jnp.asarray(lengths[:B]),
            rejected_token_counts=jnp.asarray(lengths[B:]),
            policy_token_logps=jnp.asarray(tokens),
            ref_token_logps=jnp.asarray(ref_tokens),
            token_loss_mask=jnp.asarray(mask.astype(np.int32)),
            ld_alpha=alpha,
            beta=0.3,
        )
    want = ref.smoothed(0.3 * ((pol[:B] - refs[:B]) - (pol[B:] - refs[B:])), 0.0).mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-10)
    np.testing.assert_allclose(float(m["logps/chosen"]), pol[:B].mean(), rtol=1e-12)
    w = np.asarray(reweighting.ld_token_weights(jnp.asarray(mask), 1.0))
    np.testing.assert_array_equal(w, mask.astype(float))  # ld_alpha = 1 is plain DPO


def test_bco_running_mean_is_carried_across_steps():
    s = DPOSettings(loss_type="bco_pair", beta=0.5)
    state = initial_loss_state(s)
    assert set(state) == {"bco_reward_mean", "bco_batches"}
    assert initial_loss_state(DPOSettings()) is None
    seen = []
    for seed in range(3):
        x = _logps(20 + seed)
        pair = PairLogps(*(jnp.asarray(x[k], jnp.float32) for k in ("pc", "pr", "rc", "rr")))
        loss, m = objective_lib.training_objective(s, pair, state)
        m_batch = 0.5 * np.concatenate([x["pc"] - x["rc"], x["pr"] - x["rr"]]).mean()
        seen.append(m_batch)
        delta = np.mean(seen)  # TRL < 0.20's RunningMoments fed one batch mean per step
        np.testing.assert_allclose(float(m["bco/reward_mean"]), delta, rtol=1e-5)
        want = _want("bco_pair", x, beta=0.5, delta=delta)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        state = next_loss_state(state, m, num_microbatches=1)
    assert float(state["bco_batches"]) == 3.0
    np.testing.assert_allclose(float(state["bco_reward_mean"]), np.mean(seen), rtol=1e-5)


def test_loss_specific_metrics():
    x = _logps(11)
    _, m = _ours("simpo", x, jnp.float32, beta=2.0)
    np.testing.assert_allclose(
        float(m["simpo/margin"]), (2.0 * (x["pc"] / x["nc"] - x["pr"] / x["nr"])).mean(), rtol=1e-5
    )
    _, m = _ours("orpo", x, jnp.float32)
    p_c, p_r = np.exp(x["pc"] / x["nc"]), np.exp(x["pr"] / x["nr"])
    log_or = np.log(p_c / (1 - p_c)) - np.log(p_r / (1 - p_r))
    np.testing.assert_allclose(float(m["orpo/log_odds_chosen"]), log_or.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(m["orpo/log_odds_ratio"]), ref.logsig(log_or).mean(), rtol=1e-5
    )
    np.testing.assert_allclose(float(m["orpo/nll_loss"]), (-x["pc"] / x["nc"]).mean(), rtol=1e-5)
    _, m = _ours("sigmoid", x, jnp.float32)
    np.testing.assert_allclose(float(m["logps/chosen"]), x["pc"].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["logps/rejected"]), x["pr"].mean(), rtol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(loss_type="not_a_loss"), "valid loss types: sigmoid, ipo, hinge"),
        (
            dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)),
            "1 weights for the 2 names of loss_type",
        ),
        (dict(loss_type=("sigmoid", "sigmoid")), "lists a loss twice"),
        (dict(loss_type="hinge", label_smoothing=0.1), "no effect with loss_type='hinge'"),
        (dict(loss_type="exo_pair"), "needs label_smoothing > 0"),
        (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), "does not apply to"),
        (dict(f_divergence_type="chi2"), "is not one of"),
        (dict(loss_type="aot", use_weighting=True), "sort pairs over the batch"),
        (dict(loss_type="simpo"), "needs no reference model: set reference_free=true"),
        (dict(ld_alpha=1.5), "ld_alpha must be in"),
        (dict(f_alpha_divergence_coef=1.0), r"in \(0, 1\)"),
    ],
)
def test_settings_refuse_what_the_losses_cannot_do(kw, match):
    with pytest.raises(ValueError, match=match):
        DPOSettings(**kw)


def test_the_registry_declares_what_each_loss_needs():
    for name, loss in LOSSES.items():
        assert "arXiv:" in loss.losses.__doc__, name
    assert REFERENCE_FREE == {"sft", "simpo", "cpo", "orpo"}
    assert {n for n, loss in LOSSES.items() if loss.length_normalised} == {
        "ipo",
        "sigmoid_norm",
        "simpo",
        "orpo",
    }
    assert not DPOSettings(loss_type="simpo", reference_free=True).needs_reference
    assert DPOSettings(loss_type=("simpo", "sigmoid")).needs_reference
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        dpo.dpo_loss(jnp.zeros(2), jnp.zeros(2), None, None)
