"""Text and image data: the user's files, deterministic splits, and tokenisation into tensors."""

from leanfit.data.encode import encode
from leanfit.data.files import from_files
from leanfit.data.images import ImageDataset, ImageProcessor
from leanfit.data.split import drop_duplicates, split_rows, to_passages
from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, IMAGE_CLASSIFICATION, TASKS, TensorSplits, TextDataset

__all__ = [
    "CAUSAL_LM",
    "CLASSIFICATION",
    "IMAGE_CLASSIFICATION",
    "ImageDataset",
    "ImageProcessor",
    "TASKS",
    "TensorSplits",
    "TextDataset",
    "drop_duplicates",
    "encode",
    "from_files",
    "split_rows",
    "to_passages",
]
