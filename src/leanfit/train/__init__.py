"""Training: the loop (`Trainer`), its options (`TrainConfig`) and what a run returns (`FitResult`)."""

from leanfit.train.trainer import FitResult, TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "FitResult"]
