"""The loss family against TRL 1.16's own code on the same log-prob tensors (the referee):
`DPOTrainer._compute_loss` for its 15 loss types, MPO weights, f-DPO, LD-DPO and WPO;
`CPOTrainer.cpo_loss` for CPO/SimPO; `ORPOTrainer.odds_ratio_loss` for ORPO. Everything in
float64 on both sides (TRL's ORPO casts to fp32: 1e-6 there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("trl")
import torch  # noqa: E402

from flux_jax.losses import LOSSES, DPOSettings, PairLogps, reweighting  # noqa: E402
from flux_jax.losses.objective import preference_loss  # noqa: E402
from tests import trl_referee  # noqa: E402

B, T = 6, 14
DPO_TRAINER_LOSSES = [n for n, loss in LOSSES.items() if loss.trl == "DPOTrainer"]
TRL_SMOOTHED = {"robust": 0.2, "exo_pair": 1e-3, "aot": 0.2, "aot_unpaired": 0.2}
# BCO: TRL 1.16 dropped the running-mean shift; a long zero-mean history makes ours ~0 too.
ZERO_SHIFT = {"bco_reward_mean": 0.0, "bco_batches": 1e13}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, T - 1, size=2 * B)
    mask = ((np.arange(T)[None] >= 1) & (np.arange(T)[None] <= lengths[:, None])).astype(np.int64)
    tokens = -rng.uniform(0.05, 2.5, size=(2 * B, T)) * mask
    ref_tokens = (tokens + rng.normal(scale=0.4, size=tokens.shape)) * mask
    log_sum_sq = np.log(rng.uniform(0.05, 0.9, size=tokens.shape)) * mask
    return dict(tokens=tokens, ref_tokens=ref_tokens, mask=mask, lengths=lengths, lss=log_sum_sq)


def _ours(b, **settings):
    names = settings["loss_type"]
    names = (names,) if isinstance(names, str) else names
    free = not any(LOSSES[n].needs_reference for n in names)
    with jax.enable_x64(True):
        s = DPOSettings(reference_free=free, **settings)
        sums, ref_sums = b["tokens"].sum(1), b["ref_tokens"].sum(1)
        wpo = None
        if s.use_weighting:
            wpo = reweighting.wpo_log_weights(
                jnp.asarray(b["tokens"]), jnp.asarray(b["lss"]), jnp.asarray(b["mask"])
            )
        pair = PairLogps(
            jnp.asarray(sums[:B]),
            jnp.asarray(sums[B:]),
            jnp.asarray(ref_sums[:B]),
            jnp.asarray(ref_sums[B:]),
            chosen_counts=jnp.asarray(b["lengths"][:B]),
            rejected_counts=jnp.asarray(b["lengths"][B:]),
            policy_tokens=jnp.asarray(b["tokens"]),
            ref_tokens=jnp.asarray(b["ref_tokens"]),
            token_mask=jnp.asarray(b["mask"]),
            wpo_log_weights=wpo,
        )
        state = {k: jnp.float64(v) for k, v in ZERO_SHIFT.items()}
        loss, _ = preference_loss(s, pair, state if "bco_pair" in s.loss_type else None)
        return float(loss)


def _trl(b, *, ld_alpha=None, **kw):
    ref_sums = b["ref_tokens"]
    if ld_alpha is not None:  # TRL precomputes the reference with the same LD weighting
        w = np.asarray(reweighting.ld_token_weights(jnp.asarray(b["mask"]), ld_alpha))
        ref_sums = ref_sums * w
    ref_sums = ref_sums.sum(1)
    return trl_referee.trl_dpo_loss(
        b["tokens"],
        b["mask"],
        ref_sums[:B],
        ref_sums[B:],
        ld_alpha=ld_alpha,
        log_sum_sq_NxT=b["lss"],
        **kw,
    )


@pytest.mark.parametrize("name", DPO_TRAINER_LOSSES)
def test_dpo_trainer_losses_match_trl(batch, name):
    ls = TRL_SMOOTHED.get(name, 0.0)
    for beta in (0.1, 0.5, 2.0):
        ours = _ours(batch, loss_type=name, beta=beta, label_smoothing=ls)
        trl = _trl(batch, loss_type=[name], beta=beta, label_smoothing=ls)
        # TRL makes EXO's epsilon an fp32 tensor: log(eps) carries fp32 rounding there.
        rtol = 1e-7 if name == "exo_pair" else 1e-9
        np.testing.assert_allclose(ours, trl, rtol=rtol, err_msg=f"{beta=}")


def test_mpo_weights_match_trl(batch):
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    ours = _ours(batch, loss_type=tuple(names), loss_weights=tuple(weights), beta=0.2)
    trl = _trl(batch, loss_type=names, loss_weights=weights, beta=0.2)
    np.testing.assert_allclose(ours, trl, rtol=1e-9)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_matches_trl(batch, kind):
    # alpha = 0.5: TRL 1.16's alpha-divergence is the paper's at 1 - alpha, the same only here.
    for name in ("sigmoid", "ipo", "robust", "discopop"):
        ls = TRL_SMOOTHED.get(name, 0.0)
        kw = dict(beta=0.3, label_smoothing=ls, f_divergence_type=kind, f_alpha_divergence_coef=0.5)
        ours = _ours(batch, loss_type=name, **kw)
        # TRL's alpha-divergence refuses float64 (its clamp table has no entry): fp32 there.
        fp32 = kind == "alpha_divergence"
        trl = _trl(batch, loss_type=[name], dtype=torch.float32 if fp32 else torch.float64, **kw)
        np.testing.assert_allclose(ours, trl, rtol=2e-6 if fp32 else 1e-9, err_msg=name)


def test_ld_dpo_matches_trl(batch):
    for alpha in (0.0, 0.5):
        for name in ("sigmoid", "sft"):
            loss_type = (name,) if name != "sft" else ("sigmoid", "sft")
            ours = _ours(batch, loss_type=loss_type, beta=0.2, ld_alpha=alpha)
            trl = _trl(batch, loss_type=list(loss_type), beta=0.2, ld_alpha=alpha)
            np.testing.assert_allclose(ours, trl, rtol=1e-9, err_msg=f"{alpha=} {name}")


def test_wpo_weighting_matches_trl(batch):
    for name in ("sigmoid", "ipo", "bco_pair"):
        ours = _ours(batch, loss_type=name, beta=0.2, use_weighting=True)
        trl = _trl(batch, loss_type=[name], beta=0.2, use_weighting=True)
        np.testing.assert_allclose(ours, trl, rtol=1e-9, err_msg=name)


def _free_pair(b):
    sums = b["tokens"].sum(1)
    return (
        sums[:B],
        sums[B:],
        b["lengths"][:B].astype(np.float64),
        b["lengths"][B:].astype(np.float64),
    )


def _ours_free(b, **settings):
    pc, pr, nc, nr = _free_pair(b)
    with jax.enable_x64(True):
        pair = PairLogps(
            jnp.asarray(pc),
            jnp.asarray(pr),
            chosen_counts=jnp.asarray(nc),
            rejected_counts=jnp.asarray(nr),
        )
        loss, m = preference_loss(DPOSettings(reference_free=True, **settings), pair)
        return float(loss), {k: float(v) for k, v in m.items()}


def test_simpo_and_cpo_match_trl_cpo_trainer(batch):
    pc, pr, nc, nr = _free_pair(batch)
    nll = -pc.sum() / nc.sum()  # TRL's CPO NLL: cross-entropy over the chosen labels
    for beta, ls in ((0.1, 0.0), (2.0, 0.2)):
        simpo = trl_referee.trl_cpo_losses(
            pc / nc, pr / nr, loss_type="simpo", beta=beta, label_smoothing=ls, gamma=0.7
        ).mean()
        ours, _ = _ours_free(
            batch, loss_type="simpo", beta=beta, label_smoothing=ls, simpo_gamma=0.7
        )
        np.testing.assert_allclose(ours, simpo, rtol=1e-9)
        cpo = (
            trl_referee.trl_cpo_losses(
                pc, pr, loss_type="sigmoid", beta=beta, label_smoothing=ls, gamma=0.0
            ).mean()
            + 0.5 * nll
        )
        ours, m = _ours_free(batch, loss_type="cpo", beta=beta, label_smoothing=ls, cpo_alpha=0.5)
        np.testing.assert_allclose(ours, cpo, rtol=1e-9)
        np.testing.assert_allclose(m["cpo/nll_loss"], nll, rtol=1e-12)


def test_orpo_odds_ratio_matches_trl_orpo_trainer(batch):
    pc, pr, nc, nr = _free_pair(batch)
    for beta in (0.1, 0.5):
        ratio_terms, log_odds = trl_referee.trl_orpo_terms(pc / nc, pr / nr, beta=beta)
        ours, m = _ours_free(batch, loss_type="orpo", beta=beta)
        # Ours = paper NLL (pair mean of per-token NLLs) - mean(beta * logsig(log_odds)); TRL
        # computes the odds-ratio part in fp32.
        np.testing.assert_allclose(ours - m["orpo/nll_loss"], -ratio_terms.mean(), rtol=1e-6)
        np.testing.assert_allclose(m["orpo/log_odds_chosen"], log_odds, rtol=1e-6)
        np.testing.assert_allclose(m["orpo/nll_loss"], np.mean(-pc / nc), rtol=1e-12)
