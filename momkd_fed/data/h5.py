"""TRIDENT and CLAM patch-feature .h5 files: writing (synthetic cohorts, tests) and reading with validation."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np


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
