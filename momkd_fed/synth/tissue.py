"""Slide geometry of the synthetic cohorts: a tissue blob on the patch grid and spatial regions inside it.

Everything here works in grid units (one cell = one patch); :mod:`momkd_fed.synth.generator` turns cells into
level-0 pixel coordinates.
"""

from __future__ import annotations

import numpy as np


def tissue_cells(rng: np.random.Generator, n: int) -> np.ndarray:
    """Return ``n`` grid cells forming one irregular tissue blob.

    The blob is an ellipse of random aspect and orientation whose radius wobbles with angle (three low Fourier
    harmonics); the ``n`` cells of smallest normalised radius are kept, so the blob is contiguous.

    Returns
    -------
    (n, 2) int64 array of (col, row) cells, min-shifted to start at 0, in row-major order.
    """
    if n <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    aspect = rng.uniform(1.0, 2.2)
    half = int(np.ceil(np.sqrt(n * aspect / np.pi) * 1.6)) + 2
    ax = np.arange(-half, half + 1)
    gx, gy = np.meshgrid(ax, ax)  # (L, L) each
    angle = rng.uniform(0, np.pi)
    u = gx * np.cos(angle) + gy * np.sin(angle)  # (L, L)
    v = (-gx * np.sin(angle) + gy * np.cos(angle)) * aspect  # (L, L)
    theta = np.arctan2(v, u)  # (L, L)
    wobble = np.ones_like(theta)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = np.hypot(u, v) / wobble + rng.uniform(0, 0.35, size=u.shape)  # (L, L) jittered border
    order = np.argsort(radius.ravel(), kind="stable")[:n]
    cells = np.stack([gx.ravel()[order], gy.ravel()[order]], axis=1)  # (n, 2)
    cells = cells - cells.min(axis=0)
    keep = np.lexsort((cells[:, 0], cells[:, 1]))  # row-major, like a tiler's output
    return cells[keep].astype(np.int64)


def grow_regions(rng: np.random.Generator, cells: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Grow contiguous regions of the given sizes inside ``cells``.

    Each region starts at a random free seed cell and takes the ``size`` free cells nearest to it (distance
    jittered a little so borders are ragged).

    Parameters
    ----------
    cells : (P, 2) grid cells.
    sizes : cells per region; their sum must not exceed P.

    Returns
    -------
    (P,) int64: region index per cell, -1 where no region.
    """
    region = np.full(len(cells), -1, dtype=np.int64)
    pts = cells.astype(np.float64)
    for r, size in enumerate(sizes):
        free = np.flatnonzero(region < 0)
        if size <= 0 or len(free) == 0:
            continue
        seed = pts[rng.choice(free)]
        dist = np.hypot(*(pts[free] - seed).T) + rng.uniform(0, 0.8, size=len(free))  # (F,)
        region[free[np.argsort(dist, kind="stable")[:size]]] = r
    return region


def voronoi_labels(rng: np.random.Generator, cells: np.ndarray, n_seeds: int, probs: np.ndarray) -> np.ndarray:
    """Partition ``cells`` into Voronoi patches whose labels are drawn from ``probs``.

    Parameters
    ----------
    cells : (P, 2) grid cells.
    n_seeds : number of Voronoi seeds (patches of one tissue type).
    probs : (T,) probabilities of the T tissue types.

    Returns
    -------
    (P,) int64 tissue-type index per cell.
    """
    if len(cells) == 0:
        return np.zeros(0, dtype=np.int64)
    seeds = cells[rng.choice(len(cells), size=min(n_seeds, len(cells)), replace=False)].astype(np.float64)
    kinds = rng.choice(len(probs), size=len(seeds), p=probs)  # (S,)
    d = ((cells[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)  # (P, S)
    return kinds[np.argmin(d, axis=1)].astype(np.int64)
