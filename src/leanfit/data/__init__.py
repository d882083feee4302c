"""Text data: the user's files, deterministic splits, and tokenisation into tensors."""

from leanfit.data.encode import encode
from leanfit.data.files import from_files
from leanfit.data.split import drop_duplicates, split_rows, to_passages
from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, TASKS, TensorSplits, TextDataset

__all__ = [
    "CAUSAL_LM",
    "CLASSIFICATION",
    "TASKS",
    "TensorSplits",
    "TextDataset",
    "drop_duplicates",
    "encode",
    "from_files",
    "split_rows",
    "to_passages",
]
