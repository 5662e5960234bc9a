"""Batched generation with a KV cache: token ids in, token ids out, and the text-level API.

    prompts --left-pad to P (a power of two)--> prefill (one jit) --> decode loop (one jit)

Prompts are left-padded into one batch whose width P is rounded up to a power of two, so jit
compiles one prefill and one decode loop per (batch size, P, max_new_tokens), not one per prompt
length. Prefill runs every prompt token through the model at once and fills the cache (see
`kv_cache`); the decode loop is a `jax.lax.while_loop` that feeds one token per step and stops
when every row has produced an end-of-sequence token or `max_new_tokens` tokens. The cache is
donated to the decode loop, so it is updated in place.

On a mesh the batch is split over ("data", "fsdp") when its size divides, else replicated; the
parameters stay where they already are (sharded like training), and the cache is constrained to
the batch's split and to the kv heads' tensor split.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers import PreTrainedTokenizerBase

from flux_jax.generation import budget, kv_cache
from flux_jax.generation.kv_cache import DecoderSpec, KVCache, Params
from flux_jax.generation.sampling import next_token
from flux_jax.models.qwen.model import QwenForCausalLM
from flux_jax.sharding import BATCH_AXES, batch_multiple

MIN_PROMPT_BUCKET = 16
MIN_EOS_SLOTS = 4


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """`tokens` int32 [B, max_new_tokens]: each row's generated ids, then `pad_token_id`.
    `lengths` int32 [B]: generated tokens per row, its end-of-sequence token included."""

    tokens: np.ndarray
    lengths: np.ndarray

    def rows(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def prompt_bucket(length: int, min_length: int = MIN_PROMPT_BUCKET) -> int:
    """The padded prompt width: the smallest power of two >= length (and >= min_length)."""
    return max(min_length, 1 << max(length - 1, 0).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int) -> tuple[np.ndarray, ...]:
    """ids [B, width] with each prompt right-aligned, and the pad count of each row [B]."""
    ids_BxP = np.full((len(prompts), width), pad_id, np.int32)
    num_pad_B = np.zeros(len(prompts), np.int32)
    for row, prompt in enumerate(prompts):
        num_pad_B[row] = width - len(prompt)
        ids_BxP[row, num_pad_B[row] :] = prompt
    return ids_BxP, num_pad_B


def _constrain(cache: KVCache, sharding: NamedSharding | None) -> KVCache:
    if sharding is None:
        return cache
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), cache)


@functools.partial(jax.jit, static_argnames=("spec", "max_len", "cache_sharding"))
def prefill(
    spec: DecoderSpec,
    params: Params,
    ids_BxP: jax.Array,
    num_pad_B: jax.Array,
    *,
    max_len: int,
    cache_sharding: NamedSharding | None = None,
) -> tuple[jax.Array, KVCache]:
    """Runs the prompts through the model: the last prompt token's logits [B, V] and the cache
    with slots [0, P) filled, of `max_len` slots."""
    cache = kv_cache.init_kv_cache(spec, params, ids_BxP.shape[0], max_len)
    cache = _constrain(cache, cache_sharding)
    hidden_BxPxD, cache = kv_cache.forward_cached(spec, params, ids_BxP, 0, num_pad_B, cache)
    logits_Bx1xV = kv_cache.lm_logits(spec, params, hidden_BxPxD[:, -1:])
    return logits_Bx1xV[:, 0], _constrain(cache, cache_sharding)


@functools.partial(
    jax.jit,
    static_argnames=("spec", "max_new_tokens", "greedy", "cache_sharding"),
    donate_argnames=("cache",),
)
def decode(
    spec: DecoderSpec,
    params: Params,
    cache: KVCache,
    first_logits_BxV: jax.Array,
    num_pad_B: jax.Array,
    key: jax.Array,
    sampling: dict[str, jax.Array],
    eos_ids_E: jax.Array,
    pad_id: jax.Array,
    *,
    max_new_tokens: int,
    greedy: bool,
    cache_sharding: NamedSharding | None = None,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """The decode loop after `prefill`: tokens [B, max_new_tokens], lengths [B] and the final
    cache (returned so that XLA can update the donated cache buffer in place).

    Step i records the token chosen from the previous logits and feeds it at slot P + i for the
    next logits; the loop ends after the step in which the last row ended, or after
    `max_new_tokens` steps. `sampling` holds the traced temperature, top_k and top_p.
    """
    batch = first_logits_BxV.shape[0]
    prompt_len = cache["k"].shape[2] - max_new_tokens
    choose = functools.partial(next_token, greedy=greedy, **sampling)
    key, first_key = jax.random.split(key)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "token": choose(first_logits_BxV, first_key),
        "done": jnp.zeros((batch,), jnp.bool_),
        "lengths": jnp.zeros((batch,), jnp.int32),
        "tokens": jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        "cache": cache,
        "key": key,
    }

    def running(state):
        return (state["step"] < max_new_tokens) & ~jnp.all(state["done"])

    def step(state):
        i, token_B, done_B = state["step"], state["token"], state["done"]
        recorded_B = jnp.where(done_B, pad_id, token_B)
        tokens = jax.lax.dynamic_update_slice(
            state["tokens"], recorded_B[:, None], (jnp.zeros((), jnp.int32), i)
        )
        lengths = state["lengths"] + (~done_B).astype(jnp.int32)
        is_eos_B = jnp.any(token_B[:, None] == eos_ids_E[None, :], axis=-1)
        hidden_Bx1xD, cache = kv_cache.forward_cached(
            spec, params, token_B[:, None], prompt_len + i, num_pad_B, state["cache"]
        )
        logits_BxV = kv_cache.lm_logits(spec, params, hidden_Bx1xD)[:, 0]
        key, step_key = jax.random.split(state["key"])
        return {
            "step": i + 1,
            "token": choose(logits_BxV, step_key),
            "done": done_B | is_eos_B,
            "lengths": lengths,
            "tokens": tokens,
            "cache": _constrain(cache, cache_sharding),
            "key": key,
        }

    final = jax.lax.while_loop(running, step, state)
    tokens, lengths = final["tokens"], final["lengths"]
    if cache_sharding is not None:  # small results, replicated so every process can read them
        everywhere = NamedSharding(cache_sharding.mesh, PartitionSpec())
        tokens = jax.lax.with_sharding_constraint(tokens, everywhere)
        lengths = jax.lax.with_sharding_constraint(lengths, everywhere)
    return tokens, lengths, final["cache"]


def _eos_ids(eos_token_ids: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_ids is None:
        return ()
    if isinstance(eos_token_ids, int | np.integer):
        return (int(eos_token_ids),)
    return tuple(int(t) for t in eos_token_ids)


def eos_array(eos: tuple[int, ...]) -> np.ndarray:
    # Padded with -1 (never a token) to a fixed width, so the eos set does not change the shape.
    width = max(MIN_EOS_SLOTS, len(eos))
    return np.asarray(eos + (-1,) * (width - len(eos)), np.int32)


def _batch_split(mesh: Mesh, batch: int) -> tuple[str, ...] | None:
    ways = batch_multiple(mesh)
    return BATCH_AXES if ways > 1 and batch % ways == 0 else None


def _cache_sharding(mesh: Mesh | None, params: Params, batch: int) -> NamedSharding | None:
    if mesh is None:
        return None
    kv_heads = params["layers"]["self_attn"]["k_proj"]["kernel"].shape[2]
    tensor = mesh.shape["tensor"]
    heads_axis = "tensor" if tensor > 1 and kv_heads % tensor == 0 else None
    spec = PartitionSpec(None, _batch_split(mesh, batch), None, heads_axis, None)
    return NamedSharding(mesh, spec)


def _place(x: Any, mesh: Mesh | None, batch_split: tuple[str, ...] | None = None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(x)
    spec = PartitionSpec() if batch_split is None else PartitionSpec(batch_split)
    return jax.device_put(x, NamedSharding(mesh, spec))


def generate(
    model: QwenForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    mesh: Mesh | None = None,
) -> GenerationOutput:
    """Continues every prompt (a list of token ids) by up to `max_new_tokens` tokens, in one batch.

    temperature 0 is greedy decoding; otherwise tokens are sampled with the given temperature,
    top_k (0 = off) and top_p (1 = off), from `jax.random.key(seed)`: the same seed, prompts and
    settings give the same tokens. A row ends at its first token in `eos_token_ids` (default: the
    model config's eos ids; pass () to never stop early), which is kept in its output.

    Raises ValueError before allocating anything when the longest prompt plus max_new_tokens
    exceeds the model's max_position_embeddings, or the KV cache would not fit in memory.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature=}, "
            f"{top_k=}, {top_p=}"
        )
    if not prompts:
        raise ValueError("no prompts to generate from")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if eos_token_ids is None:
        eos_token_ids = model.config.eos_token_id
    eos = _eos_ids(eos_token_ids)

    spec = DecoderSpec.of(model)
    params = kv_cache.decoder_params(model)
    batch = len(prompts)
    width = prompt_bucket(max(len(p) for p in prompts))
    ids_BxP, num_pad_B = left_pad(prompts, pad_token_id, width)
    split = _batch_split(mesh, batch) if mesh is not None else None
    cache_sharding = _cache_sharding(mesh, params, batch)
    # Before anything is allocated: a huge max_new_tokens must be a clear error, not an OOM.
    budget.check_positions(model.config, max(len(p) for p in prompts), max_new_tokens)
    budget.check_kv_cache_fits(
        model.config,
        batch=batch,
        prompt_width=width,
        max_new_tokens=max_new_tokens,
        dtype=spec.compute_dtype,
        sharding=cache_sharding,
    )

    num_pad_B = _place(num_pad_B, mesh, split)
    logits_BxV, cache = prefill(
        spec,
        params,
        _place(ids_BxP, mesh, split),
        num_pad_B,
        max_len=width + max_new_tokens,
        cache_sharding=cache_sharding,
    )
    sampling = {
        "temperature": np.float32(temperature),
        "top_k": np.int32(top_k),
        "top_p": np.float32(top_p),
    }
    tokens_BxN, lengths_B, _ = decode(
        spec,
        params,
        cache,
        logits_BxV,
        num_pad_B,
        _place(jax.random.key(seed), mesh),
        {k: _place(v, mesh) for k, v in sampling.items()},
        _place(eos_array(eos), mesh),
        _place(np.int32(pad_token_id), mesh),
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        cache_sharding=cache_sharding,
    )
    return GenerationOutput(
        tokens=np.asarray(jax.device_get(tokens_BxN)),
        lengths=np.asarray(jax.device_get(lengths_B)),
    )


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, use_chat_template: bool) -> str:
    """The prompt as one user turn of the chat template, ready for the assistant's answer, when the
    tokenizer has a template and the caller wants it; else the text unchanged."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def stop_token_ids(model: QwenForCausalLM, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokenizer's eos and the model config's eos ids (Qwen instruct models have two)."""
    ids = _eos_ids(model.config.eos_token_id)
    if tokenizer.eos_token_id is not None:
        ids = (int(tokenizer.eos_token_id), *ids)
    return tuple(dict.fromkeys(ids))


def generate_text(
    model: QwenForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: str | list[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    use_chat_template: bool = True,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
) -> str | list[str]:
    """Completions of one prompt (a str in, a str out) or of a list of prompts.

    Each prompt is wrapped in the chat template (see `render_prompt`), tokenised, generated in
    batches of `batch_size` (default: all at once) and decoded without special tokens.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    # A rendered template already holds its special tokens; plain text gets the tokenizer's own.
    token_ids = [
        tokenizer(
            render_prompt(tokenizer, text, use_chat_template), add_special_tokens=not templated
        )["input_ids"]
        for text in texts
    ]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    step = batch_size or len(token_ids) or 1
    completions: list[str] = []
    for begin in range(0, len(token_ids), step):
        out = generate(
            model,
            token_ids[begin : begin + step],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_ids=stop_token_ids(model, tokenizer),
            pad_token_id=int(pad_id),
            mesh=mesh,
        )
        completions.extend(tokenizer.batch_decode(out.rows(), skip_special_tokens=True))
    return completions[0] if single else completions
