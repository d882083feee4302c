"""Live progress of a search: a rich bar per rung (trials trained in the study, by every worker, and
the best validation score so far) and one line per trial, on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .study import counts


class SearchProgress:
    def __init__(self, enabled: bool, metric: str):
        self.console = Console(stderr=True)
        self.enabled, self.metric = enabled, metric
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}"), TimeElapsedColumn(),
            console=self.console, disable=not (enabled and self.console.is_terminal),
        )
        self._task = None
        self._best = None

    def __enter__(self) -> "SearchProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def start_rung(self, index: int, label: str, total: int, study) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._best = None
        self._task = self._progress.add_task(f"rung {index} ({label})", total=total, best="-")
        self._refresh(study)

    def on_trial(self, study, trial) -> None:
        """Optuna callback after each trial of this worker."""
        self._refresh(study)
        if not self.enabled:
            return
        status = trial.user_attrs.get("status", trial.state.name.lower())
        score = f"{self.metric} {trial.values[0]:.4f}" if trial.values else status
        if status == "duplicate":
            score += f" (same as trial {trial.user_attrs.get('same_as')})"
        share = trial.user_attrs.get("cost", {}).get("trainable_share")
        params = f", {100 * share:.3f}% params" if share is not None else ""
        self._progress.console.print(f"trial {trial.number}: {trial.user_attrs.get('name', '?')}{params} -> {score}")

    def _refresh(self, study) -> None:
        state = counts(study)
        for trial in study.get_trials(deepcopy=False, states=None):
            if trial.values and (self._best is None or _better(study, trial.values[0], self._best)):
                self._best = trial.values[0]
        self._progress.update(self._task, completed=state["trained"],
                              best="-" if self._best is None else f"{self._best:.4f}")


def _better(study, value: float, best: float) -> bool:
    return value > best if study.directions[0].name == "MAXIMIZE" else value < best
