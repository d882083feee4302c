"""A rich progress bar for the training loop: epoch, step, loss, learning rate.

It draws on stderr, and only when stderr is a terminal and the user asked for it, so logs, pipes and
tests stay clean and stdout stays free for machine-readable output.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Context manager: `with TrainProgress(total, start) as bar: bar.update(step, epoch, loss, lr)`."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, epochs: int = 1):
        console = Console(stderr=True)
        self.enabled = enabled and console.is_terminal
        self.epochs = epochs
        self._progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.enabled,
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=start_step,
            epoch=1, epochs=epochs, loss="-", lr="-",
        )

    def __enter__(self) -> "TrainProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, step: int, epoch: int, loss: float | None, lr: float) -> None:
        """Show the state after optimizer step `step` (1-based) in epoch `epoch` (0-based)."""
        self._progress.update(
            self._task, completed=step, epoch=epoch + 1,
            loss="-" if loss is None else f"{loss:.4f}", lr=f"{lr:.2e}",
        )
