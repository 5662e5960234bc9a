"""`flux-jax plot OUTPUT_DIR`: a PNG of loss, rewards, margin and accuracy over steps."""

from __future__ import annotations

import json
import os

PANELS = (
    ("loss", ("loss",)),
    ("rewards", ("chosen_reward", "rejected_reward")),
    ("reward margin", ("reward_margin",)),
    ("reward accuracy", ("reward_accuracy",)),
)


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; is {output_dir} a training output_dir?")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: invalid JSON: {e}") from e
    return records


def plot_metrics(output_dir: str, out_path: str | None = None) -> str:
    """Writes the training curves (eval points overlaid) and returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    out_path = out_path or os.path.join(output_dir, "metrics.png")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (title, keys) in zip(axes.flat, PANELS, strict=True):
        for split, style in (("train", "-"), ("eval", "o--")):
            rows = [r for r in records if r.get("split", "train") == split]
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, style, label=f"{split} {key}", markersize=4)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(os.path.abspath(output_dir), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
