"""The search fidelity's whole landscape (bbc-news, or --data): every configuration inside the budget trained
at the top rates of the grid, so the search bench's fronts can be judged against all configurations, not only
against the few random search happened to draw.

For each study of the last `bench/search.py` run (out/bench-search/<data>/<sampler>-seed<N>/study.db)
it counts the configurations that no trained point of the study weakly dominates (they would widen its
front), and estimates by simulation the chance that random search at the same number of trials draws one
of them: the chance that random search's front is not dominated by the study's. RandomSampler draws the
method, blocks, targets, rank (for a method with one) and rate independently and uniformly; a draw over
the budget or repeating a trained point does not count as a trial (study.work, which also stops after
PROPOSALS_PER_TRIAL proposals per trial), and the simulation does the same.

Runs the studies already trained are reused (training is seeded, and a study's run of a configuration is
the same run), so only the configurations no study tried are trained here; those are kept in
<runs>/landscape/runs.json, so running it again trains nothing new. Rates below those trained
here are assumed dominated: the bench's studies' runs at them are listed with their best accuracy.

    .venv/bin/python bench/search_landscape.py      # after bench/search.py; about 20 minutes on 2 cores (bbc-news)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import (BUDGET, OUT, QUICK, RUNS, SPACE, TASKS, Memo, environment,  # noqa: E402
                    front_dominates, runs_dir, settings_for)

from leanfit.budget.pareto import front as pareto_front  # noqa: E402
from leanfit.budget.search import Search, describe  # noqa: E402
from leanfit.budget.space import rank_option  # noqa: E402
from leanfit.budget.study import PROPOSALS_PER_TRIAL  # noqa: E402
from leanfit.io import atomic_write_bytes  # noqa: E402

SIMULATIONS = 20000


def studies(folder: Path) -> dict[str, list[dict]]:
    """Each study's trained trials (point, config, result), by study name."""
    found = {}
    for db in sorted(folder.glob("*/study.db")):
        name = db.parent.name
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
        found[name] = [{"params": t.params, "config": t.user_attrs["config"], "accuracy": t.user_attrs["validation"]["accuracy"],
                        "params_trained": t.user_attrs["trained_params"], "wall_s": t.user_attrs.get("wall_s")}
                       for t in study.trials if t.user_attrs.get("status") == "trained"]
    return found


def weakly_dominated(point: tuple[int, float], by: list[tuple[int, float]]) -> bool:
    """(trainable parameters, accuracy): some point of `by` is as cheap or cheaper and as accurate or more."""
    return front_dominates([(cost, -accuracy) for cost, accuracy in by], [(point[0], -point[1])])


def key_of(params: dict) -> tuple:
    """A point's identity; `cost_only` leaves out the rate, which costs do not depend on."""
    return tuple(sorted((k, v) for k, v in params.items()))


def cost_only(params: dict) -> tuple:
    return key_of({k: v for k, v in params.items() if k != "log10_lr"})


def miss_chance(outside: set[tuple], feasible: set[tuple], trials: int, rates: list[float], rng: random.Random) -> float:
    """Share of simulated random searches of `trials` trained points that draw a point of `outside`."""
    hits = 0
    for _ in range(SIMULATIONS):
        trained: set[tuple] = set()
        hit, draws = False, 0
        while len(trained) < trials and draws < PROPOSALS_PER_TRIAL * trials:
            draws += 1
            method = rng.choice(SPACE.methods)
            params = {"method": method, "train_layers": rng.choice(SPACE.train_layers), "targets": rng.choice(SPACE.targets)}
            if rank_option(method):
                params["rank"] = rng.choice(SPACE.ranks)
            params["log10_lr"] = rng.choice(rates)
            key = key_of(params)
            if key in trained or cost_only(params) not in feasible:
                continue
            trained.add(key)
            hit = hit or key in outside
        hits += hit
    return hits / SIMULATIONS


def train_landscape(search: Search, folder: Path, memo: Memo, rates: list[float]) -> tuple[dict, set]:
    """Every feasible point at `rates`, trained at the search fidelity (or reused): by key_of(point), its
    name, parameters, trainable parameters and accuracy; and the keys of the runs this script trained."""
    cache = folder / "landscape" / "runs.json"
    kept = json.loads(cache.read_text()) if cache.exists() else {}
    memo.results.update(kept)
    trained_here = set(kept)
    fidelity = search.rungs()[0]
    feasible = [p for p in SPACE.points() if search._price(p) is not None]
    landscape = {}
    for i, point in enumerate(p | {"log10_lr": rate} for rate in rates for p in feasible):
        config = replace(fidelity.apply(SPACE.config(point, search.s.base)), output=str(folder / "landscape" / f"{i:04d}"),
                         progress=False, checkpoint_every=0, resume=False)
        result, key = memo(config), Memo.key(asdict(config))
        if key not in trained_here and result.get("output", "").startswith(str(folder / "landscape")):
            trained_here.add(key)
            atomic_write_bytes(cache, json.dumps({k: memo.results[k] for k in trained_here}).encode())
        landscape[key_of(point)] = {"name": describe(point), "params": point, "trainable_params": result["trainable_params"],
                                    "accuracy": result["validation"]["accuracy"]}
        print(f"{i + 1}/{len(feasible) * len(rates)} {describe(point)}: {result['validation']['accuracy']:.3f}", flush=True)
    return landscape, trained_here


def judge(name: str, trials: list[dict], landscape: dict, feasible: set[tuple], trials_per_study: int,
          grid: list[float], rows_scored: int, rng: random.Random) -> dict:
    """The configurations outside a study's front (also when lowered by their score's standard error,
    binomial on the validation rows scored), and random search's chance of drawing one."""
    own = [(t["params_trained"], t["accuracy"]) for t in trials]
    points = {k: (v["trainable_params"], v["accuracy"]) for k, v in landscape.items()}
    outside = [k for k, p in points.items() if not weakly_dominated(p, own)]
    beyond = [k for k, (c, a) in points.items() if not weakly_dominated((c, a - math.sqrt(a * (1 - a) / rows_scored)), own)]
    row = {"study": name, "trained": len(trials), "outside": [landscape[k]["name"] for k in outside],
           "random_finds_one": miss_chance(set(outside), feasible, trials_per_study, grid, rng),
           "outside_beyond_error": [landscape[k]["name"] for k in beyond],
           "random_finds_one_beyond_error": miss_chance(set(beyond), feasible, trials_per_study, grid, rng)}
    print(name, len(outside), f"{row['random_finds_one']:.3f}", len(beyond), f"{row['random_finds_one_beyond_error']:.3f}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bbc-news", choices=list(TASKS))
    parser.add_argument("--rates", type=int, default=2, help="how many of the grid's top rates to train (default 2)")
    parser.add_argument("--quick", action="store_true", help="on bench/search.py --quick's studies (a smoke run)")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="training seed (split, initialisation, data order); other than 0 there are no bench studies "
                             "to judge or reuse: a second landscape to check the search's rules on")
    args = parser.parse_args()
    torch.set_num_threads(2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    task = QUICK if args.quick else TASKS[args.data]
    task["precision"] = "auto"
    folder, target = runs_dir(args.data, task), (RUNS if args.quick else OUT)
    if args.train_seed:
        folder = folder.with_name(f"{folder.name}-train-seed{args.train_seed}")
    trained = studies(folder)
    memo = Memo()
    for t in (t for trials in trained.values() for t in trials):  # the studies' runs, reused
        memo.results[Memo.key(t["config"])] = {"validation": {"accuracy": t["accuracy"]}, "wall_s": t["wall_s"],
                                               "trainable_params": t["params_trained"]}
    search = Search(settings_for(args.data, task, "tpe", 0, 0, train_seed=args.train_seed), evaluate=memo)
    search.prepare()
    grid = SPACE.log10_rates()
    rates = grid[-args.rates:]
    landscape, trained_here = train_landscape(search, folder, memo, rates)
    feasible = {cost_only(p) for p in SPACE.points() if search._price(p) is not None}
    points = {k: (v["trainable_params"], v["accuracy"]) for k, v in landscape.items()}
    keys = list(points)
    front = sorted((keys[i] for i in pareto_front([(c, -a) for c, a in points.values()])), key=lambda k: points[k][0])
    below = [t for trials in trained.values() for t in trials if t["params"].get("log10_lr", grid[-1]) < rates[0] - 1e-9]
    validation_rows = int(search.data.validation["input_ids"].shape[0])
    rows_scored = min(search.s.search_eval_rows or validation_rows, validation_rows)
    rng = random.Random(0)
    rows = [judge(name, trials, landscape, feasible, task["trials"], grid, rows_scored, rng) for name, trials in trained.items()]
    results = {"data": args.data, "train_seed": args.train_seed, "budget": BUDGET, "trials": task["trials"], "fidelity": search.rungs()[0].label(search.s.base),
               "rates": [10 ** r for r in rates], "validation_rows": rows_scored, "feasible_points": len(feasible),
               "landscape": sorted(landscape.values(), key=lambda v: (v["trainable_params"], -v["accuracy"])),
               "front": [landscape[k]["name"] for k in front], "rows": rows,
               "below": {"runs": len(below), "best_accuracy": max((t["accuracy"] for t in below), default=None)},
               "trained_here": len(trained_here), "trained_here_s": sum(memo.results[k]["wall_s"] for k in trained_here),
               "elapsed_s": time.perf_counter() - started, "simulations": SIMULATIONS,
               "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment()}
    name = (f"search-landscape-{args.data}" + (f"-train-seed{args.train_seed}" if args.train_seed else "")
            + ("-quick" if args.quick else ""))
    atomic_write_bytes(target / f"{name}.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(target / f"{name}.md", render(results).encode())
    print(f"wrote {target / name}.md and .json")


def render(r: dict) -> str:
    names = {v["name"]: v for v in r["landscape"]}
    lines = [f"# Search landscape: {r['data']}, every configuration inside {r['budget']} at the search fidelity", "",
             f"Produced by `bench/search_landscape.py` on {r['environment']['cpu']} ({r['environment']['threads']} threads, "
             f"torch {r['environment']['torch']}), {r['measured']}, elapsed {r['elapsed_s']:.0f} s (the runs trained here "
             f"took {r['trained_here_s']:.0f} s, in this run or an earlier one kept in runs.json). Fidelity: "
             f"{r['fidelity']}. The {r['feasible_points']} configurations inside the budget at the rates "
             f"{', '.join(f'{x:g}' for x in r['rates'])}: {len(r['landscape'])} runs, {r['trained_here']} trained here, "
             f"the others reused from the search bench's studies. Training seed {r.get('train_seed', 0)}. "
             + (f"Lower rates are not trained: the studies' {r['below']['runs']} runs at them reached at most "
                f"{r['below']['best_accuracy']:.3f} validation accuracy. " if r["below"]["runs"] else
                "Lower rates are not trained (no study ran at them). ")
             + "They are counted as dominated, so where that comes near the front's cheap end the chances below are "
             "lower bounds.", "",
             "## The true front", "", "| configuration | trainable parameters | validation accuracy |", "|---|---|---|"]
    lines += [f"| {n} | {names[n]['trainable_params']} | {names[n]['accuracy']:.3f} |" for n in r["front"]]
    lines += ["", f"## Each study against the landscape ({r['trials']} trials)", "",
              "Outside: configurations that no trained point of the study weakly dominates. Random search finds one: the "
              f"share of {r['simulations']} simulated random searches of {r['trials']} trials that draw at least one of "
              "them, i.e. whose front the study's front does not dominate.", "",
              "Beyond the error: outside even when each configuration's accuracy is lowered by its standard error "
              f"(binomial, on the {r['validation_rows']} validation rows scored), so what remains is outside by more "
              "than the noise of one score.", "",
              "| study | outside | random search finds one | outside beyond the error | random search finds one "
              "| configurations outside (beyond the error in bold) |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        beyond = set(row["outside_beyond_error"])
        shown = "; ".join((f"**{n}**" if n in beyond else n) + f" ({names[n]['accuracy']:.3f})" for n in row["outside"][:8])
        more = f"; and {len(row['outside']) - 8} more" if len(row["outside"]) > 8 else ""
        lines.append(f"| {row['study']} | {len(row['outside'])} | {row['random_finds_one']:.3f} | {len(beyond)} "
                     f"| {row['random_finds_one_beyond_error']:.3f} | {shown}{more} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
