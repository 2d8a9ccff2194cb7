"""A learning-rate search that does not stop at the edge of its grid.

    grid (3e-3, 1e-2, 3e-2), best 3e-2  ->  try 1e-1; best again  ->  try 3e-1; then stop (two steps)
    grid (3e-4, 1e-3, 3e-3), best 3e-4  ->  try 1e-4; ...

Rates step along the 1-3-10 ladder. Ties go to the smaller rate; a diverged rate (score None)
loses. ``next_rate`` says which rate to run next, so a benchmark can resume at any point.
"""

from __future__ import annotations

MAX_EXTENSIONS = 2  # steps past the grid in either direction, at most


def _step(rate: float, up: bool) -> float:
    """The neighbouring rung on the 1, 3, 10, 30, ... ladder."""
    mantissa = float(f"{rate:.0e}".split("e")[0])
    if mantissa < 2:  # 1eK: up to 3eK, down to 3e(K-1)
        factor = 3.0 if up else 0.3
    else:  # 3eK: up to 1e(K+1), down to 1eK
        factor = 10 / 3 if up else 1 / 3
    return float(f"{rate * factor:.0e}")


def best_rate(scores: dict[float, float | None]) -> float | None:
    finite = [lr for lr, score in scores.items() if score is not None]
    return max(finite, key=lambda lr: (scores[lr], -lr)) if finite else None


def next_rate(grid: tuple[float, ...], scores: dict[float, float | None]) -> float | None:
    """The next rate to run given the scores so far, or None when the search is over."""
    for lr in grid:
        if lr not in scores:
            return lr
    best = best_rate(scores)
    if best is None:
        return None
    tried = sorted(scores)
    extended = len(tried) - len(grid)
    if extended >= MAX_EXTENSIONS:
        return None
    if best == tried[-1]:
        return _step(best, up=True)
    if best == tried[0]:
        return _step(best, up=False)
    return None


def extensions(grid: tuple[float, ...], scores: dict[float, float | None]) -> list[float]:
    """The rates run beyond the grid, in the order tried (for the report)."""
    return [lr for lr in scores if lr not in grid]
