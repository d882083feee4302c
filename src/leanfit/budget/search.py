"""`leanfit search`: the most accurate adapter configuration inside a budget, and the trade-offs.

1. The cost model (cost.py) prices every configuration of the space before anything trains; a budget
   no configuration fits is refused, naming the smallest cost on offer.
2. A multi-objective Optuna study (validation accuracy up; parameters, or bytes / memory / latency /
   time, down) samples configurations at a cheap fidelity (a subset of the training rows, few epochs,
   optionally shorter sequences). The budget enters as Optuna constraints, known before training:
   a configuration over budget is recorded with its constraint values and never trained. A point
   proposed twice is trained once. The search starts from an initial design (`initial_design`):
   configurations spread evenly over the log of the cost inside the budget, every method in turn;
   costs are known before training, so these anchor the whole front. After the design, each trial
   is the configuration a model of the score (acquire.py, a Gaussian process) finds most likely not
   to be dominated by a trained one; Optuna's sampler (TPE, NSGA-II) proposes only what these leave
   (`model_steps`). All compare configurations at the top learning rate of the grid (`fixed_rate`):
   a short run ranks rates by how far a few steps get, not by where a full run ends, so the rate is
   searched at the full run (4).
3. Successive halving: the most promising configurations (best Pareto ranks, then accuracy) are
   trained again on `eta` times more rows, and so on; the last rung is the full run as configured,
   for `finalists` configurations. Each rung is its own study in the same storage, fed through
   Optuna's trial queue, so it is resumable and shared by workers too.
4. Rate descent (`descend_rate`): the best finalist is trained in full at the next lower rate of the
   grid, and the next, as long as each beats the best so far.

Every trial trains through `leanfit.tune.run`, the code path of `leanfit tune`, and is judged on the
validation split (the test split is never looked at by the search).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, LeanfitError
from .acquire import next_step
from .pareto import promotion_order
from .settings import COST_OBJECTIVES, Fidelity, SearchSettings
from .space import describe
from .study import (POLL_S, RATES_SUFFIX, counts, fail_stale, make_sampler, open_study, run_waiting, storage_for,
                    work)

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process ran a trial (several may share a study)
# Of a study's trials, taken by the initial design; the model's steps take the rest. Replayed on three
# landscapes (bench/search_replay.py, 2026-12-07), a half left fewer configurations outside the front
# than two thirds or a third in each: the model needs a spread of scores to start from, and steps.
DESIGN_SHARE = 1 / 2
DESIGN, MODEL = "design", "model"  # `proposed_by` of a trial queued by the initial design, or by the model (acquire.py)


def train_and_validate(config) -> dict:
    """Train one configuration through `leanfit.tune.run`; its validation metrics after the last epoch.
    Whatever an earlier study left in the trial's folder is deleted first (trials are never resumed,
    and the trainer refuses to start over an earlier run's metrics)."""
    from ..run_folder import clear, earlier_run
    from ..tune import run
    clear(config.output, earlier_run(config.output))
    report = run(config, evaluate_test=False)  # the search chooses on validation; the test split stays unread
    output = Path(config.output)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    validation = [r["values"] for r in records if r.get("kind") == "validation"]
    shutil.rmtree(output / "checkpoints", ignore_errors=True)  # the adapter is kept; resumption is not needed
    return {"validation": validation[-1] if validation else report["validation_best"], "wall_s": report["wall_s"],
            "trainable_params": report["trainable_params"], "adapter": report.get("adapter"), "output": str(output)}


class Search:
    """One worker of a search; `run()` does its share and returns the result every worker agrees on."""

    def __init__(self, settings: SearchSettings, evaluate: Callable[[object], dict] = train_and_validate,
                 prices: dict | None = None):
        self.s, self.evaluate = settings, evaluate
        # Cost estimates by point (without the learning rate); `prices` lets several searches over one
        # model, data set and run shape share them.
        self.costs: dict[str, object] = prices if prices is not None else {}
        self.errors: dict[str, str] = {}
        self._queued_only = False  # while the model's steps run: a trial the sampler proposes is not run

    # --- setup: data, base model, costs of the whole space -------------------------------------------
    def prepare(self) -> None:
        from .. import zoo
        from ..data import CLASSIFICATION, encode
        from ..tune import load_data
        base = self.s.base
        dataset = load_data(base)
        self.task = dataset.task
        self.maximize = dataset.task == CLASSIFICATION
        self.metric = "accuracy" if self.maximize else "perplexity"
        labels = len(dataset.labels) if self.maximize else None
        self.model, tokenizer = zoo.model(base.model, task=dataset.task, num_labels=labels, seed=base.seed)
        self.data = encode(dataset, tokenizer, max_length=base.max_length)
        self.tokenizer = tokenizer
        self.train_rows = int(self.data.train["input_ids"].shape[0])
        for point in self.s.space.points():
            self.cost(point)
        priced = [(describe(p, lr=False), self.costs[self._cost_key(p)])
                  for p in self.s.space.points() if self._cost_key(p) in self.costs]
        if not priced:
            reason = next(iter(self.errors.values()), "no point")
            raise ConfigError(f"No configuration of the search space can be built on this model ({reason}).")
        from .budget import check_reachable
        check_reachable(self.s.budget, priced)

    def _cost_key(self, params: dict) -> str:
        return json.dumps({k: v for k, v in params.items() if k != "log10_lr"}, sort_keys=True)

    def cost(self, params: dict):
        """CostEstimate of the full run of a point (None, with the reason kept, if it cannot be built)."""
        from .cost import estimate
        key = self._cost_key(params)
        if key not in self.costs and key not in self.errors:
            try:
                self.costs[key] = estimate(self.s.space.config(params, self.s.base), model=self.model,
                                           data=self.data, tokenizer=self.tokenizer)
            except LeanfitError as err:
                self.errors[key] = str(err)
        return self.costs.get(key)

    # --- the fidelity ladder ---------------------------------------------------------------------------
    def rungs(self) -> list[Fidelity]:
        s, base = self.s, self.s.base
        full_rows = min(base.max_train_rows or self.train_rows, self.train_rows)
        first = s.first_fidelity(full_rows)
        full = Fidelity(base.max_train_rows, base.epochs, None)
        if s.finalists == 0 or first.apply(base) == full.apply(base):
            return [first]
        ladder, rows = [first], first.rows
        while rows is not None and rows * s.eta < full_rows:
            rows *= s.eta
            ladder.append(replace(first, rows=rows))
        return ladder + [full]

    # --- one trial -----------------------------------------------------------------------------------------
    def objective(self, rung: int, fidelity: Fidelity):
        import optuna

        def run_trial(trial):
            queue_ran_dry = ("source" not in trial.user_attrs if rung > 0
                             else self._queued_only and "proposed_by" not in trial.user_attrs)
            if queue_ran_dry:  # another worker took the queued trial (a promotion, a model's step) this one was to run
                trial.set_user_attr("status", "unused")
                raise optuna.TrialPruned()
            params = self.s.space.suggest(trial)
            trial.set_user_attr("worker", WORKER)
            trial.set_user_attr("name", describe(params))
            trial.set_user_attr("fidelity", fidelity.label(self.s.base))
            cost = self.cost(params)
            if cost is None:
                trial.set_user_attr("status", "cannot build")
                trial.set_user_attr("error", self.errors[self._cost_key(params)])
                raise optuna.TrialPruned()
            trial.set_user_attr("cost", _cost_summary(cost))
            for key, violation in self.s.budget.violations(cost).items():
                trial.set_constraint(key, violation)
            if not self.s.budget.fits(cost):
                trial.set_user_attr("status", "over budget")
                raise optuna.TrialPruned()
            same = _same_point(trial)
            if same is not None:
                trial.set_user_attr("status", "duplicate")
                trial.set_user_attr("same_as", same.number)
                for key in ("validation", "trained_params"):
                    if key in same.user_attrs:
                        trial.set_user_attr(key, same.user_attrs[key])
                return same.values
            config = fidelity.apply(self.s.space.config(params, self.s.base))
            config = replace(config, output=str(Path(self.s.output) / "trials" / f"r{rung}-{trial.number:04d}"),
                             progress=False, checkpoint_every=0, resume=False)
            trial.set_user_attr("config", asdict(config))
            try:
                outcome = self.evaluate(config)
            except LeanfitError as err:  # e.g. a learning rate that diverges: a result, not a crash
                trial.set_user_attr("status", "failed")
                trial.set_user_attr("error", str(err))
                raise optuna.TrialPruned() from None
            trial.set_user_attr("status", "trained")
            trial.set_user_attr("validation", outcome["validation"])
            trial.set_user_attr("trained_params", outcome["trainable_params"])
            trial.set_user_attr("wall_s", outcome["wall_s"])
            trial.set_user_attr("output", outcome.get("output", config.output))  # the run's adapter and report
            return self.values(outcome["validation"], cost)
        return run_trial

    def values(self, validation: dict, cost) -> list[float]:
        return [validation[self.metric], *(float(getattr(cost, COST_OBJECTIVES[o])) for o in self.s.objectives[1:])]

    def directions(self) -> list[str]:
        return ["maximize" if self.maximize else "minimize"] + ["minimize"] * (len(self.s.objectives) - 1)

    # --- the whole search ------------------------------------------------------------------------------------
    def run(self):
        import optuna
        from .progress import SearchProgress
        from .report import collect
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says what happens
        started = time.perf_counter()
        Path(self.s.output).mkdir(parents=True, exist_ok=True)
        storage = storage_for(self.s.storage_url())  # a wrong URL fails before any work
        self.prepare()
        ladder = self.rungs()
        studies = []
        with SearchProgress(self.s.progress, self.metric) as progress:
            for index, fidelity in enumerate(ladder):
                name = self.s.study_name if index == 0 else f"{self.s.study_name}/rung{index}:{fidelity.key()}"
                study = open_study(storage, name, self.directions(), self._sampler_factory(index), self.s.seed,
                                   self.s.fingerprint() if index == 0 else {"rung_of": self.s.study_name})
                if index > 0:
                    count = self.s.finalists if index == len(ladder) - 1 else None
                    if not self.promote(studies[-1], study, count):
                        break
                elif self.s.initial_design and self.s.sampler != "random":
                    # idempotent: a resumed study skips them
                    for params in self.initial_design():
                        study.enqueue_trial(params, user_attrs={"proposed_by": DESIGN}, skip_if_exists=True)
                studies.append(study)
                total = self.s.trials if index == 0 else len(study.get_trials(deepcopy=False))
                progress.start_rung(index, fidelity.label(self.s.base), total, study)
                objective = self.objective(index, fidelity)
                if index == 0 and self.model_steps():
                    work(study, objective, target=None, on_trial=progress.on_trial)  # the design
                    self.model_search(study, objective, progress.on_trial)
                work(study, objective, target=self.s.trials if index == 0 else None, on_trial=progress.on_trial)
            if len(studies) == len(ladder) > 1 and self.fixed_rate() is not None:
                studies.append(self.descend_rate(storage, studies[-1], ladder[-1], len(ladder), progress))
                ladder = ladder + [ladder[-1]]
        return collect(self, studies, ladder, time.perf_counter() - started)

    def model_steps(self) -> bool:
        """Whether the trials after the initial design are the model's steps (acquire.py): for a sampler
        that starts from the design, with a cost objective to widen the front along."""
        return self.s.initial_design and self.s.sampler != "random" and len(self.s.objectives) > 1

    def model_search(self, study, objective, on_trial) -> None:
        """Train the configuration inside the budget the model finds most likely not to be dominated,
        then the next, until the study has its trials. A configuration queued or running in another
        worker counts as tried (its score is not known yet), so several workers train different steps
        at once; one worker alone chooses each step once the last has trained. A resumed study goes on
        from the trials there."""
        sign, rate = (1 if self.maximize else -1), self.fixed_rate()
        feasible = [(at_rate(p, rate), costs) for p in self.s.space.points() if (costs := self._costs(p)) is not None]
        while True:
            fail_stale(study)
            state = counts(study)
            if state["trained"] + state.get("RUNNING", 0) + state.get("WAITING", 0) >= self.s.trials:
                break
            # a queued trial has no params yet, only the ones it will run with
            tried = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False)]
            scored = [(t.params, sign * t.values[0], self._costs(t.params)) for t in _distinct_complete(study)]
            step = next_step([s for s in scored if s[2] is not None], [c for c in feasible if c[0] not in tried],
                             self.s.space)
            if step is None:
                break
            study.enqueue_trial(step, user_attrs={"proposed_by": MODEL}, skip_if_exists=True)
            self._queued_only = True  # not the sampler's, if another worker took the step first
            try:
                run_waiting(study, objective, on_trial)  # this step, or one another worker queued meanwhile
            finally:
                self._queued_only = False
        work(study, objective, target=None, on_trial=on_trial)  # what is still queued; then the others' runs

    def _costs(self, point: dict) -> tuple[float, ...] | None:
        """A point's costs by each cost objective (trainable parameters without one); None if it cannot
        be built or does not fit the budget."""
        names = [COST_OBJECTIVES[o] for o in self.s.objectives[1:]] or ["trainable_params"]
        cost = self.cost(point)
        return tuple(float(getattr(cost, n)) for n in names) if cost is not None and self.s.budget.fits(cost) else None

    def _price(self, point: dict) -> float | None:
        """A point's cost by the first cost objective, as `_costs`."""
        costs = self._costs(point)
        return None if costs is None else costs[0]

    def fixed_rate(self) -> float | None:
        """log10 of the rate TPE and NSGA-II compare configurations at in the first rung: the top of the
        grid (None: random search, or a grid of one rate).

        A short run ranks rates by how far a few steps get: at 256 rows and 3 epochs on bbc-news
        (2026-11-24) 53 of 58 runs below the top rate ended under 0.50 validation accuracy, the 22 at
        it 0.62-0.92. Left free, TPE spent most of its proposals on lower rates, which it cannot learn
        to avoid from a design that never varies the rate, and found no point of its front."""
        low, high, _ = self.s.space.lr_grid()
        return high if high > low and self.s.sampler != "random" else None

    def descend_rate(self, storage, finals, fidelity: Fidelity, index: int, progress):
        """Train the best configuration of the full run at the next lower rate of the grid, and the
        next, while each beats the best so far; the rates of the full run are searched here. Resumable
        like the rungs: each step is queued in its own study before it trains."""
        study = open_study(storage, f"{self.s.study_name}{RATES_SUFFIX}", self.directions(), self._sampler_factory(index),
                           self.s.seed, {"rung_of": self.s.study_name})
        done = _distinct_complete(finals)
        if not done:
            return study
        sign = 1 if self.maximize else -1
        best = max(done, key=lambda t: sign * t.values[0])
        low, _, step = self.s.space.lr_grid()
        rate = best.params["log10_lr"] - step
        progress.start_rung(index, f"{fidelity.label(self.s.base)}, lower rates", round((rate - low) / step) + 1, study)
        while rate >= low - 1e-9:
            params = {**best.params, "log10_lr": round(rate, 6)}
            study.enqueue_trial(params, user_attrs={"source": best.number}, skip_if_exists=True)
            work(study, self.objective(index, fidelity), target=None, on_trial=progress.on_trial)
            trial = next((t for t in _distinct_complete(study) if t.params == params), None)
            if trial is None or sign * trial.values[0] <= sign * best.values[0]:
                break
            best, rate = trial, rate - step
        return study

    def initial_design(self) -> list[dict]:
        """Configurations spread evenly over the log of the cost (by the first cost objective) inside
        the budget, at the top learning rate of the grid: `design_count` of them, the cheapest and the
        dearest first, then points halving the largest gaps, each the closest in cost to its slot,
        where a method already in the design counts half a slot farther per use.

        Costs are known before training, so the front can be anchored along its whole length before
        anything has been scored (each method's two ends alone, the design until 2026-11-24, left
        the middle of the cost range to chance). A short low-fidelity run learns most at the top rate
        (bbc-news, 2026-11-24: 53 of 58 runs below it ended under 0.50 validation accuracy, the 22 at
        it 0.62-0.92; see `fixed_rate`)."""
        priced = [(math.log(max(cost, 1e-12)), point) for point in self.s.space.points()
                  if (cost := self._price(point)) is not None]
        if not priced:
            return []
        count = min(self.design_count(), len(priced))
        cheapest, dearest = min(c for c, _ in priced), max(c for c, _ in priced)
        step = (dearest - cheapest) / max(count - 1, 1)
        uses: dict[str, int] = {}
        design = []
        for slot in spread_order(count):
            target = cheapest + slot * step
            # a method already in the design pays half a step of cost distance per use: variety first
            _, chosen = min(((abs(c - target) + 0.5 * step * uses.get(p["method"], 0), p) for c, p in priced
                             if p not in design), key=lambda item: item[0])
            design.append(chosen)
            uses[chosen["method"]] = uses.get(chosen["method"], 0) + 1
        return [at_rate(p, self.fixed_rate()) for p in design]

    def design_count(self) -> int:
        """Trials the initial design takes: half of the study's, leaving the rest to the model's steps."""
        return max(1, round(self.s.trials * DESIGN_SHARE))

    def _sampler_factory(self, rung: int) -> Callable[[int], object]:
        if rung > 0:  # later rungs only run the points queued in them
            return lambda seed: make_sampler("random", seed, 1)
        rate = self.fixed_rate()
        return lambda seed: make_sampler(self.s.sampler, seed, self.s.trials, self.s.startup_trials,
                                         fixed=None if rate is None else {"log10_lr": rate})

    def promote(self, previous, study, count: int | None) -> bool:
        """Queue the most promising distinct points of `previous` in `study`; False if there are none."""
        done = _distinct_complete(previous)
        if not done:
            return False
        if count is None:
            count = max(self.s.finalists, math.ceil(len(done) / self.s.eta))
        points = [[-t.values[0] if self.maximize else t.values[0], *t.values[1:]] for t in done]
        for i in promotion_order(points)[:count]:
            study.enqueue_trial(done[i].params, user_attrs={"source": done[i].number}, skip_if_exists=True)
        return True


def at_rate(point: dict, rate: float | None) -> dict:
    """`point` at the learning rate `rate` (log10), or without one for None: a grid of a single rate,
    where SearchSpace.suggest makes the rate no parameter."""
    return {k: v for k, v in point.items() if k != "log10_lr"} | ({} if rate is None else {"log10_lr": rate})


def spread_order(count: int) -> list[int]:
    """Slots 0 .. count-1 in the order that halves the largest gap each time: both ends, then the
    middle, then the quarters ... (a design cut short still covers the range)."""
    if count <= 2:
        return list(range(count))
    order, gaps = [0, count - 1], [(0, count - 1)]
    while len(order) < count:
        gaps.sort(key=lambda g: g[0] - g[1])  # widest first
        a, b = gaps.pop(0)
        if b - a < 2:
            continue
        middle = (a + b) // 2
        order.append(middle)
        gaps += [(a, middle), (middle, b)]
    return order


def _same_point(trial):
    """A finished trial of this study with the same parameters, whose result is reused, or None.

    An earlier trial of the point that another worker is running is waited for: two workers can queue
    one model step at once (Optuna's enqueue_trial checks `skip_if_exists` and adds in two
    transactions), and constant-liar TPE can propose one point to both; the point trains once. A dead
    worker's trial is failed once its heartbeat is stale, which ends the wait."""
    from optuna.trial import TrialState
    while True:
        same = [other for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if other.number != trial.number and other.params == trial.params]
        done = [other for other in same if other.state == TrialState.COMPLETE]
        if done:
            return done[0]
        if not any(other.number < trial.number for other in same):
            return None
        time.sleep(POLL_S)
        fail_stale(trial.study)  # if the other worker died, this one may be the only one left to notice


def _distinct_complete(study) -> list:
    from optuna.trial import TrialState
    seen, found = set(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = json.dumps(trial.params, sort_keys=True)
        if key not in seen and trial.user_attrs.get("status") in ("trained", "duplicate"):
            seen.add(key)
            found.append(trial)
    return found


def _cost_summary(cost) -> dict:
    return {"trainable_params": cost.trainable_params, "total_params": cost.total_params,
            "trainable_share": cost.trainable_share, "adapter_bytes": cost.adapter_bytes,
            "train_peak_bytes": cost.train_peak_bytes, "step_seconds": cost.step_seconds,
            "train_seconds": cost.train_seconds, "inference_latency_ratio": cost.inference_latency_ratio}


def search(settings: SearchSettings, evaluate: Callable[[object], dict] = train_and_validate,
           prices: dict | None = None):
    """Run (or join, or resume) a search; returns its `SearchResult` (report.py) and writes the outputs.

    `evaluate(config) -> {"validation", "wall_s", "trainable_params", ...}` trains one configuration
    (default: `leanfit.tune.run`); `prices` is a cost cache shared between searches of one base run."""
    from .report import write_outputs
    result = Search(settings, evaluate, prices).run()
    write_outputs(result, settings.output)
    return result
