"""The jitted DPO train step, and the step that precomputes reference log-probs.

One forward pass of the policy scores the chosen and rejected sequences together (concatenated
along the batch); the reference is the frozen initial weights, run under stop_gradient, or
log-probs precomputed into the batch, or nothing (reference_free). Gradients are accumulated over
micro-batches inside the step, then optax updates the fp32 master weights. The state is donated, so
parameters and optimiser state are updated in place on the device.

With LoRA (flux_jax.lora) the state's `params` are the adapters only, so gradients and optimiser
state exist for them alone; the frozen base is an argument of the step (neither donated nor
differentiated), and the online reference is that same base with the adapters off.

Qwen3-MoE: the policy forward (never the reference's) also returns its router logits, and
`router_aux_loss_coef` times their load-balancing loss (flux_jax.models.qwen.moe) is added to the
objective; the metric `router_aux_loss` reports the loss before the coefficient.

Batches are dicts of arrays (see flux_jax.data): `{chosen,rejected}_{input_ids,loss_mask,
segment_ids,positions}` [B, T], optionally `ref_{chosen,rejected}_logps` [B]; or the shared-prefix
/ packed layout of flux_jax.data.packing (recognised by its `branch_ids`): R rows holding S pairs
each, per-pair values [R, S], which the step flattens to [B = R * S] before the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flux_jax import batch_logprobs, dpo
from flux_jax.dpo import DPOSettings  # the step's settings; importable from here too
from flux_jax.grad_accum import accumulate_gradients, split_microbatches
from flux_jax.lora import ActiveAdapters, LoraSettings
from flux_jax.losses import reweighting

# Re-exported for callers not yet switched to their homes (trainer.py, commands.py,
# preference_eval.py): model_setup.split_model, sharding.shard_batch, sharding.state_shardings_of.
from flux_jax.model_setup import split_model  # noqa: F401
from flux_jax.sharding import opt_state_shardings, replicated_like, shard_batch, state_shardings_of  # noqa: F401

PyTree = Any


def init_train_state(
    params: PyTree, tx: optax.GradientTransformation, loss_state: PyTree | None = None
) -> dict[str, Any]:
    """{"step", "params", "opt_state"}, plus "loss_state" when given (`dpo.initial_loss_state`:
    BCO's running mean, checkpointed with the rest); the optimiser state inherits the
    parameters' shardings."""
    opt_shardings = opt_state_shardings(tx, params)  # None unless params lie on a mesh
    step = jnp.zeros((), jnp.int32)
    if opt_shardings is not None:
        step = jax.device_put(step, replicated_like(params))
    state = {
        "step": step,
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
    }
    if loss_state is not None:  # replicated, like `step`
        state["loss_state"] = jax.tree.map(lambda x: jax.device_put(x, step.sharding), loss_state)
    return state


def _wpo_log_weights(
    policy_tok_NxT: jax.Array,
    head_stats: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    counts_c: jax.Array,
    counts_r: jax.Array,
) -> jax.Array | None:
    """WPO's log-weights [2B] (chosen pairs first) when `log_sum_sq_probs` was computed, else None:
    per response the mean over its tokens of `logp_t - log sum_v p_v^2` (flux_jax.losses.
    reweighting), from per-pair sums, so the shared-prefix / packed layouts work too."""
    if "log_sum_sq_probs" not in head_stats:
        return None
    aligned_c, aligned_r = batch_logprobs.pair_sums(
        policy_tok_NxT - head_stats["log_sum_sq_probs"], batch
    )
    return reweighting.wpo_pair_log_weights(aligned_c, aligned_r, counts_c, counts_r)


def _logits_metrics(
    head_stats: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    counts_c: jax.Array,
    counts_r: jax.Array,
) -> dict[str, jax.Array]:
    """TRL's `logits/chosen`, `logits/rejected`: the mean over the batch's chosen (rejected)
    response tokens of each token's mean logit over the vocabulary; {} when not computed."""
    if "mean_logits" not in head_stats:
        return {}
    sums_c, sums_r = batch_logprobs.pair_sums(head_stats["mean_logits"], batch)
    return {
        "logits/chosen": sums_c.sum() / jnp.maximum(counts_c.sum(), 1),
        "logits/rejected": sums_r.sum() / jnp.maximum(counts_r.sum(), 1),
    }


def _unpaired_labels(batch: dict[str, jax.Array], settings: DPOSettings) -> jax.Array | None:
    """The batch's KTO labels [B] (flux_jax.data.unpaired_batching: chosen rows = the examples,
    rejected rows = their KL rows), None for paired data; the data and the loss must agree."""
    if ("label" in batch) != settings.unpaired:
        data = "unpaired" if "label" in batch else "paired"
        raise ValueError(
            f"algorithm.loss_type={list(settings.loss_type)} does not train on {data} data "
            "(data.format): the unpaired losses (kto, apo_zero_unpaired) need data.format "
            "unpaired and the others need pairs"
        )
    return batch.get("label")


def dpo_loss_fn(
    params: PyTree,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    ref_params: PyTree | None,
    settings: DPOSettings,
    lora: LoraSettings | None = None,
    base: PyTree | None = None,
    dropout_rng: jax.Array | None = None,
    loss_state: dict[str, jax.Array] | None = None,
    router_aux_loss_coef: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DPO objective of one (micro-)batch and its metrics; `loss_state` is the state some
    losses carry across steps (BCO's running mean, flux_jax.losses.state), None without one.
    `router_aux_loss_coef` (MoE models; None otherwise): weight of the policy's router
    load-balancing loss added to the objective (0 still reports it).

    Full fine-tuning: `params` are the policy's weights. LoRA (`lora` set): `params` are the
    adapters, applied on the frozen `base` with dropout keyed by `dropout_rng`; the reference
    (`ref_params`, the same base for an online reference) runs without them.
    """
    chunk = settings.logprob_chunk_size
    weights, active = params, None
    if lora is not None:
        weights, active = base, ActiveAdapters(params, lora, dropout_rng)
    # N rows: 2B (chosen rows, then rejected rows) or R shared-prefix / packed rows.
    router_aux = router_aux_loss_coef is not None
    policy_tok_NxT, mask_NxT, aux, head_stats = batch_logprobs.token_logprobs(
        graphdef, weights, batch, chunk, active, router_aux, settings.lm_head_stats
    )
    policy_c, policy_r = batch_logprobs.pair_sums(policy_tok_NxT, batch)
    counts_c, counts_r = batch_logprobs.pair_counts(mask_NxT, batch)

    ref_tok_NxT = ref_c = ref_r = None  # None: reference-free (rewards = beta * policy logps)
    if "ref_chosen_logps" in batch:
        ref_c, ref_r = batch_logprobs.precomputed_ref(batch)
    elif ref_params is not None:
        ref_tok_NxT, _, _, _ = batch_logprobs.token_logprobs(graphdef, ref_params, batch, chunk)
        ref_tok_NxT = jax.lax.stop_gradient(ref_tok_NxT)
        ref_c, ref_r = batch_logprobs.pair_sums(ref_tok_NxT, batch)

    # Per-token values: kl_coef and LD-DPO need them, in the standard [2B, T] layout.
    per_token = settings.kl_coef > 0 or settings.ld_alpha < 1
    if settings.ld_alpha < 1 and batch_logprobs.is_shared_prefix(batch):
        raise ValueError(
            "algorithm.ld_alpha < 1 needs the standard layout: set model.prefix_sharing and "
            "model.packing to false"
        )
    pair = dpo.PairLogps(
        policy_c,
        policy_r,
        ref_c,
        ref_r,
        chosen_counts=counts_c,
        rejected_counts=counts_r,
        policy_tokens=policy_tok_NxT if per_token else None,
        ref_tokens=ref_tok_NxT if per_token else None,
        token_mask=mask_NxT if per_token else None,
        wpo_log_weights=_wpo_log_weights(policy_tok_NxT, head_stats, batch, counts_c, counts_r),
        labels=_unpaired_labels(batch, settings),
    )
    loss, metrics = dpo.dpo_objective_for(settings, pair, loss_state)
    metrics.update(_logits_metrics(head_stats, batch, counts_c, counts_r))
    if router_aux:
        loss = loss + router_aux_loss_coef * aux
        metrics["router_aux_loss"] = jax.lax.stop_gradient(aux)
        metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def batch_token_counts(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Real (non-pad) tokens and scored response tokens in the batch, chosen + rejected.

    In the shared-prefix layout a prompt is one copy, so `tokens` counts what is computed.
    """
    if batch_logprobs.is_shared_prefix(batch):
        real = (batch["segment_ids"] > 0).sum()
        scored = batch["loss_mask"].sum()
        return {"tokens": real.astype(jnp.float32), "response_tokens": scored.astype(jnp.float32)}
    real = sum((batch[f"{side}_segment_ids"] > 0).sum() for side in ("chosen", "rejected"))
    scored = sum(batch[f"{side}_loss_mask"][:, 1:].sum() for side in ("chosen", "rejected"))
    return {"tokens": real.astype(jnp.float32), "response_tokens": scored.astype(jnp.float32)}


def keep_if_finite(finite: jax.Array, updated: PyTree, previous: PyTree) -> PyTree:
    """`updated` where `finite` (a scalar bool) holds, else `previous`, leaf by leaf.

    A select rather than lax.cond: it fuses into the elementwise update, and the donated buffers
    stay in place.
    """
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    settings: DPOSettings,
    *,
    state_shardings: PyTree | None = None,
    lora: LoraSettings | None = None,
    dropout_seed: int = 0,
    router_aux_loss_coef: float | None = None,
) -> Callable[..., tuple[dict[str, Any], dict[str, jax.Array]]]:
    """`step(state, batch, frozen) -> (state, metrics)`, jitted, donating `state`.

    A step whose loss or gradient norm is NaN/inf changes neither the parameters nor the
    optimiser state (only `step` advances) and reports `nonfinite` = 1; what the run does next
    is the trainer's policy (flux_jax.training_health). So no state that includes a non-finite
    update ever exists, let alone gets saved.

    Full fine-tuning: `frozen` is the reference's parameters, None for reference-free training or
    when the batch carries precomputed reference log-probs, or when the state carries the
    reference as `state["ref_params"]` (TR-DPO, flux_jax.ref_sync: then the step reads it there
    and passes it through unchanged). LoRA (`lora` set): the state's params
    are the adapters and `frozen` is the base, which is also the online reference (unless
    reference-free, or the batch carries its log-probs); the adapter dropout key of a step is
    `dropout_seed` folded with the step number (and the micro-batch), so a resumed run draws the
    same masks. `router_aux_loss_coef`: see `dpo_loss_fn`. `state_shardings` pins the output
    state to the input's layout so the parameters never drift to another sharding between steps.
    """
    use_dropout = lora is not None and lora.dropout > 0

    def step(state, batch, frozen):
        base = frozen if lora is not None else None
        # TR-DPO (flux_jax.ref_sync): a reference that is updated during training is in the state.
        ref_params = state.get("ref_params", frozen)
        if lora is not None and settings.reference_free:
            ref_params = None

        def loss_fn(p, mb, rng):
            return dpo_loss_fn(
                p,
                mb,
                graphdef=graphdef,
                ref_params=ref_params,
                settings=settings,
                lora=lora,
                base=base,
                dropout_rng=rng,
                loss_state=state.get("loss_state"),
                router_aux_loss_coef=router_aux_loss_coef,
            )

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        rng = None
        if use_dropout:
            rng = jax.random.fold_in(jax.random.key(dropout_seed), state["step"])
        if settings.grad_accum_steps > 1:
            micro = split_microbatches(batch, settings.grad_accum_steps)
            keys = None if rng is None else jax.random.split(rng, settings.grad_accum_steps)
            grads, (_, metrics) = accumulate_gradients(
                lambda p, mb: grad_fn(p, mb[0], mb[1]), state["params"], (micro, keys)
            )
        else:
            (_, metrics), grads = grad_fn(state["params"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        params, opt_state = keep_if_finite(
            finite, (params, opt_state), (state["params"], state["opt_state"])
        )
        metrics["nonfinite"] = (~finite).astype(jnp.float32)
        metrics["learning_rate"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        metrics.update(batch_token_counts(batch))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if "ref_params" in state:  # unchanged by the step (the ref_sync hook updates it)
            new_state["ref_params"] = state["ref_params"]
        if "loss_state" in state:  # advances with the parameters: not on a non-finite step
            new_loss_state = dpo.next_loss_state(
                state["loss_state"], metrics, settings.grad_accum_steps
            )
            new_state["loss_state"] = keep_if_finite(finite, new_loss_state, state["loss_state"])
        return new_state, metrics

    out_shardings = (state_shardings, None) if state_shardings is not None else None
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


def make_ref_logps_step(
    graphdef: nnx.GraphDef, chunk_size: int | None
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """`(ref_params, batch) -> (ref_chosen_logps [B], ref_rejected_logps [B])` for precomputing.

    For a shared-prefix / packed batch the pairs come in `pair_order`'s slot order.
    """

    def ref_step(ref_params, batch):
        token_logps_NxT, _, _, _ = batch_logprobs.token_logprobs(
            graphdef, ref_params, batch, chunk_size
        )
        return batch_logprobs.pair_sums(token_logps_NxT, batch)

    return jax.jit(ref_step)
