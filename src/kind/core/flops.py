"""Counting floating-point work with torch.utils.flop_counter, the grouped GEMM included.

KIND's blocked tailor path runs its blocks through `torch._grouped_mm` (kind.core.gated), which
torch's counter has no formula for: it would count nothing for the layers that fold. `count_flops`
is the counter with that formula, so KIND and dense steps are counted alike."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 × the multiply-adds of one grouped GEMM. With a 3-d operand every output number is a dot
    product of a's last dimension (x [M, K] by weights [G, K, N] -> [M, N]: 2·M·N·K); with two 2-d
    operands the jagged dimension is the one summed over (a [K', M] by b [M, N], the gradient of the
    weights -> [G, K', N]: 2·K'·M·N)."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def count_flops() -> FlopCounterMode:
    """A FlopCounterMode (no display) that also counts `torch._grouped_mm`."""
    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flop}
    )
