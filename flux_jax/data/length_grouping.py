"""Length-grouped batch order: pairs of similar length share a batch, the batches in random order.

Padding a batch to its longest row wastes the difference to every shorter row; grouping pairs by
length makes a batch's rows nearly equally long. The order follows Hugging Face's
`LengthGroupedSampler` (TRL's `group_by_length`): shuffle, cut into windows ("mega-batches") of
`window_batches` batches, sort each window by length, cut it into batches. HF then keeps each
window's batches longest first; here they are shuffled within the window too, so a run does not
step through each window's lengths in order.

Epoch e of N pairs and batch size B:
  order_e      a permutation of the N pairs from rng(seed, e), its first N - N % B pairs (the
               N % B left over are different pairs every epoch); with N < B the permutation
               repeated up to B pairs, so a batch then holds some pairs twice
  window w     pairs [w * W, (w + 1) * W) of order_e, W = window_batches * B (the last window
               of an epoch may be shorter), sorted longest first (ties: earlier in order_e first)
               and cut into batches of B
  batches      each window's batches in the order of a permutation from rng(seed, e, w)

`batch_pairs(k)` is a pure function of (seed, k), so a `grain.MapDataset.range(...).map(...)` over
k keeps grain's exact resume: the iterator state is the next k.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

# Tags that keep the two kinds of random streams apart for equal (seed, epoch) numbers.
_EPOCH_STREAM, _WINDOW_STREAM = 0, 1


@dataclasses.dataclass(frozen=True, eq=False)
class LengthGroupedOrder:
    """Which pairs (indices into `lengths`) form batch k; see the module docstring."""

    lengths: np.ndarray  # [N] the length to group by (tokens), per pair
    batch_size: int
    window_batches: int
    seed: int

    def __post_init__(self) -> None:
        if len(self.lengths) < 1:
            raise ValueError("no pairs to group by length")
        if self.batch_size < 1 or self.window_batches < 1:
            raise ValueError(
                f"need batch_size >= 1 and window_batches >= 1, got {self.batch_size}, "
                f"{self.window_batches}"
            )

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.lengths) // self.batch_size)

    def batch_pairs(self, k: int) -> np.ndarray:
        """[batch_size] pair indices of batch k (k = 0, 1, ... over all epochs)."""
        if k < 0:
            raise IndexError(f"batch index must be >= 0, got {k}")
        epoch, j = divmod(k, self.batches_per_epoch)
        window, slot = divmod(j, self.window_batches)
        sorted_pairs, order = self._window(epoch, window)
        start = int(order[slot]) * self.batch_size
        return sorted_pairs[start : start + self.batch_size]

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a pure cache; the order is frozen
    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, _EPOCH_STREAM, epoch))
        order = rng.permutation(len(self.lengths))
        return np.resize(order, self.batches_per_epoch * self.batch_size)

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a pure cache; the order is frozen
    def _window(self, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """The window's pairs sorted longest first, and the order of its batches."""
        size = self.window_batches * self.batch_size
        pairs = self._epoch_order(epoch)[window * size : (window + 1) * size]
        # A stable sort on -length keeps ties in epoch order.
        sorted_pairs = pairs[np.argsort(-self.lengths[pairs], kind="stable")]
        rng = np.random.default_rng((self.seed, _WINDOW_STREAM, epoch, window))
        return sorted_pairs, rng.permutation(len(pairs) // self.batch_size)


def length_grouped_order(
    lengths: Sequence[int], *, batch_size: int, window_batches: int, seed: int
) -> LengthGroupedOrder:
    """The order of the module docstring over pairs of the given lengths."""
    return LengthGroupedOrder(np.asarray(lengths, dtype=np.int64), batch_size, window_batches, seed)
