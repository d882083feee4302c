"""The user's own data: CSV / TSV / JSON Lines / text files, split folders, or a saved `datasets` dataset.

Every problem a user can cause (missing file, empty file, missing column, unknown label in a
held-out split, unsupported format) is a `DataError` that names the file and the fix, because the
CLI shows only that sentence.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from leanfit.data.split import drop_duplicates, split_rows, text_key, to_passages
from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, TASKS, TextDataset
from leanfit.errors import ConfigError, DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt",)
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def from_files(
    path: str | Path, *, task: str = CLASSIFICATION, text: str = "text", label: str = "label", seed: int = 0
) -> TextDataset:
    """Load a dataset from a file or folder; missing validation/test splits are carved from train.

    `path` is one data file (split 20% test / 10% validation, stratified), a folder holding
    `train.<ext>` and optionally `validation.<ext>` / `test.<ext>`, or a folder written by
    `datasets.Dataset(Dict).save_to_disk`. Labels are the sorted unique strings of the train split.
    """
    if task not in TASKS:
        raise ConfigError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
    path = Path(path)
    if not path.exists():
        raise DataError(f"Data path {path} does not exist; pass a CSV/JSON Lines/text file or a folder of them.")
    if path.is_dir() and _is_saved_dataset(path):
        splits = _read_saved_dataset(path, task, text, label)
    elif path.is_dir():
        splits = {name: _read_file(file, task, text, label) for name, file in _split_files(path).items()}
    else:
        splits = {"train": _read_file(path, task, text, label)}
    return _assemble(path, splits, task, seed)


def _assemble(path: Path, splits: dict[str, list], task: str, seed: int) -> TextDataset:
    """Raw rows per split -> label ids, de-duplication and carving of the missing splits."""
    labels = None
    if task == CLASSIFICATION:
        labels = sorted({row[1] for row in splits["train"]}, key=label_order)
        if len(labels) < 2:  # a classifier of one class learns nothing and scores 100%
            raise DataError(f"The training data in {path} has a single label {labels[0]!r}; a classifier needs at "
                            "least two (check --label-column).")
        for name in ("validation", "test"):
            unknown = sorted({row[1] for row in splits.get(name, [])} - set(labels))
            if unknown:
                raise DataError(
                    f"The label set differs between splits in {path}: {name} has {unknown[:5]} that train "
                    "lacks; add training rows for those labels or drop them."
                )
        index = {name: i for i, name in enumerate(labels)}
        splits = {name: [(t, index[y]) for t, y in rows] for name, rows in splits.items()}
    dropped, leaked = {}, {}
    for name in list(splits):
        splits[name], dropped[name] = drop_duplicates(splits[name])
    train_keys = {text_key(_text(row)) for row in splits["train"]}
    for name in ("validation", "test"):  # a held-out text seen in training would flatter the scores
        if name in splits:
            kept = [row for row in splits[name] if text_key(_text(row)) not in train_keys]
            leaked[name], splits[name] = len(splits[name]) - len(kept), kept
    carved = [name for name in ("validation", "test") if name not in splits]
    if carved:
        train, validation, test = split_rows(
            splits["train"],
            seed=seed,
            test=0.2 if "test" in carved else 0.0,
            validation=0.1 if "validation" in carved else 0.0,
        )
        splits = {"train": train, "validation": splits.get("validation", validation), "test": splits.get("test", test)}
    dataset = TextDataset(
        name=path.stem if path.is_file() else path.name,
        task=task,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        labels=labels,
        info={
            "source": str(path),
            "seed": seed,
            "carved_from_train": carved,
            "duplicates_dropped": dropped,
            "dropped_as_in_train": leaked,
        },
    )
    dataset.info["sizes"] = dataset.sizes()
    return dataset


def label_order(label: str) -> tuple:
    """Sort key for label names: integers numerically ("2" before "10"), then strings."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def _text(row) -> str:
    return row if isinstance(row, str) else row[0]


def _split_files(folder: Path) -> dict[str, Path]:
    found = {}
    for split, stems in SPLIT_NAMES.items():
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.stem.lower() in stems and split not in found:
                found[split] = file
    if "train" not in found:
        raise DataError(
            f"Folder {folder} has no train file; name files train/validation/test with one of "
            f"{', '.join(TABLE_SUFFIXES + TEXT_SUFFIXES)} or pass a single file."
        )
    return found


def _read_file(file: Path, task: str, text: str, label: str) -> list:
    """One file -> classification (text, label string) rows, or causal-LM texts."""
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES and task == CAUSAL_LM:
        content = file.read_text(encoding="utf-8", errors="replace")
        if not content.strip():
            raise DataError(f"Data file {file} is empty; put text in it or remove it.")
        return to_passages(content)
    if suffix not in TABLE_SUFFIXES:
        kinds = TABLE_SUFFIXES + (TEXT_SUFFIXES if task == CAUSAL_LM else ())
        raise DataError(f"Data file {file} has an unsupported extension {suffix!r}; use one of {', '.join(kinds)}.")
    records = _read_records(file)
    if not records:
        raise DataError(f"Data file {file} is empty; add rows with a {text!r} column.")
    return _columns(records, file, task, text, label)


def _read_records(file: Path) -> list[dict]:
    try:
        return _parse_records(file)
    except UnicodeDecodeError as error:
        raise DataError(f"Data file {file} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                        f"{error.start}); save it as UTF-8.") from None


def _parse_records(file: Path) -> list[dict]:
    if file.suffix.lower() in (".csv", ".tsv"):
        with open(file, encoding="utf-8-sig", newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t" if file.suffix.lower() == ".tsv" else ","))
    content = file.read_text(encoding="utf-8-sig")
    if content.lstrip().startswith("["):  # a JSON array of records
        try:
            return json.loads(content)
        except json.JSONDecodeError as error:
            raise DataError(
                f"Data file {file} is not valid JSON (line {error.lineno}); fix it or write JSON Lines."
            ) from None
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        try:
            if line.strip():
                records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(
                f"Data file {file} is not valid JSON Lines (line {number}); write one JSON object per line."
            ) from None
    return records


def _columns(records: list[dict], file: Path, task: str, text: str, label: str) -> list:
    wanted = (text, label) if task == CLASSIFICATION else (text,)
    if not all(isinstance(record, dict) for record in records):
        raise DataError(
            f"Data file {file} holds rows that are not JSON objects; write one {{\"{text}\": ...}} object per row."
        )
    for column in wanted:
        if column not in records[0]:
            raise DataError(
                f"Data file {file} has no column {column!r} (it has {', '.join(map(repr, records[0]))}); "
                f"name the right ones (--text-column / --label-column, or text=/label= in Python)."
            )
    for i, record in enumerate(records):
        if any(record.get(column) is None for column in wanted):
            raise DataError(
                f"Data file {file} row {i + 1} lacks a value in {'/'.join(wanted)}; fill it or drop the row."
            )
        if None in record:  # csv.DictReader's key for fields beyond the header: a text's unquoted comma, often
            raise DataError(f"Data file {file} row {i + 1} has more fields than its header; quote texts that hold "
                            "the delimiter (\"like, this\").")
        if any(isinstance(record[column], (list, dict)) for column in wanted):
            raise DataError(f"Data file {file} row {i + 1} holds a list or an object in {'/'.join(wanted)}; give "
                            "each row one text and one label.")
    if task == CAUSAL_LM:
        return [str(r[text]) for r in records if str(r[text]).strip()]
    return [(str(r[text]), str(r[label])) for r in records]


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def _read_saved_dataset(folder: Path, task: str, text: str, label: str) -> dict[str, list]:
    """A `save_to_disk` folder: a DatasetDict (train/validation/test) or one Dataset (treated as train)."""
    import datasets  # optional dependency (leanfit[zoo]); imported only for this format

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    splits = {}
    for split, names in SPLIT_NAMES.items():
        name = next((n for n in names if n in loaded), None)
        if name is not None:
            splits[split] = _dataset_rows(loaded[name], folder / name, task, text, label)
    if "train" not in splits:
        raise DataError(
            f"Saved dataset {folder} has no train split (it has {', '.join(loaded)}); save one named 'train'."
        )
    return splits


def _dataset_rows(dataset, where: Path, task: str, text: str, label: str) -> list:
    if len(dataset) == 0:
        raise DataError(f"Saved dataset split {where} is empty; add rows to it or drop the split.")
    records = dataset.to_dict()  # columns -> lists
    missing = [c for c in ((text, label) if task == CLASSIFICATION else (text,)) if c not in records]
    if missing:
        raise DataError(
            f"Saved dataset split {where} has no column {missing[0]!r} (it has "
            f"{', '.join(map(repr, records))}); name the right ones (--text-column / --label-column, or "
            "text=/label= in Python)."
        )
    label_names = _class_label_names(dataset.features.get(label)) if task == CLASSIFICATION else None
    rows = []
    for i in range(len(dataset)):
        value = records[text][i]
        if task == CAUSAL_LM:
            rows.append(str(value))
        else:
            y = records[label][i]
            rows.append((str(value), label_names[y] if label_names else str(y)))
    return rows


def _class_label_names(feature) -> list[str] | None:
    """A `ClassLabel` column stores ints; use its names so labels read as the user wrote them."""
    return list(feature.names) if getattr(feature, "names", None) else None
