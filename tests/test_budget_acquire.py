"""The model's steps after the initial design (budget/acquire.py): the chance that a configuration would
not be dominated once trained, and the step it picks."""

from leanfit.budget.acquire import features, next_step, non_domination
from leanfit.budget.space import SearchSpace

SPACE = SearchSpace(methods=("lora", "bitfit"), train_layers=(1, 2, 3), targets=("all-linear", "attention"),
                    ranks=(2, 8))


def point(method, layers, targets="all-linear", rank=None):
    found = {"method": method, "train_layers": layers, "targets": targets, "log10_lr": -2.0}
    return found if rank is None else {**found, "rank": rank}


def price(p):
    """Trainable parameters of a point: linear in rank, blocks and target layers."""
    per_block = (500 * p["rank"] if p["method"] == "lora" else 100) * (3 if p["targets"] == "all-linear" else 1)
    return (float(per_block * p["train_layers"]),)


def scored(*pairs):
    return [(p, score, price(p)) for p, score in pairs]


# LoRA scores rise with its size, BitFit stays low: a landscape a model can learn from five points
TRAINED = scored((point("bitfit", 1, "attention"), 0.60), (point("bitfit", 3), 0.64),
                 (point("lora", 1, "attention", rank=2), 0.80), (point("lora", 3, "attention", rank=8), 0.90),
                 (point("lora", 3, rank=8), 0.93))


def untried(trained):
    done = [p for p, _, _ in trained]
    at_top = [{**p, "log10_lr": -2.0} for p in SPACE.points()]  # points() are at the lowest rate
    return [(p, price(p)) for p in at_top if p not in done]


def test_features_name_the_method_targets_blocks_rank_and_log_cost():
    import math
    row = features(point("lora", 2, "attention", rank=8), (1000.0,), SPACE)
    assert row == [1.0, 0.0, 0.0, 1.0, 1.0, 3.0, math.log(1000.0)]
    assert features(point("bitfit", 3), (300.0,), SPACE)[:6] == [0.0, 1.0, 1.0, 0.0, 2.0, 0.0]


def chance_of(trained, wanted):
    candidates = untried(trained)
    chances = non_domination(trained, candidates, SPACE)
    return next(c for (p, _), c in zip(candidates, chances) if p == wanted)


def test_a_configuration_cheaper_than_everything_trained_cannot_be_dominated():
    # without BitFit's top block, the cheapest trained point costs 900 parameters
    assert chance_of(TRAINED[1:], point("bitfit", 1, "attention")) == 1.0  # 100
    assert chance_of(TRAINED[1:], point("bitfit", 2, "all-linear")) == 1.0  # 600
    assert 0.0 < chance_of(TRAINED[1:], point("lora", 1, rank=2)) < 1.0  # 3000: must beat 0.80


def test_where_the_scores_rise_a_configuration_is_likelier_to_clear_its_bar():
    # both must beat a trained score below them in cost: BitFit's 0.64 (at 900), LoRA's 0.80 (at 1000)
    flat = chance_of(TRAINED, point("bitfit", 2, "all-linear"))  # 600 parameters
    rising = chance_of(TRAINED, point("lora", 3, "all-linear", rank=2))  # 9000 parameters
    assert rising > flat


def test_the_step_is_the_configuration_most_likely_off_the_front():
    candidates = untried(TRAINED)
    chances = non_domination(TRAINED, candidates, SPACE)
    step = next_step(TRAINED, candidates, SPACE)
    assert step == candidates[max(range(len(chances)), key=lambda i: (chances[i], -i))][0]
    assert step["method"] == "lora"  # where the scores rise, not BitFit's flat corner
    assert next_step(TRAINED, candidates, SPACE) == step  # the same inputs give the same step (workers agree)


def test_a_bar_is_set_only_by_configurations_no_dearer_in_every_cost():
    trained = [(point("lora", 1, rank=2), 0.9, (10.0, 5.0))]
    # cheaper in the first cost, dearer in the second: the trained point does not cover it
    free = [(point("lora", 2, rank=2), (20.0, 4.0))]
    assert non_domination([*trained, (point("bitfit", 1), 0.5, (1.0, 9.0))], free, SPACE) == [1.0]
    covered = [(point("lora", 2, rank=2), (20.0, 6.0))]
    assert non_domination([*trained, (point("bitfit", 1), 0.5, (1.0, 9.0))], covered, SPACE)[0] < 1.0


def test_no_step_without_candidates_and_the_cheapest_first_without_a_model():
    assert next_step(TRAINED, [], SPACE) is None
    few = untried(TRAINED[:1])
    assert next_step(TRAINED[:1], few, SPACE) == min(few, key=lambda c: c[1])[0]
