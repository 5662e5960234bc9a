"""The jitted DPO train step, and the step that precomputes reference log-probs.

One forward pass of the policy scores the chosen and rejected sequences together (concatenated
along the batch); the reference is the frozen initial weights, run under stop_gradient, or
log-probs precomputed into the batch, or nothing (reference_free). Gradients are accumulated over
micro-batches inside the step, then optax updates the fp32 master weights. The state is donated, so
parameters and optimiser state are updated in place on the device.

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

from flux_jax import dpo, logprobs
from flux_jax.dpo import DPOSettings  # the step's settings; importable from here too
from flux_jax.grad_accum import accumulate_gradients, split_microbatches

# Re-exported for callers not yet switched to their homes (trainer.py, commands.py,
# preference_eval.py): model_setup.split_model, sharding.shard_batch, sharding.state_shardings_of.
from flux_jax.model_setup import split_model  # noqa: F401
from flux_jax.sharding import opt_state_shardings, replicated_like, shard_batch, state_shardings_of  # noqa: F401

PyTree = Any
SEQUENCE_FIELDS = ("input_ids", "loss_mask", "segment_ids", "positions")


def init_train_state(params: PyTree, tx: optax.GradientTransformation) -> dict[str, Any]:
    """{"step", "params", "opt_state"}; the optimiser state inherits the parameters' shardings."""
    opt_shardings = opt_state_shardings(tx, params)  # None unless params lie on a mesh
    step = jnp.zeros((), jnp.int32)
    if opt_shardings is not None:
        step = jax.device_put(step, replicated_like(params))
    return {
        "step": step,
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
    }


def _paired_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Chosen rows then rejected rows, [2B, T], for one forward pass."""
    return {
        name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)
        for name in SEQUENCE_FIELDS
    }


def paired_token_logprobs(
    graphdef: nnx.GraphDef, params: PyTree, batch: dict[str, jax.Array], chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    """Per-token response log-probs [2B, T] (chosen rows first) and the paired loss mask."""
    model = nnx.merge(graphdef, params)
    paired = _paired_inputs(batch)
    scored_NxW = None
    if "chosen_scored_positions" in batch:
        scored_NxW = jnp.concatenate(
            [batch["chosen_scored_positions"], batch["rejected_scored_positions"]], axis=0
        )
    hidden_NxTxD = model(
        paired["input_ids"],
        paired["positions"],
        segment_ids_BxT=paired["segment_ids"],
        return_hidden=True,
    )
    token_logps_NxT = logprobs.token_logprobs(
        hidden_NxTxD,
        model.lm_head_weight(),  # fp32 master copy: chunk gradients accumulate in its dtype
        paired["input_ids"],
        paired["loss_mask"],
        chunk_size=chunk_size,
        compute_dtype=model.compute_dtype,
        scored_positions_BxW=scored_NxW,
    )
    return token_logps_NxT, paired["loss_mask"]


def is_shared_prefix(batch: dict[str, jax.Array]) -> bool:
    """Whether `batch` is in the shared-prefix / packed layout (flux_jax.data.packing)."""
    return "branch_ids" in batch


def shared_prefix_token_logprobs(
    graphdef: nnx.GraphDef, params: PyTree, batch: dict[str, jax.Array], chunk_size: int | None
) -> jax.Array:
    """Per-token response log-probs [R, T] of shared-prefix / packed rows.

    One pass over `prompt | chosen | rejected` rows with the branch mask; every scored token is
    predicted from the hidden state at its `source_index` (the last prompt token for the first
    rejected token), so each log-prob equals the standard layout's.
    """
    model = nnx.merge(graphdef, params)
    hidden_RxTxD = model(
        batch["input_ids"],
        batch["positions"],
        segment_ids_BxT=batch["segment_ids"],
        branch_ids_BxT=batch["branch_ids"],
        return_hidden=True,
    )
    return logprobs.token_logprobs(
        hidden_RxTxD,
        model.lm_head_weight(),
        batch["input_ids"],
        batch["loss_mask"],
        chunk_size=chunk_size,
        compute_dtype=model.compute_dtype,
        source_index_BxT=batch["source_index"],
        scored_positions_BxW=batch.get("scored_positions"),
    )


def _token_logprobs(
    graphdef: nnx.GraphDef, params: PyTree, batch: dict[str, jax.Array], chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs and their loss mask, [2B, T] or [R, T] depending on the layout."""
    if is_shared_prefix(batch):
        return shared_prefix_token_logprobs(graphdef, params, batch, chunk_size), batch["loss_mask"]
    return paired_token_logprobs(graphdef, params, batch, chunk_size)


def _pair_sums(values_NxT: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-pair sums [B] of a per-token value over the chosen and over the rejected response.

    Packed rows are reduced per row into their S pair slots (segment id - 1), then flattened to
    [R * S] in `pair_order`'s slot order. A masked sum, not a one-hot matmul: TPUs would run an fp32
    matmul at bf16 precision by default.
    """
    if not is_shared_prefix(batch):
        half = values_NxT.shape[0] // 2
        sums_N = values_NxT.sum(axis=-1)
        return sums_N[:half], sums_N[half:]
    slots = batch["pair_order"].shape[1]
    slot_ids_1x1xS = jnp.arange(1, slots + 1, dtype=jnp.int32)[None, None, :]
    in_slot_RxTxS = batch["segment_ids"][:, :, None] == slot_ids_1x1xS
    scored_RxT = batch["loss_mask"].astype(bool)
    zero = jnp.zeros((), values_NxT.dtype)

    def side(branch: int) -> jax.Array:
        keep_RxTxS = in_slot_RxTxS & (scored_RxT & (batch["branch_ids"] == branch))[:, :, None]
        values_RxTxS = jnp.broadcast_to(values_NxT[:, :, None], keep_RxTxS.shape)
        return jnp.where(keep_RxTxS, values_RxTxS, zero).sum(axis=1).reshape(-1)

    return side(1), side(2)


def _pair_counts(mask_NxT: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Scored response tokens per pair [B], chosen and rejected."""
    if not is_shared_prefix(batch):
        mask_NxT = mask_NxT.at[:, 0].set(0)  # column 0 is never scored in the standard layout
    return _pair_sums(mask_NxT.astype(jnp.int32), batch)


def _precomputed_ref(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    # [B], or [R, S] in the packed layout: flattened in the same slot order as _pair_sums.
    return batch["ref_chosen_logps"].reshape(-1), batch["ref_rejected_logps"].reshape(-1)


def dpo_loss_fn(
    params: PyTree,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    ref_params: PyTree | None,
    settings: DPOSettings,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DPO objective of one (micro-)batch and its metrics."""
    chunk = settings.logprob_chunk_size
    # N rows: 2B (chosen rows, then rejected rows) or R shared-prefix / packed rows.
    policy_tok_NxT, mask_NxT = _token_logprobs(graphdef, params, batch, chunk)
    policy_c, policy_r = _pair_sums(policy_tok_NxT, batch)
    counts_c, counts_r = _pair_counts(mask_NxT, batch)

    ref_tok_NxT = None
    if "ref_chosen_logps" in batch:
        ref_c, ref_r = _precomputed_ref(batch)
    elif ref_params is not None:
        ref_tok_NxT, _ = _token_logprobs(graphdef, ref_params, batch, chunk)
        ref_tok_NxT = jax.lax.stop_gradient(ref_tok_NxT)
        ref_c, ref_r = _pair_sums(ref_tok_NxT, batch)
    else:  # reference_free: TRL reports rewards as beta * policy log-probs then
        ref_c = ref_r = jnp.zeros_like(policy_c)

    return dpo.dpo_objective_for(
        settings,
        policy_c,
        policy_r,
        ref_c,
        ref_r,
        chosen_token_counts=counts_c,
        rejected_token_counts=counts_r,
        policy_token_logps=policy_tok_NxT if settings.kl_coef > 0 else None,
        ref_token_logps=ref_tok_NxT if settings.kl_coef > 0 else None,
        token_loss_mask=mask_NxT if settings.kl_coef > 0 else None,
    )


def batch_token_counts(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Real (non-pad) tokens and scored response tokens in the batch, chosen + rejected.

    In the shared-prefix layout a prompt is one copy, so `tokens` counts what is computed.
    """
    if is_shared_prefix(batch):
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
) -> Callable[..., tuple[dict[str, Any], dict[str, jax.Array]]]:
    """`step(state, batch, ref_params) -> (state, metrics)`, jitted, donating `state`.

    A step whose loss or gradient norm is NaN/inf changes neither the parameters nor the
    optimiser state (only `step` advances) and reports `nonfinite` = 1; what the run does next
    is the trainer's policy (flux_jax.training_health). So no state that includes a non-finite
    update ever exists, let alone gets saved.

    `ref_params` is None for reference-free training or when the batch carries precomputed
    reference log-probs. `state_shardings` pins the output state to the input's layout so the
    parameters never drift to another sharding between steps.
    """

    def step(state, batch, ref_params):
        loss_fn = lambda p, mb: dpo_loss_fn(  # noqa: E731
            p, mb, graphdef=graphdef, ref_params=ref_params, settings=settings
        )
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if settings.grad_accum_steps > 1:
            micro = split_microbatches(batch, settings.grad_accum_steps)
            grads, (_, metrics) = accumulate_gradients(
                lambda p, mb: grad_fn(p, mb), state["params"], micro
            )
        else:
            (_, metrics), grads = grad_fn(state["params"], batch)
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
        token_logps_NxT, _ = _token_logprobs(graphdef, ref_params, batch, chunk_size)
        return _pair_sums(token_logps_NxT, batch)

    return jax.jit(ref_step)
