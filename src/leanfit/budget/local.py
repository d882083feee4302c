"""Pareto local search: after the initial design, try the one-step neighbours of the front that could
widen it most.

A neighbour of a point keeps its method and learning rate and moves one step in one knob: the rank,
the number of trained blocks (the next choice of `train_layers`), or the target set. Its cost is known
before training (cost.py), its score is not; the step taken is the neighbour whose hypervolume gain
would be largest if it scored as well as the best front point it neighbours. So a cheaper variant of a
good configuration comes first, and a neighbour that could not widen the front even then is never
queued.

Why: on bbc-news (2026-11-25) TPE spent 5 of its 7 proposals after the design on the cheap methods'
corner (bitfit, ssf, ia3), where the front's many cheap points draw its density, while random search
found LoRA r=2 on the top 2 blocks, a step below two front points of the design (r=4 top 2, r=2 top
3), cheaper than both and as accurate. A rule that filled the widest gaps of the log of the cost
(tried the same day) also went to the cheap corner: in the hypervolume, the measure of a front, a gap
counts by its width in cost, not in log cost.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

from .pareto import front, hypervolume_2d
from .space import SearchSpace, rank_option

Scored = tuple[dict, float, float]  # (point, score with higher better, cost)


def neighbours(point: dict, space: SearchSpace) -> list[dict]:
    """The points one step from `point` in rank, trained blocks or target set, in the space."""
    found = []
    for knob, choices in (("rank", space.ranks), ("train_layers", space.train_layers)):
        if knob == "rank" and not rank_option(point["method"]):
            continue
        index = list(choices).index(point[knob])
        found += [{**point, knob: choices[i]} for i in (index - 1, index + 1) if 0 <= i < len(choices)]
    found += [{**point, "targets": other} for other in space.targets if other != point["targets"]]
    return found


def gain(points: Sequence[tuple[float, float]], candidate: tuple[float, float], reference: tuple[float, float]) -> float:
    """Hypervolume added by `candidate` to `points` ((cost, -score) pairs, both minimised)."""
    return hypervolume_2d([*points, candidate], reference) - hypervolume_2d(points, reference)


def next_step(scored: Sequence[Scored], tried: Sequence[dict], space: SearchSpace,
              price: Callable[[dict], float | None], cost_reference: float) -> dict | None:
    """The neighbour of the front, not in `tried`, with the largest optimistic hypervolume gain (None
    if none gains). `scored`: the trained points; `price(point)`: a point's cost, None if it cannot be
    built or is over the budget; `cost_reference` bounds the front in cost (the dearest feasible point)."""
    if not scored:
        return None
    points = [(cost, -score) for _, score, cost in scored]
    reference = (cost_reference, max(y for _, y in points))  # the worst score seen
    hopes: dict[str, tuple[dict, float]] = {}  # untried neighbours, each with its front parents' best score
    for i in front(points):
        parent, score, _ = scored[i]
        for candidate in neighbours(parent, space):
            if candidate not in tried:
                key = json.dumps(candidate, sort_keys=True)
                hopes[key] = (candidate, max(score, hopes.get(key, (None, score))[1]))
    best, best_gain = None, 0.0
    for candidate, score in hopes.values():
        cost = price(candidate)
        if cost is None:
            continue
        added = gain(points, (cost, -score), reference)
        if added > best_gain + 1e-15:
            best, best_gain = candidate, added
    return best
