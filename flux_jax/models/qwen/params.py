"""The HF <-> flux_jax weight table for Qwen2/Qwen3: names, layouts, and the slices between them.

HF stores nn.Linear weights as [out, in] per layer; we store kernels as [in, out] with the heads
split out ([D, N, H] for q/k/v, [N, H, D] for o) and every layer stacked along a leading axis. Each
entry below says how one HF tensor maps onto (one layer of) one of our parameters. `hf_index_for`
translates a slice of our parameter into the slice of the HF tensor that holds it, so that a
process only reads the bytes its devices own.

Qwen3-MoE: HF stores one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, on disk as
transformers 5 writes and reads it); we stack them into [L_sparse, E, ...] kernels. Dense MLPs and
sparse blocks are stacked over their own layers, so each stacked entry lists the HF layer index of
each position of its leading axis (`layer_ids`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flux_jax.models.qwen.config import QwenConfig

# Layout kinds: how our array (one layer of it) relates to the HF tensor.
IDENTITY = "identity"  # same shape and layout
TRANSPOSE = "transpose"  # HF [out, in] -> ours [in, out]
HEADS_IN = "heads_in"  # HF [N*H, D] -> ours [D, N, H]
HEADS_OUT = "heads_out"  # HF [D, N*H] -> ours [N, H, D]
HEADS_BIAS = "heads_bias"  # HF [N*H] -> ours [N, H]


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    hf_name: str  # with "{i}" for the layer index when stacked, "{e}" for the expert index
    path: tuple[str, ...]  # our parameter path in the model's state
    layout: str
    stacked: bool
    layer_ids: tuple[int, ...] = ()  # stacked: the HF layer index of each position of our axis 0
    num_experts: int = 0  # > 0: our next axis is the expert axis, one HF tensor per expert

    @property
    def lead_dims(self) -> int:
        """How many leading axes of our parameter index separate HF tensors (layer, expert)."""
        return int(self.stacked) + int(self.num_experts > 0)

    def hf_name_at(self, lead: tuple[int, ...]) -> str:
        """The HF tensor at leading index `lead` of our parameter ((), (j,) or (j, e))."""
        if not self.stacked:
            return self.hf_name
        if self.num_experts:
            return self.hf_name.format(i=self.layer_ids[lead[0]], e=lead[1])
        return self.hf_name.format(i=self.layer_ids[lead[0]])

    def hf_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every (HF name, leading index into our parameter) this entry covers, in order."""
        if not self.stacked:
            return [(self.hf_name, ())]
        experts = range(self.num_experts) if self.num_experts else [None]
        leads = [(j,) if e is None else (j, e) for j in range(len(self.layer_ids)) for e in experts]
        return [(self.hf_name_at(lead), lead) for lead in leads]


def weight_table(cfg: QwenConfig) -> list[WeightEntry]:
    """Every tensor of an HF checkpoint of this architecture, and where it goes."""
    entries = [
        WeightEntry("model.embed_tokens.weight", ("embed_tokens", "embedding"), IDENTITY, False),
        WeightEntry("model.norm.weight", ("norm", "scale"), IDENTITY, False),
    ]
    if not cfg.tie_word_embeddings:
        entries.append(WeightEntry("lm_head.weight", ("lm_head", "kernel"), TRANSPOSE, False))
    layer = [
        ("input_layernorm.weight", ("input_layernorm", "scale"), IDENTITY),
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), IDENTITY),
        ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), HEADS_IN),
        ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), HEADS_IN),
        ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), HEADS_IN),
        ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), HEADS_OUT),
    ]
    if cfg.qkv_bias:
        layer += [
            ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), HEADS_BIAS),
            ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), HEADS_BIAS),
            ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), HEADS_BIAS),
        ]
    if cfg.qk_norm:
        layer += [
            ("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), IDENTITY),
            ("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), IDENTITY),
        ]
    every_layer = tuple(range(cfg.num_hidden_layers))
    for hf_suffix, path, layout in layer:
        entries.append(
            WeightEntry(
                f"model.layers.{{i}}.{hf_suffix}", ("layers", *path), layout, True, every_layer
            )
        )
    dense_ids = tuple(i for i, sparse in enumerate(cfg.sparse_layers) if not sparse)
    sparse_ids = tuple(i for i, sparse in enumerate(cfg.sparse_layers) if sparse)
    if dense_ids:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            entries.append(
                WeightEntry(
                    f"model.layers.{{i}}.mlp.{proj}.weight",
                    ("layers", "mlp", proj, "kernel"),
                    TRANSPOSE,
                    True,
                    dense_ids,
                )
            )
    if sparse_ids:
        entries.append(
            WeightEntry(
                "model.layers.{i}.mlp.gate.weight",
                ("layers", "moe", "router", "kernel"),
                TRANSPOSE,
                True,
                sparse_ids,
            )
        )
        for proj in ("gate_proj", "up_proj", "down_proj"):
            entries.append(
                WeightEntry(
                    f"model.layers.{{i}}.mlp.experts.{{e}}.{proj}.weight",
                    ("layers", "moe", "experts", proj, "kernel"),
                    TRANSPOSE,
                    True,
                    sparse_ids,
                    cfg.num_experts,
                )
            )
    return entries


def hf_shape(layout: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape holding one layer (no layer axis) of our parameter of shape `ours`."""
    if layout == IDENTITY:
        return ours
    if layout == TRANSPOSE:
        return ours[::-1]
    if layout == HEADS_IN:
        d, n, h = ours
        return (n * h, d)
    if layout == HEADS_OUT:
        n, h, d = ours
        return (d, n * h)
    if layout == HEADS_BIAS:
        n, h = ours
        return (n * h,)
    raise ValueError(f"unknown layout {layout!r}")


def to_ours(layout: str, hf: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
    """An HF tensor (or a slice of it from hf_index_for) rearranged into our layout."""
    if layout == IDENTITY:
        return hf
    if layout == TRANSPOSE:
        return hf.T
    if layout == HEADS_IN:
        d, n, h = ours_shape
        return hf.T.reshape(d, n, h)
    if layout == HEADS_OUT:
        n, h, d = ours_shape
        return hf.T.reshape(n, h, d)
    if layout == HEADS_BIAS:
        return hf.reshape(ours_shape)
    raise ValueError(f"unknown layout {layout!r}")


def to_hf(layout: str, ours: np.ndarray) -> np.ndarray:
    """One layer of our parameter rearranged into the HF tensor layout."""
    if layout == IDENTITY:
        hf = ours
    elif layout == HEADS_BIAS:
        hf = ours.reshape(-1)
    elif layout == TRANSPOSE:
        hf = ours.T
    elif layout == HEADS_IN:
        d, n, h = ours.shape
        hf = ours.reshape(d, n * h).T
    elif layout == HEADS_OUT:
        n, h, d = ours.shape
        hf = ours.reshape(n * h, d).T
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return np.ascontiguousarray(hf)


def hf_index_for(
    layout: str, index: tuple[slice, ...], ours_shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """The HF slice holding `index` of one layer of our parameter, or None if not contiguous.

    Only whole heads can be read as a contiguous HF slice (head_dim is never sharded by our rules);
    None tells the caller to read the whole tensor and slice after rearranging.
    """
    ranges = [s.indices(n)[:2] for s, n in zip(index, ours_shape, strict=True)]
    if layout == IDENTITY:
        return tuple(slice(a, b) for a, b in ranges)
    if layout == TRANSPOSE:
        return tuple(slice(a, b) for a, b in ranges[::-1])
    if layout == HEADS_IN:
        (d0, d1), (n0, n1), (h0, h1) = ranges
        if (h0, h1) != (0, ours_shape[2]):
            return None
        h = ours_shape[2]
        return (slice(n0 * h, n1 * h), slice(d0, d1))
    if layout == HEADS_OUT:
        (n0, n1), (h0, h1), (d0, d1) = ranges
        if (h0, h1) != (0, ours_shape[1]):
            return None
        h = ours_shape[1]
        return (slice(d0, d1), slice(n0 * h, n1 * h))
    if layout == HEADS_BIAS:
        (n0, n1), (h0, h1) = ranges
        if (h0, h1) != (0, ours_shape[1]):
            return None
        h = ours_shape[1]
        return (slice(n0 * h, n1 * h),)
    raise ValueError(f"unknown layout {layout!r}")
