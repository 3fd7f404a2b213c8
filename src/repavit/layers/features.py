"""Which intermediate features to return: the index convention of timm's ``forward_intermediates``."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UserError

__all__ = ["take_indices"]


def take_indices(num: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """Absolute feature indices to return, and the largest (timm's ``feature_take_indices`` convention).

    ``None``: all ``num``; an int ``n``: the last ``n``; a sequence: those indices (negative count from the end).
    """
    if indices is None:
        indices = num
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise UserError(f"cannot take the last {indices} features: expected 1 to {num}")
        taken = list(range(num - indices, num))
    else:
        taken = []
        for i in indices:
            idx = num + i if i < 0 else i
            if not 0 <= idx < num:
                raise UserError(f"feature index {i} is out of range: expected -{num} to {num - 1}")
            taken.append(idx)
        if not taken:
            raise UserError("no feature indices given: expected at least one")
    return taken, max(taken)
