"""Replay `leanfit search`'s first rung on a recorded landscape: the search code runs as it is, but each
trial's training is looked up in `docs/benchmarks/search-landscape-<data>.json` (every configuration inside
the budget trained at the search fidelity, bench/search_landscape.py) instead of run. Training is seeded, so
the lookup is the run the trial would have made. A change to the search's rules can then be judged on
every seed in seconds, against the whole landscape rather than five random searches.

Per sampler seed it prints the study's front, the configurations outside it (no trained point is as cheap
and as accurate), the chance that a random search of as many trials draws one of them (its front then is
not dominated; search_landscape.miss_chance), and the hypervolume as bench/search.py measures it.

    .venv/bin/python bench/search_replay.py --data bbc-news --seeds 0-4 --write
    .venv/bin/python bench/search_replay.py --data tweets-sentiment --trials 20 --write
    .venv/bin/python bench/search_replay.py --landscape docs/benchmarks/search-landscape-bbc-news-train-seed1.json --write

--write keeps each (landscape, trials) replay in docs/benchmarks/search-replay.json and renders all of them
to search-replay.md.

Only the top rates the landscape holds can be looked up; the first rung of TPE and NSGA-II trains only
the top rate (Search.fixed_rate), so that is enough for them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import BUDGET, OUT, SPACE, TASKS, environment, settings_for  # noqa: E402
from search_landscape import SIMULATIONS, cost_only, key_of, miss_chance, weakly_dominated  # noqa: E402

from leanfit.budget.budget import parse_budget  # noqa: E402
from leanfit.budget.pareto import hypervolume_2d  # noqa: E402
from leanfit.budget.search import Search  # noqa: E402
from leanfit.budget.space import TARGET_SETS, rank_option  # noqa: E402
from leanfit.errors import LeanfitError  # noqa: E402
from leanfit.io import atomic_write_bytes  # noqa: E402


class Lookup:
    """An `evaluate` for Search: the landscape's recorded run of the trial's configuration."""

    def __init__(self, landscape: list[dict]):
        self.runs = {key_of(entry["params"]): entry for entry in landscape}
        self.targets = {pattern: name for name, pattern in TARGET_SETS.items()}

    def point(self, config) -> dict:
        point = {"method": config.method, "train_layers": config.train_layers, "targets": self.targets[config.targets],
                 "log10_lr": round(math.log10(config.lr), 6)}
        option = rank_option(config.method)
        if option is not None:
            point["rank"] = config.options[option]
        return point

    def __call__(self, config) -> dict:
        point = self.point(config)
        entry = self.runs.get(key_of(point)) or next(
            (e for k, e in self.runs.items() if cost_only(e["params"]) == cost_only(point)
             and abs(e["params"]["log10_lr"] - point["log10_lr"]) < 1e-3), None)
        if entry is None:
            raise LeanfitError(f"The landscape has no run of {point}; replay only samplers held at its rates.")
        return {"validation": {"accuracy": entry["accuracy"]}, "wall_s": 0.0,
                "trainable_params": entry["trainable_params"], "output": config.output}


def replay(data: str, seed: int, trials: int, lookup: Lookup, prices: dict, folder: Path,
           sampler: str = "tpe", rule: str = "leanfit") -> list[dict]:
    """One study of the bench's settings, replayed; its trained trials as landscape entries. `rule`:
    leanfit's search as it is (design, the model's steps, `sampler` for what they leave), "design":
    the design and then `sampler` for every other trial, "sampler": `sampler` alone."""
    task = {**TASKS[data], "precision": "auto", "trials": trials}
    settings = replace(settings_for(data, task, sampler, seed, finalists=0), output=str(folder / f"{sampler}-{rule}-seed{seed}"),
                       progress=False, initial_design=rule != "sampler")
    search = Search(settings, evaluate=lookup, prices=prices)
    if rule == "design":  # an ablation only the bench makes: after the design the sampler proposes, not the model
        search.model_steps = lambda: False
    search.run()
    study = optuna.load_study(study_name=settings.study_name, storage=settings.storage_url())
    found = []
    for trial in study.trials:
        if trial.user_attrs.get("status") == "trained":
            entry = lookup.runs[key_of(trial.params)]
            found.append({**entry, "proposed_by": trial.user_attrs.get("proposed_by", "sampler")})
    return found


def judge(trained: list[dict], landscape: list[dict], feasible: set, trials: int, grid: list[float],
          budget_params: float, rng: random.Random) -> dict:
    own = [(t["trainable_params"], t["accuracy"]) for t in trained]
    outside = [e for e in landscape if not weakly_dominated((e["trainable_params"], e["accuracy"]), own)]
    points = [(c / budget_params, -a) for c, a in own]
    return {"outside": [e["name"] for e in outside], "hypervolume": hypervolume_2d(points, (1.0, 0.0)),
            "random_finds_one": miss_chance({key_of(e["params"]) for e in outside}, feasible, trials, grid, rng)}


RULES = {"leanfit": "leanfit's search", "design": "leanfit's design, then Optuna's {sampler}",
         "sampler": "Optuna's {sampler} alone"}
SAMPLER_NAMES = {"tpe": "TPESampler", "nsga2": "NSGAIISampler", "gp": "GPSampler"}


def reference_label(sampler: str, rule: str) -> str | None:
    """How a reference replay is named (None for leanfit's search as it is, TPE for what it leaves)."""
    if rule == "leanfit" and sampler == "tpe":
        return None
    return RULES[rule].format(sampler=SAMPLER_NAMES[sampler]) + (f" (leftovers: {sampler})" if rule == "leanfit" else "")


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bbc-news", choices=list(TASKS))
    parser.add_argument("--trials", type=int, help="trials per study (default: the landscape's)")
    parser.add_argument("--seeds", default="0-4", help="sampler seeds: 0-9 or 0,3,7 (default 0-4)")
    parser.add_argument("--landscape", help="the landscape's JSON (default docs/benchmarks/search-landscape-DATA.json)")
    parser.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "gp"],
                        help="Optuna's sampler: what leanfit's design and model leave, or all with --rule (default tpe)")
    parser.add_argument("--rule", default="leanfit", choices=list(RULES),
                        help="leanfit: the search as it is; design: the design, then the sampler; sampler: the sampler "
                             "alone (references for the search, kept beside it)")
    parser.add_argument("--write", action="store_true", help="keep the figures in docs/benchmarks/search-replay.json/.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    source = Path(args.landscape or OUT / f"search-landscape-{args.data}.json")
    recorded = json.loads(source.read_text())
    args.data = recorded["data"]
    trials = args.trials or recorded["trials"]
    landscape, lookup, prices = recorded["landscape"], Lookup(recorded["landscape"]), {}
    grid, feasible = SPACE.log10_rates(), {cost_only(e["params"]) for e in landscape}
    budget_params = None
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in parse_seeds(args.seeds):
            trained = replay(args.data, seed, trials, lookup, prices, Path(tmp), args.sampler, args.rule)
            if budget_params is None:  # the budget in parameters: the share limit times the model's parameters
                any_cost = next(iter(prices.values()))
                budget_params = parse_budget(BUDGET).limits[0].value * any_cost.total_params
            row = {"seed": seed, "trained": len(trained), **judge(trained, landscape, feasible, trials, grid,
                                                                  budget_params, random.Random(seed)),
                   "trials": [f"{t['proposed_by']}: {t['name']} ({t['accuracy']:.3f})" for t in trained]}
            rows.append(row)
            print(f"seed {seed}: trained {row['trained']}, outside {len(row['outside'])}, random finds one "
                  f"{row['random_finds_one']:.3f}, hypervolume {row['hypervolume']:.4f}", flush=True)
            print("   outside: " + "; ".join(row["outside"]), flush=True)
    chances = [r["random_finds_one"] for r in rows]
    label = reference_label(args.sampler, args.rule)
    print(f"{args.data}, {trials} trials, {label or 'leanfit'}: random search finds a point outside in {statistics.mean(chances):.3f} of runs "
          f"on average (max {max(chances):.3f}); hypervolume {statistics.mean(r['hypervolume'] for r in rows):.4f}; "
          f"{time.perf_counter() - started:.0f} s")
    if args.write:
        path = OUT / "search-replay.json"
        kept = json.loads(path.read_text()) if path.exists() else {"replays": {}}
        kept["replays"][f"{source.stem} @ {trials}" + (f" / {label}" if label else "")] = {
            "landscape": source.name, "reference": label, "data": args.data, "train_seed": recorded.get("train_seed", 0), "trials": trials,
            "landscape_front": recorded["front"], "rows": rows, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": commit()}
        kept["environment"] = environment()
        atomic_write_bytes(path, (json.dumps(kept, indent=2) + "\n").encode())
        atomic_write_bytes(OUT / "search-replay.md", render(kept).encode())
        print(f"wrote {OUT / 'search-replay'}.md and .json")


def references(replays: dict) -> list[str]:
    """A table of leanfit's search beside Optuna's samplers replayed on the same landscapes, where any were."""
    own = {(r["landscape"], r["trials"]): r for r in replays.values() if not r.get("reference")}
    labels = sorted({r["reference"] for r in replays.values() if r.get("reference")},
                    key=lambda label: (not label.startswith("leanfit"), label))  # the ablation first
    if not labels:
        return []

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        return (f"{statistics.mean(row['random_finds_one'] for row in r['rows']):.3f} "
                f"({statistics.mean(row['hypervolume'] for row in r['rows']):.4f})")

    lines = ["## Against Optuna's samplers", "",
             "The same replays with Optuna's samplers in place of the search's rules (`--sampler`, `--rule`): mean "
             "chance that random search's front is not dominated, mean hypervolume in brackets, over the same "
             "sampler seeds. Every study compares configurations at the top rate, as the search does; the samplers "
             "are made as `leanfit search --sampler` makes them (TPE multivariate and grouped, random for a third "
             "of the trials, at least 3; the GP random for half), and 'alone' is `--no-initial-design`. 'leanfit's "
             "design, then' is an ablation only this bench makes: the design as the search makes it, then the "
             "sampler in place of the model's steps.", "",
             "| landscape | trials | leanfit's search | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for (landscape, trials), r in own.items():
        found = {x["reference"]: x for x in replays.values()
                 if x.get("reference") and x["landscape"] == landscape and x["trials"] == trials}
        lines.append(f"| {landscape} | {trials} | {cell(r)} | " + " | ".join(cell(found.get(l)) for l in labels) + " |")
    return lines + [""]


def commit() -> str:
    import subprocess
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    return found.stdout.strip() + (" with uncommitted changes under src/" if dirty else "")


def render(kept: dict) -> str:
    lines = ["# Search replayed on the recorded landscapes", "",
             "Produced by `bench/search_replay.py`: `leanfit search`'s first rung (initial design, then the model's "
             "steps; TPE only where the model has nothing left) run as it is, with each trial's training looked up in "
             "a landscape recorded by `bench/search_landscape.py` (every configuration inside params=0.5% trained at "
             "the search fidelity; training is seeded, so the lookup is the run the trial would make). Outside: "
             "configurations of the landscape that no trained point of the study weakly dominates. Random search finds "
             f"one: the share of {SIMULATIONS} simulated random searches of as many trials (RandomSampler's draws over "
             "the whole space, every rate; over-budget and repeated draws do not count) that draw one of them, i.e. "
             "whose front the study's front does not dominate. Rates the landscape lacks count as dominated, so these "
             "chances are lower bounds where such runs come near the front's cheap end "
             "(search-landscape-*.md say how near).", ""]
    if kept.get("before"):  # the same replays of the rule this one replaced
        lines += [f"Before: {kept['before']['rule']}. Mean chance that random search's front is not dominated, and "
                  "mean hypervolume:", "", "| landscape | trials | before | now | hypervolume before | now |",
                  "|---|---|---|---|---|---|"]
        for name, r in kept["replays"].items():
            old = kept["before"]["replays"].get(name)
            if r.get("reference"):
                continue
            if old:
                lines.append(f"| {r['landscape']} | {r['trials']} | "
                             f"{statistics.mean(row['random_finds_one'] for row in old['rows']):.3f} | "
                             f"{statistics.mean(row['random_finds_one'] for row in r['rows']):.3f} | "
                             f"{statistics.mean(row['hypervolume'] for row in old['rows']):.4f} | "
                             f"{statistics.mean(row['hypervolume'] for row in r['rows']):.4f} |")
        lines.append("")
    lines += references(kept["replays"])
    for name, r in kept["replays"].items():
        if r.get("reference"):
            continue
        chances = [row["random_finds_one"] for row in r["rows"]]
        lines += [f"## {r['data']}, training seed {r['train_seed']}, {r['trials']} trials ({r['landscape']})", "",
                  f"Replayed {r['measured']} at commit {r['commit']}. Mean chance that random search's front is not "
                  f"dominated: **{statistics.mean(chances):.3f}** (highest {max(chances):.3f}).", "",
                  "| sampler seed | trained | hypervolume | outside | random search finds one | configurations outside |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {row['seed']} | {row['trained']} | {row['hypervolume']:.4f} | {len(row['outside'])} "
                  f"| {row['random_finds_one']:.3f} | {'; '.join(row['outside']) or '-'} |" for row in r["rows"]]
        lines += ["", "Trials of the first seed, in order: " + "; ".join(r["rows"][0]["trials"]) + ".", ""]
    if kept.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in kept["notes"]], ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
