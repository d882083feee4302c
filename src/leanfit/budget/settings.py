"""What a search is asked to do: the full run, space, budget, objectives, fidelity ladder, storage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import ConfigError
from .budget import Budget
from .space import SearchSpace

COST_OBJECTIVES = {"params": "trainable_params", "bytes": "adapter_bytes", "memory": "train_peak_bytes",
                   "latency": "inference_latency_ratio", "time": "train_seconds"}
OBJECTIVES = ("accuracy", *COST_OBJECTIVES)


@dataclass(frozen=True)
class Fidelity:
    """How much of the run a trial trains: rows of the training split, epochs, sequence length."""

    rows: int | None  # None: every training row
    epochs: int
    max_length: int | None = None  # None: the run's
    eval_rows: int | None = None  # None: the run's max_eval_rows (validation and test are cut alike)

    def apply(self, config):
        return replace(config, max_train_rows=self.rows, epochs=self.epochs,
                       max_length=self.max_length or config.max_length,
                       max_eval_rows=self.eval_rows or config.max_eval_rows)

    def label(self, config) -> str:
        rows = "all rows" if self.rows is None else f"{self.rows} rows"
        label = f"{rows}, {self.epochs} epoch{'s' * (self.epochs != 1)}, {self.max_length or config.max_length} tokens"
        return label + (f", first {self.eval_rows} validation rows" if self.eval_rows else "")

    def key(self) -> str:
        key = f"rows={self.rows or 'all'},epochs={self.epochs},len={self.max_length or 'run'}"
        return key + (f",eval={self.eval_rows}" if self.eval_rows else "")


@dataclass
class SearchSettings:
    base: object  # TuneConfig of the full run: model, data, epochs, batch size, sequence length, seed
    space: SearchSpace = field(default_factory=SearchSpace)
    budget: Budget = field(default_factory=Budget)
    trials: int = 20
    objectives: tuple[str, ...] = ("accuracy", "params")
    sampler: str = "tpe"
    startup_trials: int | None = None
    # TPE and NSGA-II first train points spread over the cost range (search.py); random search never
    initial_design: bool = True
    seed: int = 0  # of the sampler; training uses base.seed
    search_rows: int | None = 256
    search_epochs: int = 1
    search_max_length: int | None = None
    search_eval_rows: int | None = None
    eta: int = 3
    finalists: int = 2
    output: str = "out/search"
    storage: str | None = None  # default: sqlite:///<output>/study.db
    study_name: str = "search"
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if (unknown or not self.objectives or self.objectives[0] != "accuracy"
                or len(set(self.objectives)) < len(self.objectives)):
            raise ConfigError(f"Objectives must start with accuracy, then any of {', '.join(COST_OBJECTIVES)}, each "
                              f"once; got {','.join(self.objectives)}.")
        checks = [(self.trials >= 1, "--trials must be at least 1"), (self.eta >= 2, "--eta must be at least 2"),
                  (self.finalists >= 0, "--finalists must not be negative"),
                  (self.search_epochs >= 1, "--search-epochs must be at least 1"),
                  (self.search_rows is None or self.search_rows >= 1, "--max-train-rows must be at least 1"),
                  (self.search_max_length is None or self.search_max_length >= 2, "--search-max-length must be at least 2"),
                  (self.search_eval_rows is None or self.search_eval_rows >= 1, "--search-eval-rows must be at least 1")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}; fix the option and run again.")

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.output).resolve() / 'study.db'}"

    def fingerprint(self) -> dict:
        """What must match for a process to join or resume a study."""
        base = {k: v for k, v in asdict(self.base).items() if k not in ("output", "progress", "resume")}
        return {"base": base, "space": self.space.as_dict(), "budget": self.budget.text,
                "objectives": list(self.objectives), "sampler": self.sampler,
                "initial_design": self.initial_design, "fidelity": self.first_fidelity().key()}

    def first_fidelity(self, train_rows: int | None = None) -> Fidelity:
        rows = self.search_rows if train_rows is None or self.search_rows is None else min(self.search_rows, train_rows)
        return Fidelity(rows, self.search_epochs, self.search_max_length, self.search_eval_rows)
