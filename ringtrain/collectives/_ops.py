"""Reduction ops of allreduce."""

from __future__ import annotations

import enum


class ReduceOp(enum.Enum):
    """How allreduce combines the ranks' tensors."""

    Average = "Average"
    Sum = "Sum"
    Min = "Min"
    Max = "Max"

    def __repr__(self) -> str:
        return f"ringtrain.{self.value}"


Average = ReduceOp.Average
Sum = ReduceOp.Sum
Min = ReduceOp.Min
Max = ReduceOp.Max


def op_name(op: object) -> str:
    """A name for ``op`` that goes into the cross-rank signature, valid or not."""
    return op.value if isinstance(op, ReduceOp) else f"invalid:{op!r}"
