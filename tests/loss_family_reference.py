"""Every loss of the family in float64 NumPy, written from its paper's equation (not from
flux_jax's code): the reference of tests/test_loss_family*.py. Inputs are per-pair [B] arrays:
summed log-probs `pc, pr` (policy), `rc, rr` (reference; 0 for reference-free methods) and
response lengths `nc, nr`."""

from __future__ import annotations

import numpy as np


def logsig(z):
    return -np.logaddexp(0.0, -z)


def sig(z):
    return np.exp(logsig(z))


def smoothed(z, ls):
    # Logistic loss against a label that is flipped with probability ls (cDPO, rDPO's clean part).
    return -(1 - ls) * logsig(z) - ls * logsig(-z)


def per_pair_losses(name, pc, pr, rc, rr, nc, nr, *, beta, ls=0.0, delta=None, **extra):
    """The per-pair losses [B] of loss `name` (`sft` and `cpo` include a batch-level NLL)."""
    uc, ur = pc - rc, pr - rr  # log pi/ref of chosen and rejected
    h = uc - ur
    b = beta
    if name == "sigmoid":  # DPO eq. 7 / cDPO
        return smoothed(b * h, ls)
    if name == "hinge":  # SLiC rank calibration with margin 1
        return np.maximum(0.0, 1.0 - b * h)
    if name == "ipo":  # IPO eq. 17 on per-token log-ratios
        return ((uc / nc - ur / nr) - 1.0 / (2 * b)) ** 2
    if name == "exo_pair":  # EXO eq. 16: KL(softmax(b [uc, ur]) || [1 - eps, eps])
        logits = np.stack([b * uc, b * ur])
        log_pf = logits - np.logaddexp(logits[0], logits[1])
        log_prh = np.log(np.array([1 - ls, ls]))[:, None]
        return (np.exp(log_pf) * (log_pf - log_prh)).sum(axis=0)
    if name == "nca_pair":  # NCA: -log sig(r_w) - 1/2 sum_y log sig(-r_y)
        return -logsig(b * uc) - 0.5 * (logsig(-b * uc) + logsig(-b * ur))
    if name == "robust":  # rDPO eq. 9
        clean, flipped = -logsig(b * h), -logsig(-b * h)
        return ((1 - ls) * clean - ls * flipped) / (1 - 2 * ls)
    if name == "bco_pair":  # BCO: classifier on rewards shifted by their running mean
        if delta is None:
            delta = np.concatenate([b * uc, b * ur]).mean()
        return -logsig(b * uc - delta) - logsig(-(b * ur - delta))
    if name == "sppo_hard":  # SPPO eq. 4.7, P = 1 / 0, eta = 1 / b
        eta = 1.0 / b
        return (uc - eta * (1 - 0.5)) ** 2 + (ur - eta * (0 - 0.5)) ** 2
    if name == "aot":  # sorted policy margins vs sorted reference margins
        return smoothed(b * (np.sort(pc - pr) - np.sort(rc - rr)), ls)
    if name == "aot_unpaired":
        return smoothed(b * (np.sort(uc) - np.sort(ur)), ls)
    if name == "apo_zero":  # APO eq. 7 (+1)
        return 1 - sig(b * uc) + sig(b * ur)
    if name == "apo_down":  # APO eq. 8 (+1)
        return sig(b * uc) + 1 - sig(b * (uc - ur))
    if name == "discopop":  # DiscoPOP eq. 5
        rho, tau = b * h, extra.get("discopop_tau", 0.05)
        w = sig(rho / tau)
        return (1 - w) * -logsig(rho) + w * np.exp(-rho)
    if name == "sft":  # token-mean NLL of the chosen responses
        return np.full_like(pc, -pc.sum() / nc.sum())
    if name == "sigmoid_norm":  # Tulu 3 length-normalised DPO
        return -logsig(b * (uc / nc - ur / nr))
    if name == "simpo":  # SimPO eq. 6
        gamma = extra.get("simpo_gamma", 0.5)
        return smoothed(b * (pc / nc - pr / nr) - gamma, ls)
    if name == "cpo":  # CPO eqs. 3 + 6
        alpha = extra.get("cpo_alpha", 1.0)
        return smoothed(b * (pc - pr), ls) + alpha * (-pc.sum() / nc.sum())
    if name == "orpo":  # ORPO eqs. 2, 6, 7: odds(y) = P / (1 - P), P = exp(mean token logp)
        p_c, p_r = np.exp(pc / nc), np.exp(pr / nr)
        log_or = np.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
        return -pc / nc - b * logsig(log_or)
    raise KeyError(name)


def f_scores(u, kind, alpha=0.5):
    """f-DPO (arXiv:2309.16240, Table 1): f'(t) at t = exp(u), up to a constant shared by both
    sides."""
    t = np.exp(u)
    if kind == "reverse_kl":  # f = t log t: f' = log t + 1
        return np.log(t) + 1
    if kind == "forward_kl":  # f = -log t: f' = -1 / t
        return -1 / t
    if kind == "js_divergence":  # f = t log t - (t + 1) log((t + 1) / 2): f' = log(2t / (1 + t))
        return np.log(2 * t / (1 + t))
    if kind == "alpha_divergence":  # f' = (1 - t^-alpha) / alpha
        return (1 - t ** (-alpha)) / alpha
    raise KeyError(kind)
