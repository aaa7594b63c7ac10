"""TRIDENT and CLAM patch-feature .h5 files: writing (synthetic cohorts, tests) and reading with validation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError


def write_trident_h5(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    *,
    patch_size: int = 256,
    patch_size_level0: int = 512,
    level0_magnification: int = 40,
    target_magnification: int = 20,
    overlap: int = 0,
    level0_width: int | None = None,
    level0_height: int | None = None,
    encoder: str = "uni_v2",
    edge_index: np.ndarray | None = None,
) -> None:
    """Write one slide as TRIDENT does (atomically: a temp file renamed into place).

    Parameters
    ----------
    features : (P, D) array, written as float32.
    coords : (P, 2) array, top-left (x, y) level-0 pixels, written as int64.
    edge_index : optional (2, E) int64 kNN connectivity (the MoMKD reference layout's ``edge_index_k8``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    features = np.asarray(features, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if level0_width is None:
        level0_width = int(coords[:, 0].max() + patch_size_level0) if len(coords) else 0
    if level0_height is None:
        level0_height = int(coords[:, 1].max() + patch_size_level0) if len(coords) else 0
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        dset = f.create_dataset("features", data=features)
        dset.attrs["encoder"] = encoder
        c = f.create_dataset("coords", data=coords)
        c.attrs["patch_size"] = patch_size
        c.attrs["patch_size_level0"] = patch_size_level0
        c.attrs["level0_magnification"] = level0_magnification
        c.attrs["target_magnification"] = target_magnification
        c.attrs["overlap"] = overlap
        c.attrs["name"] = path.stem
        c.attrs["level0_width"] = level0_width
        c.attrs["level0_height"] = level0_height
        if edge_index is not None:
            f.create_dataset("edge_index_k8", data=np.asarray(edge_index, dtype=np.int64))
    tmp.replace(path)


def write_clam_h5(path: str | Path, features: np.ndarray, coords: np.ndarray) -> None:
    """Write one slide as CLAM does: ``features`` float32 (P, D), ``coords`` int32 (P, 2), no attributes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int32).reshape(-1, 2))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------------------
# Reading, with validation

ENCODER_DIMS: dict[int, str] = {
    512: "CONCH",
    768: "CONCH v1.5, Phikon, CTransPath",
    1024: "UNI, Phikon-v2, ResNet50-trunc",
    1536: "UNI2-h, H-optimus-0/1, GigaPath",
    2560: "Virchow2",
}


@dataclass
class SlideFeatures:
    """One slide's patch features as read from a TRIDENT or CLAM .h5 file.

    Attributes
    ----------
    features : (P, D) float32
    coords : (P, 2) int64 top-left (x, y) level-0 pixels, row-aligned with ``features``.
    patch_size_level0 : int
        Patch side in level-0 pixels (TRIDENT attribute on ``coords``); 0 when unknown (CLAM).
    edge_index : (2, E) int64 or None
        Stored ``edge_index_k8`` (row = patch, col = neighbour), validated to index ``[0, P)``.
    fmt : "trident" or "clam"
    """

    features: np.ndarray
    coords: np.ndarray
    patch_size_level0: int = 0
    edge_index: np.ndarray | None = None
    fmt: str = "clam"

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])


def _dim_hint(dim: int) -> str:
    name = ENCODER_DIMS.get(dim)
    return f"{dim} ({name})" if name else f"{dim} (no encoder we know of)"


def read_slide_h5(path: str | Path, feature_dim: int | None = None) -> SlideFeatures:
    """Read and validate one patch-feature file (TRIDENT or CLAM layout).

    Parameters
    ----------
    path : the .h5 file.
    feature_dim : expected D (``data.feature_dim``); None skips the check.

    Returns
    -------
    SlideFeatures with features (P, D) float32 and coords (P, 2) int64; P = 0 for an empty slide.

    Raises
    ------
    DataError naming the file, the dataset or attribute at fault, and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "feature file not found",
                        "check features_dir and that the file is named <slide_id>.h5")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(str(path), f"not a readable HDF5 file (truncated or another format): {exc}",
                        "re-extract the features for this slide") from exc
    try:
        with f:
            return _read_open(path, f, feature_dim)
    except (OSError, RuntimeError) as exc:  # raised lazily by h5py when a dataset's bytes are missing
        raise DataError(str(path), f"HDF5 data cannot be read (truncated or corrupt file): {exc}",
                        "re-extract the features for this slide") from exc


def _read_open(path: Path, f: h5py.File, feature_dim: int | None) -> SlideFeatures:
    p = str(path)
    if "features" not in f or not isinstance(f["features"], h5py.Dataset):
        raise DataError(p, f"no 'features' dataset (found: {sorted(f.keys())})",
                        "point features_dir at TRIDENT features_<encoder>/ or CLAM h5_files/ output")
    dset = f["features"]
    if dset.ndim != 2:
        raise DataError(p, f"'features' must be 2-D (patches, dim), got shape {dset.shape}",
                        "store one row per patch")
    if feature_dim is not None and dset.shape[1] != feature_dim:
        raise DataError(p, f"'features' has dim {_dim_hint(dset.shape[1])}, but data.feature_dim is "
                           f"{_dim_hint(feature_dim)}",
                        "set data.feature_dim to match the encoder, or extract features with the federation's encoder")
    if not np.issubdtype(dset.dtype, np.number):
        raise DataError(p, f"'features' has non-numeric dtype {dset.dtype}", "store float features")
    features = np.asarray(dset[()], dtype=np.float32)  # (P, D)
    bad_rows = int((~np.isfinite(features)).any(axis=1).sum()) if features.size else 0
    if bad_rows:
        raise DataError(p, f"'features' has non-finite values (NaN/inf) in {bad_rows} of {features.shape[0]} rows",
                        "re-extract the features for this slide")

    if "coords" not in f or not isinstance(f["coords"], h5py.Dataset):
        raise DataError(p, "no 'coords' dataset (patch coordinates are needed for the spatial graph)",
                        "use TRIDENT or CLAM h5 output, which stores coords next to features")
    cset = f["coords"]
    if cset.ndim != 2 or cset.shape[1] != 2:
        raise DataError(p, f"'coords' must have shape (P, 2), got {cset.shape}", "store (x, y) per patch")
    if cset.shape[0] != features.shape[0]:
        raise DataError(p, f"row counts disagree: 'features' has {features.shape[0]} rows, 'coords' has "
                           f"{cset.shape[0]}", "re-extract the features for this slide")
    raw = cset[()]
    if not np.issubdtype(raw.dtype, np.integer):
        if not np.issubdtype(raw.dtype, np.number) or not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            raise DataError(p, f"'coords' must hold integer pixel positions, got dtype {raw.dtype} with "
                               "non-integer values", "store level-0 pixel coordinates as integers")
    coords = np.asarray(raw, dtype=np.int64)  # (P, 2)
    attrs = cset.attrs
    psl0 = int(attrs["patch_size_level0"]) if "patch_size_level0" in attrs else 0
    fmt = "trident" if "patch_size_level0" in attrs or "encoder" in dset.attrs else "clam"

    edge_index = None
    if "edge_index_k8" in f:
        e = f["edge_index_k8"]
        if not isinstance(e, h5py.Dataset) or e.ndim != 2 or e.shape[0] != 2:
            raise DataError(p, f"'edge_index_k8' must have shape (2, E), got {getattr(e, 'shape', None)}",
                            "delete the dataset (the graph is then built from coords) or rewrite it")
        ei = e[()]
        if not np.issubdtype(ei.dtype, np.integer):
            raise DataError(p, f"'edge_index_k8' must be integer, got {ei.dtype}",
                            "delete the dataset (the graph is then built from coords)")
        ei = ei.astype(np.int64)  # (2, E)
        P = features.shape[0]
        if ei.size and (ei.min() < 0 or ei.max() >= P):
            raise DataError(p, f"'edge_index_k8' indexes patches outside [0, {P}) (min {ei.min()}, max {ei.max()})",
                            "delete the dataset (the graph is then built from coords) or rewrite it")
        edge_index = ei
    return SlideFeatures(features=features, coords=coords, patch_size_level0=psl0, edge_index=edge_index, fmt=fmt)
