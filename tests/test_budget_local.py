"""Pareto local search after the initial design (budget/local.py): neighbours, and the step it takes."""

from leanfit.budget.local import gain, neighbours, next_step
from leanfit.budget.space import SearchSpace

SPACE = SearchSpace(methods=("lora", "bitfit"), train_layers=(1, 2, 3), targets=("all-linear", "attention"),
                    ranks=(2, 8))


def point(method, layers, targets="all-linear", rank=None):
    found = {"method": method, "train_layers": layers, "targets": targets, "log10_lr": -2.0}
    return found if rank is None else {**found, "rank": rank}


def price(p):
    """Cost of a point: linear in rank, blocks and target layers, like trainable parameters."""
    per_block = (0.05 * p["rank"] if p["method"] == "lora" else 0.01) * (3 if p["targets"] == "all-linear" else 1)
    cost = per_block * p["train_layers"]
    return cost if cost <= BUDGET + 1e-9 else None  # over the budget


BUDGET = 2.4


def test_a_neighbour_moves_one_knob_one_step():
    assert neighbours(point("lora", 2, rank=2), SPACE) == [
        point("lora", 2, rank=8), point("lora", 1, rank=2), point("lora", 3, rank=2), point("lora", 2, "attention", rank=2)]
    assert neighbours(point("bitfit", 1), SPACE) == [point("bitfit", 2), point("bitfit", 1, "attention")]


def test_gain_is_the_hypervolume_a_point_adds():
    front = [(0.2, -0.5), (0.6, -0.9)]
    assert abs(gain(front, (0.4, -0.9), (1.0, 0.0)) - 0.2 * 0.4) < 1e-12
    assert gain(front, (0.7, -0.8), (1.0, 0.0)) == 0.0  # dominated


def test_the_step_is_a_cheaper_variant_of_a_good_point_not_the_cheap_corner():
    scored = [(p, score, price(p)) for p, score in [
        (point("bitfit", 1, "attention"), 0.60), (point("bitfit", 3), 0.75),
        (point("lora", 1, "attention", rank=2), 0.80), (point("lora", 2, rank=8), 0.92)]]
    tried = [p for p, _, _ in scored]
    # r=2 on the same blocks (cost 0.6 of 2.4), as accurate as r=8, would add the most area; the bitfit
    # neighbours lie in gaps wide in log cost but narrow in cost
    first = next_step(scored, tried, SPACE, price, BUDGET)
    assert first == point("lora", 2, rank=2)
    # scored 0.91, it is on the front, and its own cheaper neighbour on the attention layers comes next
    scored.append((first, 0.91, price(first)))
    assert next_step(scored, [*tried, first], SPACE, price, BUDGET) == point("lora", 2, "attention", rank=2)


def test_no_step_when_no_neighbour_could_widen_the_front():
    lonely = SearchSpace(methods=("lora",), train_layers=(1, 2), targets=("attention",), ranks=(2, 4))
    best = point("lora", 1, "attention", rank=2)  # the cheapest point: every neighbour is dearer
    assert next_step([(best, 0.9, price(best))], [best], lonely, price, BUDGET) is None
    # and none over the budget or without a price
    scored = [(point("lora", 2, "attention", rank=4), 0.9, 0.8)]
    assert next_step(scored, [s[0] for s in scored], lonely, lambda p: None, BUDGET) is None
    assert next_step([], [], lonely, price, BUDGET) is None
