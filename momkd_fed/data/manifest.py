"""The site manifest: one row per slide with its case, clinical label and optional split."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError
from .bag import SPLITS

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class ManifestRow:
    """One usable slide: labelled, with its patient."""

    case_id: str
    slide_id: str
    label: int
    split: str | None = None  # "train"/"val"/"test", or None when the manifest has no split column


@dataclass
class Manifest:
    """Labelled slides of one site plus the slides excluded (and why)."""

    path: str
    rows: list[ManifestRow]
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (slide_id, reason)
    has_split: bool = False  # the manifest carried a split column

    @property
    def case_ids(self) -> list[str]:
        return sorted({r.case_id for r in self.rows})


# Values that mean "no result" in clinical tables (compared after normalize_label): excluded quietly (counted).
NOT_DETERMINED = frozenset({"indeterminate", "equivocal", "unknown", "[unknown]", "not available", "[not available]",
                            "not evaluated", "[not evaluated]", "not performed", "pending", "na", "n/a", "none",
                            "[discrepancy]", "discrepancy"})
UNKNOWN_LABEL = "unknown label"  # reason prefix of a value that is neither mapped nor a no-result value


def normalize_label(value: object) -> str | None:
    """Canonical string form of a label cell: stripped, lower-case, numeric strings as integers where exact
    ("1.0" -> "1", 1 -> "1"). Returns None for a missing cell (NaN, None, empty)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    s = str(value).strip()
    if not s or s.lower() in ("nan", "na", "n/a", "none", "null"):
        return None
    try:
        x = float(s)
    except ValueError:
        return s.lower()
    if x == x and x.is_integer():
        return str(int(x))
    return repr(x)


def _read_table(path: Path) -> pd.DataFrame:
    import pandas as pd  # here, not at import: a ClientApp that finds the manifest in the site cache never needs it

    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise DataError(str(path), "the manifest is empty (no header, no rows)",
                        "write a CSV with case_id, slide_id and the label column") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(str(path), f"not a readable CSV/TSV: {exc}", "write a plain CSV (or .tsv) file") from exc


def read_manifest(path: str | Path, label_column: str, label_map: dict[str, int],
                  split_column: str = "split") -> Manifest:
    """Read and validate a manifest.

    Parameters
    ----------
    path : CSV (``.tsv`` = tab separated) with ``case_id``, ``slide_id``, ``label_column`` and optionally
        ``split_column``.
    label_map : manifest value -> class; keys and cells are compared after :func:`normalize_label` (so ``1``,
        ``1.0`` and ``"1"`` match, and ``Positive`` matches ``positive``).
    split_column : column with train/val/test; absent column = no split given (rows get ``split=None``).

    Returns
    -------
    Manifest; rows with a missing or unmapped label (e.g. "Indeterminate") are in ``excluded`` with the reason,
    never mapped to a class.

    Raises
    ------
    DataError for a missing file, missing columns, an empty manifest, duplicate slide ids, invalid split
    values, or a patient whose slides sit in different splits.
    """
    path = Path(path)
    p = str(path)
    if not path.is_file():
        raise DataError(p, "manifest not found", "set the site's manifest to an existing CSV file")
    df = _read_table(path)
    df.columns = [str(c).strip() for c in df.columns]
    for col in ("case_id", "slide_id", label_column):
        if col not in df.columns:
            raise DataError(p, f"missing required column {col!r}; columns present: {list(df.columns)}",
                            f"add a {col!r} column" + (" or set data.label_column" if col == label_column else ""))
    if len(df) == 0:
        raise DataError(p, "the manifest has a header but no rows", "list one slide per row")
    df["slide_id"] = df["slide_id"].str.strip()
    df["case_id"] = df["case_id"].str.strip()
    blank = df.index[(df["slide_id"] == "") | (df["case_id"] == "")].tolist()
    if blank:
        raise DataError(p, f"empty case_id or slide_id in {len(blank)} rows (first data rows: "
                           f"{[i + 2 for i in blank[:5]]})", "fill in every case_id and slide_id")
    counts = Counter(df["slide_id"])
    dupes = sorted(s for s, n in counts.items() if n > 1)
    if dupes:
        raise DataError(p, f"{len(dupes)} duplicate slide_id values: {dupes[:10]}" + (" ..." if len(dupes) > 10 else ""),
                        "list each slide once (slide_id = feature file stem)")

    lmap = {}
    for k, v in label_map.items():
        nk = normalize_label(k)
        if nk is not None:
            lmap[nk] = int(v)
    has_split = split_column in df.columns
    rows: list[ManifestRow] = []
    excluded: list[tuple[str, str]] = []
    bad_split: list[tuple[str, str]] = []
    for case_id, slide_id, raw_label, raw_split in zip(
            df["case_id"], df["slide_id"], df[label_column],
            df[split_column] if has_split else [None] * len(df)):
        lab = normalize_label(raw_label)
        if lab is None:
            excluded.append((slide_id, f"missing label in column {label_column!r}"))
            continue
        if lab not in lmap:
            if lab in NOT_DETERMINED:  # a clinical "no result": excluded and counted
                excluded.append((slide_id, f"label {str(raw_label).strip()!r} in column {label_column!r} is not in "
                                           f"data.label_map"))
            else:  # anything else is likely a typo or a wrong label_map: check-data calls it an error
                excluded.append((slide_id, f"{UNKNOWN_LABEL} {str(raw_label).strip()!r} in column {label_column!r}: "
                                           f"neither in data.label_map nor a recognised no-result value"))
            continue
        split = None
        if has_split:
            split = str(raw_split).strip().lower()
            if split not in SPLITS:
                bad_split.append((slide_id, str(raw_split)))
                continue
        rows.append(ManifestRow(case_id=case_id, slide_id=slide_id, label=lmap[lab], split=split))
    if bad_split:
        raise DataError(p, f"column {split_column!r} has invalid values in {len(bad_split)} labelled rows, e.g. "
                           f"{bad_split[:5]}; allowed: {', '.join(SPLITS)}",
                        f"use train/val/test, or drop the {split_column!r} column for an automatic patient split")
    if has_split:
        by_case: dict[str, set[str]] = {}
        for r in rows:
            by_case.setdefault(r.case_id, set()).add(r.split or "")
        leak = sorted(c for c, s in by_case.items() if len(s) > 1)
        if leak:
            raise DataError(p, f"{len(leak)} patients have slides in different splits: {leak[:5]}",
                            "put all slides of a patient in one split")
    if excluded:
        reasons = Counter(r for _, r in excluded)
        log.info("%s: %d slides excluded: %s", p, len(excluded), dict(reasons))
    return Manifest(path=p, rows=rows, excluded=excluded, has_split=has_split)
