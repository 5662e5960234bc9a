"""output_dir/best: the parameters with the lowest eval loss (else windowed train loss) so far.

A resumed run reads the kept value back and goes on comparing against it.
"""

from __future__ import annotations

import math
import os
from typing import Any

from flux_jax import checkpoint as ckpt_lib


class BestTracker:
    """Keeps output_dir/best: the parameters with the lowest eval (else windowed train) loss."""

    def __init__(self, path: str, *, has_eval: bool):
        self.path = path
        self.metric_name = "eval_loss" if has_eval else "train_loss"
        self.value = math.inf
        self.saved = False
        if os.path.isdir(path):  # a resumed run continues the comparison
            meta = ckpt_lib.read_metadata(path)
            if meta.get("metric_name") == self.metric_name:
                self.value = float(meta.get("metric_value", math.inf))
                self.saved = True

    def offer(self, step: int, value: float, params: Any, metadata: dict[str, Any]) -> None:
        if not value < self.value:
            return
        ckpt_lib.save_best(
            self.path,
            step,
            params,
            metric_name=self.metric_name,
            metric_value=value,
            metadata=metadata,
        )
        self.value, self.saved = value, True
