"""Text generation with a KV cache.

kv_cache.py   the decoder over a KV cache: prefill a left-padded batch, decode one slot at a time
sampling.py   greedy / temperature / top-k / top-p choice of the next token
budget.py     the position range and KV-cache memory a request needs, checked before allocating
generate.py   the jitted prefill and decode loop, token-level `generate`, text-level `generate_text`
"""

from flux_jax.generation.generate import (
    GenerationOutput,
    generate,
    generate_text,
    prompt_bucket,
    render_prompt,
)

__all__ = ["GenerationOutput", "generate", "generate_text", "prompt_bucket", "render_prompt"]
