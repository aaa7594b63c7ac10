"""Spatial kNN graph over patch coordinates, as a dense neighbour index (P, k_eff + 1).

Column 0 is the patch itself (the self loop); the other columns are its k_eff = min(k, P - 1) nearest patches
ordered by (distance, index). The index tie-break makes the graph deterministic on regular patch grids, where
most patches have four neighbours at exactly the same distance.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import DataError

log = logging.getLogger(__name__)


def _sq_dist(coords: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Exact squared distances between ``coords[rows]`` (R,) and ``coords[cand]`` (R, C) -> (R, C)."""
    diff = coords[cand] - coords[rows][:, None, :]  # (R, C, 2)
    return (diff * diff).sum(-1)  # (R, C)


def _order(coords: np.ndarray, rows: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort candidates (R, C) of ``rows`` by (distance, index), self removed; return the first k and a mask of
    rows whose candidate set provably contains every patch at the k-th distance."""
    R, C = cand.shape
    d = _sq_dist(coords, rows, cand)  # (R, C)
    is_self = cand == rows[:, None]  # (R, C)
    d = np.where(is_self, np.inf, d.astype(np.float64))  # self goes last, then is dropped
    order = np.lexsort((cand, d), axis=-1)  # (R, C): by distance, then index
    cand = np.take_along_axis(cand, order, axis=1)  # (R, C)
    d = np.take_along_axis(d, order, axis=1)  # (R, C)
    n_valid = C - is_self.sum(1)  # (R,) candidates other than self
    kth = d[:, k - 1]  # (R,) distance of the k-th neighbour
    far = np.where(np.isfinite(d), d, -np.inf).max(1)  # (R,) farthest non-self candidate
    complete = (far > kth) | (n_valid < k)  # a point not returned is at least `far` away
    return cand[:, :k], complete


def knn_neighbors(coords: np.ndarray, k: int) -> torch.Tensor:
    """Dense kNN neighbour index with self in column 0, exact (distance, index) tie-break.

    Parameters
    ----------
    coords : (P, 2) array of patch positions (int64 level-0 pixels in practice).
    k : neighbours per patch; k_eff = min(k, P - 1).

    Returns
    -------
    torch.LongTensor (P, k_eff + 1); row i = [i, nearest, second nearest, ...].

    Notes
    -----
    A cKDTree returns candidates in O(P log P); each row asks for a few more than k and is re-queried with twice
    as many until every patch tied with the k-th neighbour is among its candidates, so ties are resolved exactly
    (by index) rather than by the tree's traversal order.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (P, 2), got {coords.shape}")
    P = coords.shape[0]
    k_eff = max(0, min(int(k), P - 1))
    self_col = np.arange(P, dtype=np.int64)[:, None]  # (P, 1)
    if k_eff == 0:
        return torch.from_numpy(self_col.copy())  # (P, 1)
    exact = coords.astype(np.int64) if np.issubdtype(coords.dtype, np.integer) else coords.astype(np.float64)
    from scipy.spatial import cKDTree  # here, not at import: ~1 s that most ClientApp messages never use

    tree = cKDTree(coords.astype(np.float64))
    out = np.empty((P, k_eff), dtype=np.int64)  # (P, k_eff)
    rows = np.arange(P)
    q = min(P, k_eff + 1 + max(4, k_eff))  # self + k + spare candidates for ties
    while rows.size:
        _, cand = tree.query(coords[rows].astype(np.float64), k=q)  # (R, q)
        cand = np.asarray(cand, dtype=np.int64).reshape(rows.size, q)
        best, complete = _order(exact, rows, cand, k_eff)
        if q >= P:
            complete[:] = True  # every patch was a candidate
        out[rows[complete]] = best[complete]
        rows = rows[~complete]
        q = min(P, 2 * q)
    return torch.from_numpy(np.concatenate([self_col, out], axis=1))  # (P, k_eff + 1)


def knn_neighbors_bruteforce(coords: np.ndarray, k: int) -> torch.Tensor:
    """O(P^2) reference for :func:`knn_neighbors` (tests only). Same output contract."""
    coords = np.asarray(coords)
    P = coords.shape[0]
    k_eff = max(0, min(int(k), P - 1))
    rows = np.arange(P)
    if P == 0:
        return torch.zeros((0, 1), dtype=torch.int64)
    exact = coords.astype(np.int64) if np.issubdtype(coords.dtype, np.integer) else coords.astype(np.float64)
    cand = np.broadcast_to(rows[None, :], (P, P)).copy()  # (P, P)
    best, _ = _order(exact, rows, cand, k_eff) if k_eff else (np.zeros((P, 0), np.int64), None)
    return torch.from_numpy(np.concatenate([rows[:, None], best], axis=1).astype(np.int64))  # (P, k_eff + 1)


def neighbors_from_edge_index(edge_index: np.ndarray, num_patches: int, k: int,
                              coords: np.ndarray | None = None, path: str = "<edge_index>") -> torch.Tensor:
    """Dense neighbour index from a stored kNN edge list (the MoMKD reference's ``edge_index_k8``).

    Parameters
    ----------
    edge_index : (2, E) int array, row 0 = patch, row 1 = its neighbour (sklearn kNN connectivity).
    num_patches : P.
    k : neighbours per patch wanted; k_eff = min(k, P - 1).
    coords : optional (P, 2); when given, neighbours are ordered by (distance, index) as in :func:`knn_neighbors`,
        otherwise by index.
    path : file named in errors.

    Returns
    -------
    torch.LongTensor (P, k_eff + 1), column 0 = self.

    Raises
    ------
    DataError when, after dropping stored self loops and duplicate edges, some patch does not have exactly k_eff
    neighbours (a ragged or differently sized graph cannot form this dense index). Policy: no padding and no
    trimming (either would change the graph silently); the site loader then logs a warning and rebuilds the graph
    from ``coords``, exactly as for a file without ``edge_index_k8``.
    """
    ei = np.asarray(edge_index, dtype=np.int64)
    P = int(num_patches)
    k_eff = max(0, min(int(k), P - 1))
    if ei.ndim != 2 or ei.shape[0] != 2:
        raise DataError(path, f"'edge_index_k8' must have shape (2, E), got {ei.shape}", "rewrite or delete it")
    if ei.size and (ei.min() < 0 or ei.max() >= P):
        raise DataError(path, f"'edge_index_k8' indexes patches outside [0, {P})", "rewrite or delete it")
    src, dst = ei
    keep = src != dst
    pairs = np.unique(np.stack([src[keep], dst[keep]], 1), axis=0) if keep.any() else np.zeros((0, 2), np.int64)
    deg = np.bincount(pairs[:, 0], minlength=P) if P else np.zeros(0, np.int64)  # (P,)
    if P and (deg != k_eff).any():
        bad = int((deg != k_eff).sum())
        raise DataError(path, f"'edge_index_k8' gives {bad} of {P} patches a degree other than k_eff={k_eff} "
                              f"(degrees {int(deg.min())}..{int(deg.max())})",
                        "delete edge_index_k8 (the graph is then built from coords) or set data.knn_k to match")
    nbr = pairs[:, 1].reshape(P, k_eff)  # (P, k_eff): pairs are sorted by (src, dst)
    if coords is not None and k_eff:
        exact = np.asarray(coords)
        exact = exact.astype(np.int64) if np.issubdtype(exact.dtype, np.integer) else exact.astype(np.float64)
        rows = np.arange(P)
        d = _sq_dist(exact, rows, nbr).astype(np.float64)  # (P, k_eff)
        nbr = np.take_along_axis(nbr, np.lexsort((nbr, d), axis=-1), axis=1)
    self_col = np.arange(P, dtype=np.int64)[:, None]
    return torch.from_numpy(np.concatenate([self_col, nbr], axis=1))  # (P, k_eff + 1)
