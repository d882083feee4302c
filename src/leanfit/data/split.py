"""Deterministic train / validation / test splits, and text cut into passages.

A split must not depend on the input order, the platform or the run: rows are de-duplicated, sorted,
then shuffled by `random.Random(seed)`. Classification rows are split per class (stratified), so
rare classes keep their share in every split.
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict

from leanfit.errors import ConfigError

log = logging.getLogger(__name__)


def text_key(text: str) -> str:
    """What makes two texts duplicates: equal after collapsing whitespace."""
    return " ".join(text.split())


def drop_duplicates(rows: list) -> tuple[list, int]:
    """Keep the first row of each text; return (rows, number dropped). Rows: str or (text, label)."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = text_key(row if isinstance(row, str) else row[0])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def split_rows(
    rows: list, *, seed: int = 0, test: float = 0.2, validation: float = 0.1, stratify: bool = True
) -> tuple[list, list, list]:
    """De-duplicate, then split into (train, validation, test) holding `test` and `validation` of all rows.

    Rows are str (causal LM; never stratified) or (text, label index) tuples. With `stratify`, each
    class gives its share (largest remainder, so totals are exact) and keeps at least one train row.
    The number of duplicates dropped is logged; call `drop_duplicates` first to get it.
    """
    if not (0 <= test < 1 and 0 <= validation < 1 and test + validation < 1):
        raise ConfigError(
            f"Split fractions test={test} and validation={validation} must be in [0, 1) and sum to "
            "less than 1; lower them."
        )
    rows, dropped = drop_duplicates(rows)
    if dropped:
        log.info("split_rows: dropped %d duplicate texts", dropped)
    rng = random.Random(seed)
    if stratify and rows and not isinstance(rows[0], str):
        return _split_stratified(rows, rng, test, validation)
    shuffled = sorted(rows)
    rng.shuffle(shuffled)
    n_test, n_val = round(test * len(rows)), round(validation * len(rows))
    return shuffled[n_test + n_val :], shuffled[n_test : n_test + n_val], shuffled[:n_test]


def _split_stratified(rows: list, rng: random.Random, test: float, validation: float):
    by_label: dict = defaultdict(list)
    for row in sorted(rows, key=lambda r: (r[1], r[0])):
        by_label[row[1]].append(row)
    counts = {label: len(group) for label, group in by_label.items()}
    n_test, n_val = _allocate(counts, test), _allocate(counts, validation)
    train, val, tst = [], [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        # A class must keep a train row: take from validation first, then from test.
        over = max(0, n_test[label] + n_val[label] - (len(group) - 1))
        n_v = max(0, n_val[label] - over)
        n_t = n_test[label] - (over - (n_val[label] - n_v))
        tst += group[:n_t]
        val += group[n_t : n_t + n_v]
        train += group[n_t + n_v :]
    for split in (train, val, tst):  # interleave the classes
        rng.shuffle(split)
    return train, val, tst


def _allocate(counts: dict, fraction: float) -> dict:
    """Per-class counts summing to round(fraction * total): floors, then the largest remainders."""
    exact = {label: fraction * n for label, n in counts.items()}
    share = {label: int(x) for label, x in exact.items()}
    missing = round(fraction * sum(counts.values())) - sum(share.values())
    for label in sorted(counts, key=lambda k: (share[k] - exact[k], k))[:missing]:
        share[label] += 1
    return share


def to_passages(lines: list[str] | str, *, max_chars: int = 2000) -> list[str]:
    """Cut text into passages of at most `max_chars`, along paragraph (blank line) boundaries.

    Paragraphs have their lines joined by spaces and are packed greedily, so passages are mostly
    between max_chars/2 and max_chars; a longer paragraph is cut after a sentence (between words if
    one sentence is longer).
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    paragraphs, current = [], []
    for line in list(lines) + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    passages, packed = [], ""
    for paragraph in paragraphs:
        for piece in _cut_long(paragraph, max_chars):
            if packed and len(packed) + 1 + len(piece) > max_chars:
                passages.append(packed)
                packed = ""
            packed = f"{packed}\n{piece}" if packed else piece
    if packed:
        passages.append(packed)
    return passages


def _cut_long(paragraph: str, max_chars: int) -> list[str]:
    """A paragraph longer than `max_chars` -> pieces cut after sentences where possible, else between words."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    units = [w for sentence in re.split(r"(?<=[.!?;:])\s+", paragraph) for w in _words(sentence, max_chars)]
    pieces, piece = [], ""
    for unit in units:
        if piece and len(piece) + 1 + len(unit) > max_chars:
            pieces.append(piece)
            piece = ""
        piece = f"{piece} {unit}" if piece else unit
    return pieces + [piece] if piece else pieces


def _words(sentence: str, max_chars: int) -> list[str]:
    return [sentence] if len(sentence) <= max_chars else sentence.split()
