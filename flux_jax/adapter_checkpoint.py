"""Which base model and LoRA settings a checkpoint's adapters belong to, and the check that they
still do when a run resumes or a checkpoint is loaded.

A LoRA checkpoint holds only the adapters (and their optimiser state): they mean something only
on top of the exact base weights they were trained on, with the same rank, alpha and targets. So
its metadata names the base (`model_path` and the weights' fingerprint, the same sampled hash
flux_jax.ref_logps keys its cache with) and the LoRA settings, and resuming or loading it with
another base or other settings fails with a message naming both, instead of training or serving
adapters on weights they were not trained for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flux_jax.lora import LoraSettings

LORA_KEY = "lora"  # metadata: the LoRA settings, absent (or null) for a full fine-tune
BASE_KEY = "base_model"  # metadata: {"model_path", "fingerprint"} of the frozen base


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """The frozen base of a LoRA run: where it was loaded from, its weights' fingerprint, and how
    it is quantised for QLoRA ("none", or e.g. "nf4/block64": other codes are other weights)."""

    model_path: str
    fingerprint: str
    quantization: str = "none"

    @classmethod
    def of(cls, model_path: str, seed: int, lora_config: Any = None) -> BaseModel:
        """The base at `model_path` (a local dir, hub id or "builtin:NAME"; builtins are named by
        preset and init seed, as in the reference-log-prob cache key), quantised as the config's
        `model.lora` section says (None: not quantised)."""
        from flux_jax.model_setup import is_builtin
        from flux_jax.model_source import resolve_model_dir
        from flux_jax.ref_logps import model_fingerprint

        source = model_path if is_builtin(model_path) else resolve_model_dir(model_path)
        return cls(model_path, model_fingerprint(source, seed), _quantization_of(lora_config))


def _quantization_of(lora_config: Any) -> str:
    kind = getattr(lora_config, "base_quantization", "none") if lora_config else "none"
    if kind == "none":
        return "none"
    return f"{kind}/block{lora_config.quantization_block}"


def adapter_metadata(settings: LoraSettings | None, base: BaseModel | None) -> dict[str, Any]:
    """The checkpoint-metadata entries of a run: its LoRA settings and base (none for full FT)."""
    if settings is None:
        return {}
    if base is None:
        raise ValueError("a LoRA checkpoint must name its base model")
    return {LORA_KEY: settings.to_dict(), BASE_KEY: dataclasses.asdict(base)}


def saved_settings(meta: dict[str, Any]) -> LoraSettings | None:
    """The LoRA settings a checkpoint's metadata records; None for a full fine-tune."""
    saved = meta.get(LORA_KEY)
    return LoraSettings.from_dict(saved) if saved else None


def check_matches(
    meta: dict[str, Any],
    where: str,
    *,
    settings: LoraSettings | None,
    base: BaseModel | None,
    action: str = "resume",
) -> None:
    """Raises ValueError, naming the checkpoint's and this run's values, unless the checkpoint at
    `where` (its metadata `meta`) holds what this run trains: full weights, or adapters with the
    same LoRA settings on the same base weights."""
    saved = saved_settings(meta)
    if saved is None and settings is None:
        return
    if saved is None:
        raise ValueError(
            f"{where} holds a full fine-tune (no LoRA adapters), but this run has "
            f"model.lora.rank={settings.rank}: cannot {action} LoRA from it. Set "
            "model.lora.rank: 0 to continue it, or use another output_dir for a LoRA run"
        )
    if settings is None:
        raise ValueError(
            f"{where} holds LoRA adapters (model.lora.rank={saved.rank}), but this run has "
            f"model.lora.rank: 0 (full fine-tuning): cannot {action} from it. Set model.lora to "
            "the checkpoint's settings, or use another output_dir"
        )
    differences = [
        f"model.lora.{field.name}: checkpoint {getattr(saved, field.name)!r}, this run "
        f"{getattr(settings, field.name)!r}"
        for field in dataclasses.fields(LoraSettings)
        if getattr(saved, field.name) != getattr(settings, field.name)
    ]
    if differences:
        raise ValueError(
            f"{where} holds LoRA adapters trained with other settings than this run's; cannot "
            f"{action} them: " + "; ".join(differences) + ". Set model.lora to the checkpoint's "
            "settings, or use another output_dir"
        )
    saved_base = meta.get(BASE_KEY) or {}
    if base is not None and saved_base.get("quantization", "none") != base.quantization:
        raise ValueError(
            f"{where} holds LoRA adapters trained on a base quantised as "
            f"{saved_base.get('quantization', 'none')!r}, but this run quantises it as "
            f"{base.quantization!r} (model.lora.base_quantization / quantization_block): "
            f"cannot {action} them on other weights. Set those keys to the checkpoint's, or use "
            "another output_dir"
        )
    if base is not None and saved_base.get("fingerprint") != base.fingerprint:
        raise ValueError(
            f"{where} holds LoRA adapters trained on the base model_path "
            f"{saved_base.get('model_path')!r} (weights fingerprint "
            f"{str(saved_base.get('fingerprint'))[:12]}), but this run's base is model_path "
            f"{base.model_path!r} (fingerprint {base.fingerprint[:12]}): adapters only fit the "
            f"weights they were trained on, so they cannot {action} on these. Point model_path "
            "at the checkpoint's base (or --base-model where the command has it), or use another "
            "output_dir"
        )
