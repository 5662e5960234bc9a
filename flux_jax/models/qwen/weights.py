"""How the model reads a frozen weight: a plain array, or a quantised leaf of a QLoRA base.

A kernel in the parameter tree is either a `jax.Array` (full fine-tuning, a LoRA base in its
dtype) or a `qwix.QArray` (a QLoRA base, flux_jax/quantization.py): int8 or NF4 codes of the
same shape as the kernel with fp32 scales per output channel or per block of input features. Every
matmul of the model reads its kernel through `kernel_value`, so the layers never need to know which
one they hold; a quantised kernel is dequantised one layer at a time, inside the scan, right before
its matmul (as bitsandbytes does on GPU), and only the codes and scales stay resident.
"""

from __future__ import annotations

from typing import Any

import jax
import qwix


def is_quantized(kernel: Any) -> bool:
    """Whether `kernel` is a quantised leaf (a qwix QArray) rather than a plain array."""
    return isinstance(kernel, qwix.QArray)


def kernel_value(kernel: jax.Array | qwix.QArray, dtype: Any) -> jax.Array:
    """The dense kernel in `dtype`: a cast for a plain array, dequantise-then-cast for a QArray.

    Dequantising first gives the codes times their fp32 scales, then one rounding to `dtype`:
    the same values as a base dequantised up front to fp32 and cast at use, so a QLoRA forward
    equals the forward of the dequantised base exactly.
    """
    if isinstance(kernel, qwix.QArray):
        return qwix.dequantize(kernel).astype(dtype)
    return kernel.astype(dtype)
