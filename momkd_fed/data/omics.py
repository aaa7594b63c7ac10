"""Per-case genomic vectors (matrix file or folder of .npy) and their mergeable normalisation statistics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

log = logging.getLogger(__name__)

STD_FLOOR = 1e-6  # genes with (near) zero variance are divided by this instead of their std


@dataclass
class Omics:
    """Genomic vectors of one site, keyed by case.

    Attributes
    ----------
    genes : gene names, the order of every vector.
    by_case : case_id -> (G,) float32 vector (raw values, after the optional log2(x+1)).
    """

    genes: list[str]
    by_case: dict[str, np.ndarray]


def _few(items: list, n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def read_omics(path: str | Path, gene_panel: list[str] | None = None, log1p: bool = False) -> Omics:
    """Read a site's genomics.

    Parameters
    ----------
    path : CSV / TSV / Parquet matrix (one row per case; case id in column ``case_id``, else the first column;
        one column per gene), or a folder of ``<case_id>.npy`` vectors (gene names from ``genes.txt`` in the
        folder, else from ``gene_panel``).
    gene_panel : genes to keep, in this order; empty/None = every gene column (matrix: columns with no numeric
        value at all are treated as metadata and skipped).
    log1p : apply log2(x + 1) (``data.omics_log1p``, for raw TPM).

    Returns
    -------
    Omics with (G,) float32 vectors. Rows repeated for one case (one row per slide) are merged when identical.

    Raises
    ------
    DataError naming the file and, for bad values, the case and gene.
    """
    path = Path(path)
    panel = list(gene_panel or [])
    if path.is_dir():
        genes, by_case = _read_npy_folder(path, panel)
    elif path.is_file():
        genes, by_case = _read_matrix(path, panel)
    else:
        raise DataError(str(path), "genomics file or folder not found",
                        "set the site's omics path, or leave it empty for a histology-only site")
    if not by_case:
        raise DataError(str(path), "no cases in the genomics data", "add one row (or .npy file) per case")
    if log1p:
        for case, v in by_case.items():
            if (v < 0).any():
                g = genes[int(np.argmax(v < 0))]
                raise DataError(str(path), f"case {case!r}, gene {g!r}: negative value with data.omics_log1p=true",
                                "set data.omics_log1p=false for data already on a log or z scale")
            by_case[case] = np.log2(v + 1.0).astype(np.float32)
    return Omics(genes=genes, by_case=by_case)


def _read_matrix(path: Path, panel: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    import pandas as pd  # here, not at import: a ClientApp that finds the table in the site cache never needs it

    p = str(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            sep = "\t" if suffix in (".tsv", ".tab", ".txt") else ","
            df = pd.read_csv(path, sep=sep, dtype=str)  # ids stay text ("001"); genes parsed below
    except pd.errors.EmptyDataError as exc:
        raise DataError(p, "the genomics file is empty", "write one row per case, one column per gene") from exc
    except Exception as exc:  # pandas/pyarrow raise many types for unreadable files
        raise DataError(p, f"cannot read the genomics matrix: {exc}", "write CSV, TSV or Parquet") from exc
    if len(df) == 0:
        raise DataError(p, "the genomics matrix has no rows", "write one row per case")
    df.columns = [str(c).strip() for c in df.columns]
    id_col = "case_id" if "case_id" in df.columns else df.columns[0]
    cases = df[id_col].astype(str).str.strip()
    if panel:
        missing = [g for g in panel if g not in df.columns]
        if missing:
            raise DataError(p, f"{len(missing)} of {len(panel)} panel genes are missing: {_few(missing)}",
                            "use the same gene panel at every site (data.gene_panel) or add the columns")
        genes = panel
    else:
        genes = []
        skipped = []
        for c in df.columns:
            if c == id_col:
                continue
            if pd.to_numeric(df[c], errors="coerce").notna().any():
                genes.append(c)
            else:
                skipped.append(c)
        if skipped:
            log.info("%s: %d non-numeric columns treated as metadata: %s", p, len(skipped), _few(skipped))
        if not genes:
            raise DataError(p, "no numeric gene columns", "write one column per gene")
    values = df[genes].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)  # (N, G)
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(p, f"case {cases.iloc[r]!r}, gene {genes[c]!r}: non-numeric or missing value "
                           f"{df[genes[c]].iloc[r]!r} ({int(bad.sum())} bad cells in all)",
                        "fill or drop the case; values must be finite numbers")
    by_case: dict[str, np.ndarray] = {}
    conflicts = []
    for i, case in enumerate(cases):
        v = values[i].astype(np.float32)
        if case in by_case:
            if not np.array_equal(by_case[case], v):
                conflicts.append(case)
            continue
        by_case[case] = v
    if conflicts:
        raise DataError(p, f"{len(conflicts)} cases appear in several rows with different values: {_few(conflicts)}",
                        "keep one row per case")
    return list(genes), by_case


def _read_npy_folder(path: Path, panel: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    files = sorted(path.glob("*.npy"))
    if not files:
        raise DataError(str(path), "no <case_id>.npy files in the genomics folder", "write one .npy per case")
    names_file = path / "genes.txt"
    names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()] if names_file.is_file() else []
    idx = None
    if names and panel:
        pos = {g: i for i, g in enumerate(names)}
        missing = [g for g in panel if g not in pos]
        if missing:
            raise DataError(str(names_file), f"{len(missing)} of {len(panel)} panel genes are missing: "
                                             f"{_few(missing)}", "use the federation's gene panel")
        idx = np.array([pos[g] for g in panel])
    genes = panel or names
    expected = len(names) if names else len(panel)
    by_case: dict[str, np.ndarray] = {}
    for f in files:
        try:
            v = np.load(f, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(str(f), f"not a readable .npy file: {exc}", "rewrite the vector") from exc
        v = np.asarray(v).reshape(-1) if v.ndim == 2 and 1 in v.shape else v
        if v.ndim != 1 or not np.issubdtype(v.dtype, np.number):
            raise DataError(str(f), f"expected a 1-D numeric vector, got {v.dtype} {v.shape}", "save one (G,) vector")
        if expected and v.shape[0] != expected:
            src = "genes.txt" if names else "data.gene_panel"
            raise DataError(str(f), f"vector length {v.shape[0]} != {expected} genes in {src}",
                            "save vectors over the same genes, in the same order")
        if not expected:
            expected = v.shape[0]
            genes = [f"gene_{i}" for i in range(expected)]
        if idx is not None:
            v = v[idx]
        bad = ~np.isfinite(v)
        if bad.any():
            raise DataError(str(f), f"case {f.stem!r}, gene {genes[int(np.argmax(bad))]!r}: non-finite value "
                                    f"({int(bad.sum())} in all)", "fill or drop the case")
        by_case[f.stem] = v.astype(np.float32)
    return list(genes), by_case


# --------------------------------------------------------------------------------------------------------------
# Normalisation statistics: mergeable across sites (only these aggregates leave a site)


@dataclass
class OmicsMoments:
    """Per-gene sufficient statistics: sum (G,), sum of squares (G,), number of vectors."""

    sum: np.ndarray
    sumsq: np.ndarray
    count: int


def omics_moments(vectors: list[np.ndarray] | np.ndarray) -> OmicsMoments:
    """Moments of a set of (G,) vectors (one per case) in float64."""
    x = np.asarray(vectors, dtype=np.float64)  # (N, G)
    if x.ndim != 2:
        raise ValueError(f"expected (N, G) vectors, got shape {x.shape}")
    return OmicsMoments(sum=x.sum(0), sumsq=(x * x).sum(0), count=int(x.shape[0]))


def merge_moments(parts: list[OmicsMoments]) -> OmicsMoments:
    """Pool moments of several sites (all over the same genes)."""
    parts = [m for m in parts if m.count > 0]
    if not parts:
        raise ValueError("no moments with count > 0 to merge")
    shapes = {m.sum.shape for m in parts}
    if len(shapes) != 1:
        raise ValueError(f"moments over different gene counts cannot be merged: {sorted(shapes)}")
    return OmicsMoments(sum=sum(m.sum for m in parts), sumsq=sum(m.sumsq for m in parts),
                        count=sum(m.count for m in parts))


def moments_to_mean_std(m: OmicsMoments) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean (G,) and population std (G,) as float32, std floored at ``STD_FLOOR``."""
    if m.count <= 0:
        raise ValueError("moments with count 0 have no mean")
    mean = m.sum / m.count
    var = np.maximum(m.sumsq / m.count - mean * mean, 0.0)
    return mean.astype(np.float32), np.maximum(np.sqrt(var), STD_FLOOR).astype(np.float32)


def normalize_omics(vec, mean, std, clip: float):
    """Z-score then clip to [-clip, clip] (clip <= 0: no clipping). Works on numpy arrays and torch tensors,
    (G,) or (N, G); std is floored at ``STD_FLOOR``."""
    if isinstance(vec, torch.Tensor):
        mean_t = torch.as_tensor(mean, dtype=vec.dtype, device=vec.device)
        std_t = torch.as_tensor(std, dtype=vec.dtype, device=vec.device).clamp_min(STD_FLOOR)
        z = (vec - mean_t) / std_t  # (..., G)
        return z.clamp(-clip, clip) if clip > 0 else z
    z = (np.asarray(vec, dtype=np.float32) - mean) / np.maximum(std, STD_FLOOR)  # (..., G)
    return (np.clip(z, -clip, clip) if clip > 0 else z).astype(np.float32)
