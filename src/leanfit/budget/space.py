"""The search space: method x target layers x rank x learning rate, as `leanfit tune` configurations.

A point of the space is a dict of Optuna parameters (`method`, `train_layers`, `targets`, `rank`
when the method has one, `log10_lr`); `SearchSpace.config` turns it into a `TuneConfig` on top of
the user's base configuration (model, data, epochs, ...), so a trial trains exactly what
`leanfit tune --config` would. Learning rates lie on a grid of `lr_steps_per_decade` points per
decade, so the space is finite: a configuration proposed twice is trained once (search.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ..errors import ConfigError, check_known
from ..methods import method_names, module_class

# Named target sets. Regular expressions are matched against full layer names and cover BERT
# (`attention.self.query`, `attention.output.dense`) and Llama (`self_attn.q_proj`) style names.
TARGET_SETS = {
    "all-linear": "all-linear",
    "attention": r"(?:.*\.)?(?:attention|self_attn|attn)\..*",
    "query-value": r".*\.(?:query|value|q_proj|v_proj)",
}
# Methods whose capacity knob is not called `rank`; the values map the searched rank onto it.
RANK_OPTION = {"bottleneck": "size", "compacter": "size", "adalora": "target_rank", "increlora": "max_rank"}
DEFAULT_METHODS = ("lora", "ia3", "bottleneck", "ssf", "bitfit")


@dataclass(frozen=True)
class SearchSpace:
    """What the search may choose. `train_layers`: top-k block counts and/or "all"."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    train_layers: tuple = (1, 2, "all")
    targets: tuple[str, ...] = ("all-linear", "attention")
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    lr_min: float = 1e-4
    lr_max: float = 1e-2
    lr_steps_per_decade: int = 2

    def __post_init__(self) -> None:
        for name in ("methods", "train_layers", "targets", "ranks"):  # each choice once: a repeat counts twice
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        known = method_names()
        for name in self.methods:
            if name not in known:
                raise ConfigError(f"Unknown method '{name}' in the search space; choose from {', '.join(known)}.")
        for name in self.targets:
            if name not in TARGET_SETS:
                raise ConfigError(f"Unknown target set '{name}'; choose from {', '.join(TARGET_SETS)}.")
        for k in self.train_layers:
            if k != "all" and not (isinstance(k, int) and k >= 1):
                raise ConfigError(f"train_layers choices are block counts >= 1 or 'all', got {k!r}.")
        if not (self.methods and self.train_layers and self.targets and self.ranks):
            raise ConfigError("The search space needs at least one method, train_layers, target set and rank.")
        if any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise ConfigError(f"Ranks must be whole numbers >= 1, got {list(self.ranks)}.")
        if not 0 < self.lr_min <= self.lr_max < math.inf or self.lr_steps_per_decade < 1:
            raise ConfigError(f"The learning-rate range {self.lr_min:g}..{self.lr_max:g} is empty; "
                              "give a positive minimum no larger than a finite maximum.")

    # --- the grid of learning rates ---------------------------------------------------------------
    def lr_grid(self) -> tuple[float, float, float]:
        """log10 of the lowest and the highest learning rate of the grid, and the step between them."""
        step = 1 / self.lr_steps_per_decade
        low = math.log10(self.lr_min)
        points = math.floor((math.log10(self.lr_max) - low) / step + 1e-9)
        return round(low, 6), round(low + points * step, 6), step

    def log10_rates(self) -> list[float]:
        """log10 of every learning rate of the grid, lowest first (the values `suggest` draws)."""
        low, high, step = self.lr_grid()
        return [round(low + i * step, 6) for i in range(round((high - low) / step) + 1)]

    def learning_rates(self) -> list[float]:
        return [_lr(r) for r in self.log10_rates()]

    # --- Optuna -------------------------------------------------------------------------------------
    def suggest(self, trial) -> dict:
        """Draw one point with `trial` (an optuna.Trial); returns its parameters."""
        method = trial.suggest_categorical("method", list(self.methods))
        params = {"method": method,
                  "train_layers": trial.suggest_categorical("train_layers", list(self.train_layers)),
                  "targets": trial.suggest_categorical("targets", list(self.targets))}
        if rank_option(method):
            params["rank"] = trial.suggest_categorical("rank", list(self.ranks))
        low, high, step = self.lr_grid()
        if high > low:  # a single rate is not a parameter (Optuna refuses an empty range with a step)
            params["log10_lr"] = trial.suggest_float("log10_lr", low, high, step=step)
        return params

    def config(self, params: dict, base):
        """The `TuneConfig` (leanfit.tune) of a point, on top of `base` (model, data, epochs ...)."""
        method = params["method"]
        return replace(base, method=method, options=method_rank_options(method, params.get("rank")),
                       targets=TARGET_SETS[params["targets"]], train_layers=params["train_layers"],
                       lr=_lr(params.get("log10_lr", self.lr_grid()[0])))

    def points(self) -> list[dict]:
        """Every point with the lowest learning rate (what costs depend on: all but the rate)."""
        low = self.lr_grid()[0]
        found = []
        for method in self.methods:
            for layers in self.train_layers:
                for targets in self.targets:
                    for rank in (self.ranks if rank_option(method) else (None,)):
                        point = {"method": method, "train_layers": layers, "targets": targets}
                        if rank is not None:
                            point["rank"] = rank
                        found.append({**point, "log10_lr": low})
        return found

    def size(self) -> int:
        return len(self.points()) * len(self.learning_rates())

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "SearchSpace":
        check_known(data, (f.name for f in fields(cls)), "search-space option")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def rank_option(method: str) -> str | None:
    """The option a searched rank sets for `method`, or None for methods without a capacity knob."""
    if method in RANK_OPTION:
        return RANK_OPTION[method]
    names = {f.name for f in fields(module_class(method).config_class)}
    return "rank" if "rank" in names else None


def method_rank_options(method: str, rank: int | None) -> dict:
    """Method options for a searched rank. LoRA-like scales keep the method's default alpha / rank
    ratio (LoRA: 16 / 8 = 2, `leanfit tune`'s default), so changing the rank does not change the scale."""
    option = rank_option(method)
    if option is None or rank is None:
        return {}
    defaults = module_class(method).config_class()
    options = {option: rank}
    if option == "rank" and hasattr(defaults, "alpha"):
        options["alpha"] = float(defaults.alpha) * rank / defaults.rank
    if method == "adalora":  # starts above its target rank and prunes down to it
        options["init_rank"] = max(rank, math.ceil(1.5 * rank))
    if method == "increlora":  # grows from rank 1 towards max_rank, aiming at half of it on average
        options["target_rank"] = max(1, rank // 2)
    return options


def describe(params: dict, lr: bool = True) -> str:
    """A short human name of a point: 'lora r=8, all-linear, top 2 blocks, lr 0.001'."""
    rank = f" r={params['rank']}" if params.get("rank") is not None else ""
    layers = "every block" if params["train_layers"] == "all" else f"top {params['train_layers']}"
    rate = f", lr {_lr(params['log10_lr']):.3g}" if lr and "log10_lr" in params else ""
    return f"{params['method']}{rank}, {params['targets']}, {layers}{rate}"


def _lr(log10_lr: float) -> float:
    return float(f"{10 ** log10_lr:.3g}")
