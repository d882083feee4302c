"""Model-based steps after the initial design: train the configuration most likely to widen the front.

A configuration's costs are known before it trains (cost.py); only its score is not. So the step
models the score alone: a Gaussian process (scikit-learn's) over the trained configurations' features
(method, target set, blocks, rank, log of each cost) predicts every untried configuration inside the
budget, with an uncertainty that includes the noise of one score. The step is the configuration most
likely not to be dominated once trained: the chance that its score beats the best trained score among
the configurations that cost no more in every cost objective (probability of non-domination). A
configuration cheaper than everything trained has nothing to beat and comes first.

Why this rule: the front should leave no configuration outside it, that is, none that is cheaper than
the front's points at the same score. The configurations most likely to be outside are the ones to
try. Replayed on the bench's landscapes (bench/search_replay.py; 2026-12-07), where a random search
of as many trials drew a configuration outside the front in 30% / 25% / 47% of runs after the
neighbour-based local search this replaces (bbc-news 20 trials, tweets-sentiment 20 and 10), after
this rule it did in 14% / 11% / 19%. On two landscapes recorded after the choice (training seed 1):
56% -> 0% on bbc-news, and on tweets-sentiment, whose scores lie within noise of each other,
24% -> 22% at 20 trials but 36% -> 42% at 10. The local search could only move one knob from a front point
and valued a step by the hypervolume it would add if it scored as well as its parent, so it never
tried an equally priced configuration of another shape (bitfit beside the design's IA3, LoRA r=8 on
one block beside r=4 on two), which is where most of what it left outside lay.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

from .space import SearchSpace

Costed = tuple[dict, tuple[float, ...]]  # (point, its costs by each cost objective, all minimised)
Scored = tuple[dict, float, tuple[float, ...]]  # (point, score with higher better, costs)


def features(point: dict, costs: Sequence[float], space: SearchSpace) -> list[float]:
    """What the model sees of a configuration: method and target set (one-hot), how many blocks (the
    position among the space's choices), log2 of the rank (0 without one), log of each cost."""
    row = [float(point["method"] == m) for m in space.methods]
    row += [float(point["targets"] == t) for t in space.targets]
    row.append(float(list(space.train_layers).index(point["train_layers"])))
    row.append(math.log2(point["rank"]) if point.get("rank") else 0.0)
    row += [math.log(max(c, 1e-12)) for c in costs]
    return row


def non_domination(scored: Sequence[Scored], candidates: Sequence[Costed], space: SearchSpace) -> list[float]:
    """For each candidate, the chance that its score, once trained, beats every trained score that
    costs no more in every cost objective (1.0 where no trained configuration is that cheap)."""
    import numpy as np
    from scipy.stats import norm
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    x = np.array([features(p, c, space) for p, _, c in scored])
    y = np.array([s for _, s, _ in scored])
    centre, spread = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
    # one length scale over standardised features: with a few dozen points, one per feature overfits
    kernel = ConstantKernel(1.0) * RBF(1.0, (1e-2, 1e3)) + WhiteKernel(1e-2, (1e-5, 1.0))
    model = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit((x - centre) / spread, y)
    grid = np.array([features(p, c, space) for p, c in candidates])
    mean, sd = model.predict((grid - centre) / spread, return_std=True)  # the white noise is in sd
    chances = []
    for (_, costs), mu, sigma in zip(candidates, mean, sd):
        bar = max((s for _, s, c in scored if all(a <= b for a, b in zip(c, costs))), default=None)
        chances.append(1.0 if bar is None else float(norm.sf((bar - mu) / max(sigma, 1e-12))))
    return chances


def next_step(scored: Sequence[Scored], candidates: Sequence[Costed], space: SearchSpace) -> dict | None:
    """The untried candidate most likely not to be dominated once trained (None if there is none).
    `scored`: the trained configurations; `candidates`: the untried ones inside the budget. Ties go
    to the earlier candidate, so every worker of a study takes the same step."""
    if not candidates:
        return None
    if len(scored) < 2:  # nothing to fit a model to: the cheapest untried comes first
        return min(candidates, key=lambda c: c[1])[0]
    chances = non_domination(scored, candidates, space)
    return candidates[max(range(len(candidates)), key=lambda i: (chances[i], -i))][0]
