"""The LM-head chunk a run uses: `model.logprob_chunk_size`, capped by `model.logprob_chunk_mib`.

`flux_jax.logprobs` applies the head `chunk` sequence positions at a time; one chunk's fp32 logits
are [rows on a device, chunk, vocabulary on a device]. A fixed chunk in positions therefore costs
memory in proportion to the rows and the vocabulary, so the trainer, the memory plan and
tools/bench.py all size it with the one rule here, from the mesh and the batch.
"""

from __future__ import annotations

from collections.abc import Mapping

from flux_jax.sharding import LOGICAL_AXIS_RULES, MESH_AXES, batch_multiple


def lm_head_chunk_size(
    chunk_size: int | None,
    *,
    max_chunk_mib: float,
    rows_per_step: int,
    grad_accum_steps: int,
    mesh_shape: Mapping[str, int] | None,
    vocab_size: int,
) -> int | None:
    """The LM-head chunk a run uses: the trainer's, the memory plan's and tools/bench.py's rule.

    `chunk_size` positions (0 or None = unchunked), capped so that one chunk's fp32 logits for
    the rows one device holds of a micro-batch fit `max_chunk_mib` (0 = no cap). A step's
    `rows_per_step` rows (2 x pairs in the standard layout: chosen and rejected) are split into
    `grad_accum_steps` micro-batches and each over data x fsdp devices; the vocabulary is split
    over the axis `LOGICAL_AXIS_RULES["vocab"]` names. `mesh_shape` is `mesh.shape`, a
    {data, fsdp, tensor} mapping, or None for one device.
    """
    if mesh_shape is None:
        mesh_shape = dict.fromkeys(MESH_AXES, 1)
    rows_per_micro_batch = -(-rows_per_step // grad_accum_steps)  # ceil, in integers
    vocab_ways = mesh_shape[LOGICAL_AXIS_RULES["vocab"]]
    return capped_chunk_size(
        chunk_size or None,
        rows_per_device=-(-rows_per_micro_batch // batch_multiple(mesh_shape)),
        vocab_per_device=-(-vocab_size // vocab_ways),
        max_chunk_mib=max_chunk_mib,
    )


def capped_chunk_size(
    chunk_size: int | None, rows_per_device: int, vocab_per_device: int, max_chunk_mib: float
) -> int | None:
    """The chunk to use: at most `chunk_size` positions, and few enough that one chunk's fp32
    logits [rows_per_device, chunk, vocab_per_device] take at most `max_chunk_mib` MiB.

    A fixed chunk in positions costs memory in proportion to the rows and the vocabulary: 512
    positions of 8 rows are 128 MiB of logits at vocab 32k but 2.3 GiB at Qwen's 152k. The cap
    keeps the head's peak close to a small-vocabulary model's. Multiples of 8 (sublane-aligned);
    `max_chunk_mib` 0 (no cap) or a None chunk (unchunked) are returned as given.
    """
    if chunk_size is None or max_chunk_mib <= 0:
        return chunk_size
    fits = int(max_chunk_mib * 2**20 // (4 * max(rows_per_device, 1) * vocab_per_device))
    capped = min(chunk_size, fits if fits < 8 else fits // 8 * 8)
    return max(capped, 1)
