"""Compare flux_jax against transformers on an HF Qwen model directory: logits and every layer.

    python tools/parity.py --model /path/to/Qwen3-0.6B            # a real checkpoint
    python tools/parity.py --tiny qwen3                            # a generated tiny random model

Runs the same right-padded batch through transformers (PyTorch, fp32, eager attention) and through
flux_jax (fp32), and prints the max abs difference of the logits and of each layer's hidden states
over non-pad positions, as JSON. Needs torch (the `test` extra). Exit status 1 if the logits differ
by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np


def make_tiny_model_dir(model_type: str, out_dir: str) -> str:
    import torch
    import transformers

    config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    config = config_cls(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=model_type == "qwen3",
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.1 * torch.randn_like(p)
            )
    model.save_pretrained(out_dir)
    return out_dir


def compare(model_dir: str, lengths: list[int], seed: int) -> dict:
    import jax.numpy as jnp
    import torch
    import transformers

    import flux_jax

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours = flux_jax.load_pretrained(model_dir, dtype="float32")
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(0, hf.config.vocab_size, n)
        mask[row, :n] = 1
    with torch.no_grad():
        ref = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            output_hidden_states=True,
        )
    logits, layers = ours(
        jnp.asarray(ids, jnp.int32),
        attention_mask_BxT=jnp.asarray(mask, jnp.int32),
        return_layer_outputs=True,
    )
    keep = mask[..., None].astype(bool)

    def max_diff(a, b) -> float:
        return float(np.max(np.where(keep, np.abs(np.asarray(a) - np.asarray(b)), 0.0)))

    # HF's hidden_states: [embeddings, layer 1 .. layer L-1 outputs, final normed output].
    per_layer = [
        max_diff(layers[i], ref.hidden_states[i + 1].numpy()) for i in range(len(layers) - 1)
    ]
    return {
        "model": model_dir,
        "model_type": hf.config.model_type,
        "lengths": lengths,
        "max_abs_logit_diff": max_diff(logits, ref.logits.numpy()),
        "logit_scale": float(np.max(np.abs(ref.logits.numpy()))),
        "max_abs_layer_diff": per_layer,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="HF model directory (config.json + safetensors)")
    source.add_argument("--tiny", choices=["qwen2", "qwen3"], help="generate a tiny random model")
    parser.add_argument("--lengths", default="24,17,9", help="comma-separated sequence lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_tiny_model_dir(args.tiny, os.path.join(tmp, args.tiny))
        report = compare(model_dir, lengths, args.seed)
    report["tolerance"] = args.tolerance
    report["ok"] = report["max_abs_logit_diff"] <= args.tolerance
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
