"""Pareto fronts over points to minimise: non-dominated ranks, the front, 2-D hypervolume, promotion order.

Callers turn maximised objectives (accuracy) into minimised ones by negating them.
"""

from __future__ import annotations

from typing import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """a is no worse than b everywhere and better somewhere (all objectives minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def nondominated_ranks(points: Sequence[Point]) -> list[int]:
    """Rank 0 for the front, 1 for the front of what remains, ... (Deb et al.'s non-dominated sorting)."""
    ranks = [-1] * len(points)
    remaining, rank = set(range(len(points))), 0
    while remaining:
        front = {i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining if j != i)}
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points, in input order."""
    return [i for i, r in enumerate(nondominated_ranks(points)) if r == 0]


def promotion_order(points: Sequence[Point], primary: int = 0) -> list[int]:
    """Indices ordered for successive halving: front by front, and inside a front by the primary
    objective (accuracy), so keeping the first n keeps the most accurate of the best fronts."""
    ranks = nondominated_ranks(points)
    return sorted(range(len(points)), key=lambda i: (ranks[i], points[i][primary], i))


def hypervolume_2d(points: Sequence[Point], reference: Point) -> float:
    """Area dominated by `points` (two objectives, both minimised) and bounded by `reference`.

    Points not strictly better than the reference in both objectives add nothing.
    """
    inside = sorted((x, y) for x, y in points if x < reference[0] and y < reference[1])
    # Sweep over x: between consecutive x values the covered height is reference_y - (lowest y so far).
    area, lowest = 0.0, reference[1]
    for (x, y), following in zip(inside, [p[0] for p in inside[1:]] + [reference[0]]):
        lowest = min(lowest, y)
        area += (following - x) * (reference[1] - lowest)
    return area
