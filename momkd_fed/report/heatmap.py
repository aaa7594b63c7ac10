"""Attention heat maps: each patch painted as a square on a downsampled slide canvas, with a colorbar.

Geometry. The canvas covers the patches' bounding box in level-0 pixels, ``[min x, max x + patch) x [min y,
max y + patch)``, scaled by ``min(1, max_side / longest side)``; a patch covers ``ceil(patch_size_level0 * scale)``
canvas pixels (at least 1). Where patches overlap the higher value shows. Pixels no patch covers are light grey.
The PNG holds the canvas at its own resolution in its top-left corner (one PNG pixel per canvas pixel) and the
colorbar to its right.

Normalisation (per slide, so slides are comparable by pattern, not by softmax scale):
``"rank"`` (default): the patch's percentile, ``(rank - 1) / (P - 1)`` with ties sharing their mean rank, as in
CLAM heat maps; robust to a few patches taking most of the softmax mass. ``"minmax"``: ``(a - min) / (max - min)``.
A slide whose attention is constant (or a single patch) maps to 0.5 under both.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..errors import MomkdError

log = logging.getLogger(__name__)

NORMALISATIONS = ("rank", "minmax")
_DPI = 100
_COLORBAR_PX = 110  # width reserved right of the canvas for the colorbar and its labels
_MIN_HEIGHT_PX = 240  # the figure is at least this tall so the colorbar stays readable
_BACKGROUND = "#c8c8c8"  # canvas pixels no patch covers (light grey: the top of inferno is near white)


def normalise_attention(attention: np.ndarray, mode: str = "rank") -> np.ndarray:
    """Per-slide attention (P,) -> values in [0, 1] (P,); see the module docstring for the two modes."""
    a = np.asarray(attention, dtype=np.float64).reshape(-1)  # (P,)
    if mode not in NORMALISATIONS:
        raise MomkdError(f"heat map normalisation {mode!r} is unknown; allowed: {', '.join(NORMALISATIONS)}")
    if a.size == 0:
        return a
    if mode == "minmax":
        lo, hi = float(a.min()), float(a.max())
        return np.full_like(a, 0.5) if hi <= lo else (a - lo) / (hi - lo)
    if a.size == 1:
        return np.full_like(a, 0.5)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)  # (P,), (U,)
    ends = np.cumsum(counts)  # (U,) 1-based rank of the last element of each tie group
    mean_rank = ends - (counts - 1) / 2.0  # (U,) ties share their mean rank
    return (mean_rank[inverse.reshape(-1)] - 1.0) / (a.size - 1.0)  # (P,) all-equal -> 0.5


def _paint(coords: np.ndarray, values: np.ndarray, patch: float, max_side: int) -> np.ndarray:
    """Canvas (H, W) with NaN where no patch lies and the max normalised value of the patches covering a pixel."""
    origin = coords.min(axis=0)  # (2,) x, y
    extent = coords.max(axis=0) - origin + patch  # (2,) level-0 width, height
    scale = min(1.0, max_side / float(extent.max()))
    width, height = (max(1, math.ceil(float(e) * scale)) for e in extent)
    side = max(1, math.ceil(patch * scale))  # canvas pixels per patch
    px = np.clip(np.floor((coords[:, 0] - origin[0]) * scale).astype(np.int64), 0, max(0, width - side))  # (P,)
    py = np.clip(np.floor((coords[:, 1] - origin[1]) * scale).astype(np.int64), 0, max(0, height - side))  # (P,)
    canvas = np.full((height, width), -np.inf)  # (H, W)
    cols = np.minimum(px[:, None] + np.arange(side)[None, :], width - 1)  # (P, side)
    for dy in range(side):
        rows = np.minimum(py + dy, height - 1)[:, None]  # (P, 1)
        np.maximum.at(canvas, (rows, cols), values[:, None])
    canvas[np.isneginf(canvas)] = np.nan
    return canvas


def render_heatmap(
    coords,
    attention,
    patch_size_level0: float,
    out_png: Path,
    *,
    max_side: int = 2048,
    normalize: str = "rank",
    cmap: str = "inferno",
    title: str | None = None,
) -> Path:
    """Paint one slide's attention as a heat map PNG.

    Parameters
    ----------
    coords : (P, 2) array
        Top-left (x, y) of each patch in level-0 pixels (the feature file's ``coords``).
    attention : (P,) array
        Attention per patch, row-aligned with ``coords`` (any real scale; normalised per slide).
    patch_size_level0 : float
        Patch side in level-0 pixels (the feature file's ``patch_size_level0`` attribute).
    out_png : Path
        File to write (parent folders are created).
    max_side : int
        Longest side of the canvas in pixels (the slide is only ever shrunk, never enlarged).
    normalize : {"rank", "minmax"}
        Per-slide normalisation, see the module docstring.
    cmap : str
        Matplotlib colormap; the default ``inferno`` grows brighter with attention.
    title : str, optional
        Colorbar label suffix, e.g. the slide id.

    Returns
    -------
    Path
        ``out_png``.

    Raises
    ------
    MomkdError
        On mismatched shapes, no patches, non-finite values or a non-positive patch size (naming ``out_png``).
    """
    out_png = Path(out_png)
    xy = np.asarray(coords, dtype=np.float64)  # (P, 2)
    att = np.asarray(attention, dtype=np.float64).reshape(-1)  # (P,)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise MomkdError(f"heat map {out_png}: coords must have shape (P, 2), got {xy.shape}")
    if xy.shape[0] != att.shape[0]:
        raise MomkdError(f"heat map {out_png}: {xy.shape[0]} coords but {att.shape[0]} attention values; they must "
                         f"be row-aligned")
    if xy.shape[0] == 0:
        raise MomkdError(f"heat map {out_png}: the slide has no patches, nothing to paint")
    if not (np.isfinite(xy).all() and np.isfinite(att).all()):
        raise MomkdError(f"heat map {out_png}: coords and attention must be finite (found NaN or infinity)")
    if not (patch_size_level0 > 0 and max_side >= 1):
        raise MomkdError(f"heat map {out_png}: patch_size_level0 ({patch_size_level0}) and max_side ({max_side}) "
                         f"must be positive")
    values = normalise_attention(att, normalize)  # (P,) in [0, 1]
    canvas = _paint(xy, values, float(patch_size_level0), int(max_side))  # (H, W)
    height, width = canvas.shape

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig_w, fig_h = width + _COLORBAR_PX, max(height, _MIN_HEIGHT_PX)
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 1.0 - height / fig_h, width / fig_w, height / fig_h))
    ax.set_axis_off()
    colormap = matplotlib.colormaps[cmap].with_extremes(bad=_BACKGROUND)
    image = ax.imshow(np.ma.masked_invalid(canvas), cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest",
                      aspect="auto")
    cax = fig.add_axes(((width + 12) / fig_w, 0.1, 14 / fig_w, 0.8))
    bar = fig.colorbar(image, cax=cax)
    label = "attention (percentile)" if normalize == "rank" else "attention (min-max)"
    bar.set_label(f"{label}: {title}" if title else label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=_DPI)
    log.debug("heat map %s: %d patches on a %dx%d canvas", out_png, xy.shape[0], width, height)
    return out_png
