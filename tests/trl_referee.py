"""TRL 1.16's own loss code run on given log-prob tensors, without a model: the referee for the
loss family (tests/test_loss_family_trl.py).

`DPOTrainer._compute_loss` is called unbound on a stand-in `self` carrying exactly the attributes
it reads, with a stand-in model whose forward returns the per-token log-probs we give it (TRL's
fused LM head returns `log_probs` [2B, T - 1], zero off the completion mask). The reference
log-probs are passed as precomputed, so no reference model is needed either. CPO/SimPO and ORPO
are methods of TRL's experimental trainers and are called the same way.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def _model_output(
    token_logps_NxS: torch.Tensor,
    log_sum_sq_NxS: torch.Tensor | None,
    mean_logits_NxS: torch.Tensor | None = None,
):
    n, s = token_logps_NxS.shape
    return SimpleNamespace(
        log_probs=token_logps_NxS,
        log_sum_sq_probs=log_sum_sq_NxS if log_sum_sq_NxS is not None else torch.zeros(n, s),
        entropy=torch.zeros(n, s),
        mean_logits=mean_logits_NxS if mean_logits_NxS is not None else torch.zeros(n, s),
        is_top1=torch.zeros(n, s, dtype=torch.bool),
        aux_loss=None,
    )


def trl_dpo_loss(
    policy_tokens_NxT: np.ndarray,
    mask_NxT: np.ndarray,
    ref_chosen: np.ndarray,
    ref_rejected: np.ndarray,
    *,
    loss_type: list[str],
    loss_weights: list[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    log_sum_sq_NxT: np.ndarray | None = None,
    mean_logits_NxT: np.ndarray | None = None,
    dtype: torch.dtype = torch.float64,
    with_metrics: bool = False,
) -> float | tuple[float, dict[str, float]]:
    """TRL 1.16 `DPOTrainer._compute_loss` on per-token policy log-probs [2B, T] (chosen rows
    first; column t scores token t, column 0 never) and precomputed reference sums [B], in
    `dtype` (TRL's alpha-divergence only accepts fp16/bf16/fp32). `with_metrics`: also the
    metrics TRL logged for the call (its `_metrics["train"]`, last values)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    tokens = torch.as_tensor(np.asarray(policy_tokens_NxT, np.float64)).to(dtype)
    mask = torch.as_tensor(np.asarray(mask_NxT)).long()
    mask[:, 0] = 0
    n, t = tokens.shape
    # TRL's completion_mask is over input_ids; log_probs[:, s] scores token s + 1.
    shifted = (tokens * mask)[:, 1:]
    lss = None if log_sum_sq_NxT is None else torch.as_tensor(log_sum_sq_NxT)[:, 1:].to(dtype)
    mean_logits = None
    if mean_logits_NxT is not None:
        mean_logits = torch.as_tensor(mean_logits_NxT)[:, 1:].to(dtype)

    def model(**_):
        return _model_output(shifted, lss, mean_logits)

    model.training = True
    this = SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=True,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=list(loss_type),
        loss_weights=loss_weights or [1.0] * len(loss_type),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": torch.as_tensor(np.asarray(ref_chosen, np.float64)).to(dtype),
        "ref_rejected_logps": torch.as_tensor(np.asarray(ref_rejected, np.float64)).to(dtype),
    }
    loss = DPOTrainer._compute_loss(this, model, inputs, return_outputs=False)
    if with_metrics:
        return float(loss), {k: float(v[-1]) for k, v in this._metrics["train"].items()}
    return float(loss)


def trl_lm_head_outputs(
    hidden_NxTxD: np.ndarray, lm_head_DxV: np.ndarray, input_ids_NxT: np.ndarray
) -> dict[str, np.ndarray]:
    """TRL 1.16's fused LM head (`ChunkedLogProbFunction`, its torch path on CPU) on our hidden
    states and head: `log_probs`, `log_sum_sq_probs`, `mean_logits`, each [N, T] aligned with
    input_ids (column t from hidden t - 1; column 0 zero). TRL folds its statistics in fp32."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    n, t, d = hidden_NxTxD.shape
    hidden = torch.tensor(np.asarray(hidden_NxTxD, np.float32))[:, :-1].reshape(-1, d)
    weight = torch.tensor(np.asarray(lm_head_DxV, np.float32)).T.contiguous()
    targets = torch.as_tensor(np.asarray(input_ids_NxT, np.int64))[:, 1:].reshape(-1)
    outputs = ("log_sum_sq_probs", "mean_logits")
    logps, _, lss, mean_logits, _ = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, 4096, None, 1.0, outputs
    )

    def aligned(x: torch.Tensor) -> np.ndarray:
        return np.pad(x.detach().double().numpy().reshape(n, t - 1), ((0, 0), (1, 0)))

    return {
        "log_probs": aligned(logps),
        "log_sum_sq_probs": aligned(lss),
        "mean_logits": aligned(mean_logits),
    }


def trl_cpo_losses(pc, pr, *, loss_type: str, beta: float, label_smoothing: float, gamma: float):
    """TRL 1.16 `CPOTrainer.cpo_loss` per pair (its preference part; the NLL is added apart)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    this = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        simpo_gamma=gamma,
        accelerator=_Accelerator(),
    )
    losses, _, _ = CPOTrainer.cpo_loss(this, torch.as_tensor(pc), torch.as_tensor(pr))
    return losses.numpy()


def trl_orpo_terms(avg_c, avg_r, *, beta: float):
    """TRL 1.16 `ORPOTrainer.odds_ratio_loss`: per-pair `beta * logsigmoid(log_odds)` (ORPO
    subtracts its mean from the NLL) and the mean log-odds."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    this = SimpleNamespace(beta=beta, accelerator=_Accelerator())
    losses, _, _, _, log_odds = ORPOTrainer.odds_ratio_loss(
        this, torch.as_tensor(avg_c), torch.as_tensor(avg_r)
    )
    return losses.numpy(), float(log_odds)
