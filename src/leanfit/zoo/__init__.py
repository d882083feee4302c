"""Real models and data sets that ship inside registry packages; used by the CLI, examples, benchmarks."""

from leanfit.zoo.datasets import DATASETS, dataset
from leanfit.zoo.models import MODELS, model

__all__ = ["DATASETS", "MODELS", "dataset", "model"]
