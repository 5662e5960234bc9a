"""TR-DPO reference updates: every N steps, the reference moves towards the policy.

TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656) updates the DPO reference during training:
every `tau` optimiser steps, `ref = alpha * policy + (1 - alpha) * ref` (soft update; alpha = 1 is
the hard copy). TRL's `SyncRefModelCallback` does the same after step `global_step % tau == 0`;
so does this module's hook, registered by the trainer with `every = algorithm.ref_sync.
every_steps` and run before the eval and checkpoint hooks of that step.

The reference then changes during the run, so it lives in the train state as
`state["ref_params"]`: the train step reads it from there, and every checkpoint holds it, so a
resumed run continues with exactly the reference it had (resume is exact). The update is one
jitted elementwise pass that donates the old reference: no second copy is made. The mix is
computed in fp32 and stored in the reference's own dtype (the compute dtype, e.g. bf16).

Not with `algorithm.precompute_ref_logps` (the precomputed log-probs would be stale after the
first update), `reference_free` (there is no reference) or LoRA (the reference is the frozen base
with the adapters off, shared with the policy; updating it would change the policy's base too):
flux_jax/config_rules.py refuses those configs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flux_jax.hooks import StepState

PyTree = Any
STATE_KEY = "ref_params"  # where the train state carries a reference that changes


def mix_into_reference(policy: PyTree, reference: PyTree, alpha: float) -> PyTree:
    """`alpha * policy + (1 - alpha) * reference`, leaf by leaf, in fp32, cast to the
    reference's dtypes (TR-DPO's soft update; alpha = 1 copies the policy)."""

    def mix(p: jax.Array, r: jax.Array) -> jax.Array:
        mixed = alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)
        return mixed.astype(r.dtype)

    return jax.tree.map(mix, policy, reference)


def make_reference_update(alpha: float) -> Callable[[PyTree, PyTree], PyTree]:
    """`update(policy, reference) -> new reference`, jitted, donating `reference` (updated in
    place on the devices), the new reference laid out as the old."""

    def update(policy: PyTree, reference: PyTree) -> PyTree:
        return mix_into_reference(policy, reference, alpha)

    return jax.jit(update, donate_argnums=(1,))


def sync_reference_hook(alpha: float) -> Callable[[StepState], None]:
    """The trainer's hook: replaces `event.state["ref_params"]` by its update towards
    `event.state["params"]`. It writes into the loop's state dict, so the next step, the eval
    and the checkpoint of this step all see the updated reference."""
    update = make_reference_update(alpha)

    def sync(event: StepState) -> None:
        state = event.state
        state[STATE_KEY] = update(state["params"], state[STATE_KEY])

    return sync


def check_resume_matches(meta: dict[str, Any], where: str, *, syncs: bool) -> None:
    """Raises ValueError naming the key when the checkpoint at `where` (its metadata `meta`) was
    saved with the reference in its state and this run has none, or the other way round."""
    saved = meta.get("flux_config", {}).get("algorithm", {}).get("ref_sync", {})
    saved_syncs = saved.get("every_steps", 0) > 0
    if saved_syncs == syncs:
        return
    raise ValueError(
        f"{where}: the checkpoint was saved with algorithm.ref_sync.every_steps="
        f"{saved.get('every_steps', 0)}, this run has it "
        f"{'> 0' if syncs else '0'}; a TR-DPO checkpoint holds the updated reference, which a "
        "run without ref_sync cannot use (and a run with it cannot find in one without). Resume "
        "with the checkpoint's algorithm.ref_sync, or start in a new output_dir"
    )
