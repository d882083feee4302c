"""`leanfit search`: find the most accurate adapter configuration inside a budget (search.py).

    leanfit search --budget params=1%,latency=+10% --trials 30 --model minilm --data bbc-news
    leanfit search ... --storage postgresql://host/db --study-name bbc   # more workers: run it again, anywhere

Imports nothing heavy until the command runs.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def add_commands(subparsers) -> dict:
    p = subparsers.add_parser("search", help="search method x layers x rank x learning rate under a budget")
    p.add_argument("--budget", default="", help="limits, e.g. params=1%%,latency=+10%%,memory=2GB,bytes=5MB,time=10m")
    p.add_argument("--trials", type=int, default=20,
                   help="configurations trained at the search fidelity, over all workers (proposals over the "
                        "budget or repeating a trained point do not count)")
    p.add_argument("--objectives", default="accuracy,params",
                   help="accuracy, then any of params, bytes, memory, latency, time (default accuracy,params)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "gp", "random"],
                   help="Optuna's TPE, NSGA-II or Gaussian process (gp) sampler: proposes the trials that the initial "
                        "design and the model's steps leave: all of them with "
                        "--no-initial-design, those after the design for accuracy alone, none until every configuration "
                        "inside the budget is tried otherwise; random: plain random search (default tpe)")
    p.add_argument("--sampler-seed", dest="sampler_seed", type=int, default=0)
    p.add_argument("--startup-trials", dest="startup_trials", type=int,
                   help="random trials before TPE or gp models")
    p.add_argument("--no-initial-design", dest="initial_design", action="store_false",
                   help="do not start from configurations spread over the cost range (at the top learning rate), "
                        "nor take the model's steps after them: the sampler proposes every trial")
    run = p.add_argument_group("the run each configuration becomes (as for `leanfit tune`)")
    run.add_argument("--config", help="JSON file of tune options for the full run (model, data, epochs ...)")
    run.add_argument("--model", help="zoo name (minilm, smollm2-135m) or a local Hugging Face model folder")
    run.add_argument("--data", help="zoo name (bbc-news, tweets-sentiment, austen) or a CSV / JSON Lines path")
    run.add_argument("--task", choices=["classification", "causal-lm"], help="task of your own data")
    run.add_argument("--text-column", dest="text_column")
    run.add_argument("--label-column", dest="label_column")
    run.add_argument("--epochs", type=int, help="epochs of the full run (the last rung)")
    run.add_argument("--batch-size", dest="batch_size", type=int)
    run.add_argument("--max-length", dest="max_length", type=int)
    run.add_argument("--max-eval-rows", dest="max_eval_rows", type=int, help="validate on the first N rows")
    run.add_argument("--seed", type=int, help="training seed (data split, initialisation)")
    space = p.add_argument_group("search space")
    space.add_argument("--methods", help="comma-separated methods (default lora,ia3,bottleneck,ssf,bitfit)")
    space.add_argument("--train-layers", dest="train_layers", help="top-k block counts and/or all (default 1,2,all)")
    space.add_argument("--targets", help="target sets: all-linear, attention, query-value (default all-linear,attention)")
    space.add_argument("--ranks", help="ranks of methods that have one (default 2,4,8,16)")
    space.add_argument("--lr-range", dest="lr_range",
                       help="MIN:MAX learning rates, two points per decade (default 1e-4:1e-2); TPE and NSGA-II "
                            "compare configurations at MAX, then step the full run's best down the grid")
    fidelity = p.add_argument_group("fidelity (cheap first, the promising ones in full)")
    fidelity.add_argument("--max-train-rows", dest="search_rows", default="256",
                          help="training rows of each search trial (default 256; 'all' for every row)")
    fidelity.add_argument("--search-epochs", dest="search_epochs", type=int, default=1)
    fidelity.add_argument("--search-max-length", dest="search_max_length", type=int,
                          help="sequence length of search trials (default: the run's)")
    fidelity.add_argument("--search-eval-rows", dest="search_eval_rows", type=int,
                          help="validate search trials on the first N validation rows (default: the run's)")
    fidelity.add_argument("--eta", type=int, default=3, help="successive halving: keep 1/eta per rung, eta x the rows")
    fidelity.add_argument("--finalists", type=int, default=2, help="configurations trained in full (0: none)")
    out = p.add_argument_group("output and workers")
    out.add_argument("--output", "-o", help="folder of the study, trials and report (default out/search-DATA)")
    out.add_argument("--storage", help="Optuna storage URL shared by workers (default sqlite:///OUTPUT/study.db)")
    out.add_argument("--study-name", dest="study_name", default="search")
    out.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    return {"search": _search}


def settings_from_args(args):
    from .budget import parse_budget
    from .search import SearchSettings
    from .space import SearchSpace
    base = _base_config(args)
    space_options = {}
    if args.methods is not None:
        space_options["methods"] = _space_list(args.methods, "--methods")
    if args.train_layers is not None:
        space_options["train_layers"] = tuple("all" if v == "all" else _int(v, "--train-layers")
                                              for v in _space_list(args.train_layers, "--train-layers"))
    if args.targets is not None:
        space_options["targets"] = _space_list(args.targets, "--targets")
    if args.ranks is not None:
        space_options["ranks"] = tuple(_int(v, "--ranks") for v in _space_list(args.ranks, "--ranks"))
    if args.lr_range:
        low, _, high = args.lr_range.partition(":")
        try:
            space_options.update(lr_min=float(low), lr_max=float(high or low))
        except ValueError:
            raise ConfigError(f"--lr-range {args.lr_range} is not MIN:MAX; write e.g. --lr-range 1e-4:1e-2.") from None
    rows = None if args.search_rows == "all" else _int(args.search_rows, "--max-train-rows")
    return SearchSettings(
        base=base, space=SearchSpace(**space_options), budget=parse_budget(args.budget), trials=args.trials,
        objectives=tuple(_items(args.objectives)), sampler=args.sampler, startup_trials=args.startup_trials,
        initial_design=args.initial_design,
        seed=args.sampler_seed, search_rows=rows, search_epochs=args.search_epochs,
        search_max_length=args.search_max_length, search_eval_rows=args.search_eval_rows, eta=args.eta, finalists=args.finalists,
        output=args.output or f"out/search-{Path(str(base.data)).stem}", storage=args.storage,
        study_name=args.study_name, progress=args.progress)


def _base_config(args):
    from ..tune import TuneConfig
    from ..tune_options import override, read_config_file
    return override(TuneConfig.from_dict(read_config_file(args.config)), args, (
        "model", "data", "task", "text_column", "label_column", "epochs", "batch_size", "max_length",
        "max_eval_rows", "seed")).check()


def _space_list(text: str, option: str) -> tuple[str, ...]:
    """A search-space list (SearchSpace keeps each item once); an empty one is refused, not read as the
    default."""
    items = tuple(_items(text))
    if not items:
        raise ConfigError(f"{option} lists nothing; give one or more values separated by commas, or leave it out.")
    return items


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option} takes whole numbers, got '{text}'.") from None


def _other_study(settings) -> str | None:
    """The name of another search study whose trials and report lie in the output folder, if any."""
    import json
    from .study import RATES_SUFFIX
    output = Path(settings.output)
    names = []
    try:
        names.append(json.loads((output / "search.json").read_text())["settings"]["study_name"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no finished search here (or an unreadable one): the study database says
    if (output / "study.db").is_file() and settings.storage is None:
        import optuna
        names += optuna.study.get_all_study_names(storage=settings.storage_url())
    main = [n for n in names if "/rung" not in n and not n.endswith(RATES_SUFFIX)]
    return next((n for n in main if n != settings.study_name), None)


def _search(args) -> int:
    from ..run_folder import earlier_run
    from .search import search
    settings = settings_from_args(args)
    tuned = [name for name in earlier_run(settings.output) if name != "report.md"]  # a search's own report.md is its
    if tuned:
        raise ConfigError(f"The output folder '{settings.output}' holds a `leanfit tune` run ({', '.join(tuned)}), "
                          "whose report the search would replace; pass another --output.")
    other = _other_study(settings)
    if other:
        raise ConfigError(f"The output folder '{settings.output}' holds the search study '{other}', whose trials and "
                          f"report study '{settings.study_name}' would replace; pass another --output, or "
                          f"--study-name {other} to resume it.")
    result = search(settings)
    output = Path(settings.output)
    n = result.counts
    print(f"{n['trials']} trials ({n['trained']} trained, {n['over budget']} over budget, {n['duplicate']} repeated); "
          f"Pareto front of {len(result.front)} configurations in {output / 'front.csv'}")
    if result.best is None:
        print("no configuration inside the budget finished training")
        return 0
    b = result.best
    print(f"best inside the budget: {b['name']}: validation {result.metric} {b['score']:.4f} "
          f"({result.rungs[b['rung']]['fidelity']}), {b['cost']['trainable_params']:,} trainable parameters "
          f"({100 * b['cost']['trainable_share']:.3f}%)")
    print(f"retrain it: leanfit tune --config {output / 'best.json'}; report: {output / 'report.md'}")
    return 0
