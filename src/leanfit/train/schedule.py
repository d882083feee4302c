"""Learning-rate schedules: linear warmup, then linear or cosine decay, or a constant rate.

The formulas follow Hugging Face `transformers` (`get_linear_schedule_with_warmup` and friends), so a
run here and a run there with the same settings see the same learning rates. Each schedule is a plain
function of the optimizer step, wrapped in `torch.optim.lr_scheduler.LambdaLR` so its state is a step
count that checkpoints can save and restore.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from leanfit.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Number of warmup steps: a fraction of the run, rounded up (as Hugging Face does)."""
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The factor applied to the base learning rate at optimizer step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}.")
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / decay_steps
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return multiplier


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` over `optimizer` for a run of `total_steps` optimizer steps."""
    warmup = warmup_steps_for(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, total_steps, warmup))
