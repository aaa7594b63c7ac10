"""Site-local cache of parsed slides, so a process that starts fresh every round does not re-parse every .h5.

Layout of one cache (``<cache_root>/<site>-<hash>/``, hash over features_dir, feature_dim, knn_k, version):

- ``index.json``: for every slide its source file's (path, size, mtime_ns), the segment and row it lives in, its
  patch count P, graph width W = k_eff + 1, ``patch_size_level0`` and format;
- ``seg-<id>.feat`` / ``.coords`` / ``.nbr``: raw float32 (N, D), int64 (N, 2) and int64 (N, knn_k + 1) arrays
  (neighbour rows padded with -1), the slides of one segment stacked row-wise.

Loading maps the segments (copy-on-write) and hands out per-slide views, so a cached load costs one JSON read
and a few mmaps; pages are read when the engine touches them. A slide whose source file changed (size or
mtime), was added, or was removed is noticed by a stat; only those slides are parsed, into a new segment.
Writers serialise on an ``flock``; segments are complete before the index that names them is atomically
replaced (temp + rename), so readers never see a half-written cache; unreferenced segments are deleted under the
lock, and a reader that loses that race re-reads the index.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import DataError
from .graph import knn_neighbors, neighbors_from_edge_index
from .h5 import read_slide_h5

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the parsed content or the layout changes
MAX_SEGMENTS = 8  # more segments than this (or over half the rows dead) -> rewrite into one


@dataclass
class ParsedSlide:
    """One slide after reading, validation and graph building.

    Attributes
    ----------
    features : (P, D) float32
    coords : (P, 2) int64
    neighbors : (P, k_eff + 1) int64, column 0 = self
    patch_size_level0 : int (0 = unknown)
    fmt : "trident" or "clam"
    """

    features: torch.Tensor
    coords: torch.Tensor
    neighbors: torch.Tensor
    patch_size_level0: int = 0
    fmt: str = "clam"


def parse_slide(path: Path, feature_dim: int, knn_k: int) -> ParsedSlide:
    """Read and validate one .h5 and build its graph (stored ``edge_index_k8`` when knn_k == 8, else kNN).

    A stored graph that cannot form a dense k-regular index is replaced by the kNN graph from coords, with a
    warning (see :func:`~momkd_fed.data.graph.neighbors_from_edge_index`).
    """
    sf = read_slide_h5(path, feature_dim)
    nbr = None
    if sf.edge_index is not None and knn_k == 8:
        try:
            nbr = neighbors_from_edge_index(sf.edge_index, sf.num_patches, knn_k, coords=sf.coords, path=str(path))
        except DataError as exc:
            log.warning("%s; building the graph from coords instead", exc)
    if nbr is None:
        nbr = knn_neighbors(sf.coords, knn_k)  # (P, k_eff + 1)
    return ParsedSlide(features=torch.from_numpy(sf.features), coords=torch.from_numpy(sf.coords), neighbors=nbr,
                       patch_size_level0=sf.patch_size_level0, fmt=sf.fmt)


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


class SlideCache:
    """One site's cache folder. See the module docstring for the layout and the concurrency rules."""

    def __init__(self, root: Path, site: str, features_dir: Path, feature_dim: int, knn_k: int) -> None:
        key = json.dumps([str(Path(features_dir).resolve()), feature_dim, knn_k, CACHE_VERSION])
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", site) or "site"
        self.dir = Path(root) / f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        self.feature_dim = int(feature_dim)
        self.width = int(knn_k) + 1
        self.knn_k = int(knn_k)

    # -- index ---------------------------------------------------------------------------------------------------
    def _read_index(self) -> dict:
        try:
            idx = json.loads((self.dir / "index.json").read_text())
        except (OSError, ValueError):
            return {"segments": {}, "slides": {}}
        if idx.get("version") != CACHE_VERSION or idx.get("feature_dim") != self.feature_dim \
                or idx.get("width") != self.width:
            return {"segments": {}, "slides": {}}
        return idx

    def _write_index(self, idx: dict) -> None:
        idx.update(version=CACHE_VERSION, feature_dim=self.feature_dim, width=self.width)
        tmp = self.dir / f"index.json.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json.dumps(idx))
        os.replace(tmp, self.dir / "index.json")

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / "lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _seg_paths(self, name: str) -> tuple[Path, Path, Path]:
        return self.dir / f"{name}.feat", self.dir / f"{name}.coords", self.dir / f"{name}.nbr"

    def _map(self, name: str, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copy-on-write maps of one segment: (N, D) float32, (N, 2) int64, (N, W) int64."""
        fp, cp, np_ = self._seg_paths(name)
        shapes = ((fp, np.float32, self.feature_dim), (cp, np.int64, 2), (np_, np.int64, self.width))
        out = []
        for path, dtype, cols in shapes:
            expected = rows * cols * np.dtype(dtype).itemsize
            if path.stat().st_size != expected:
                raise FileNotFoundError(f"{path}: size {path.stat().st_size} != {expected}")
            out.append(np.zeros((0, cols), dtype) if rows == 0 else
                       np.memmap(path, dtype=dtype, mode="c", shape=(rows, cols)))
        return out[0], out[1], out[2]

    def _hits(self, idx: dict, files: dict[str, Path], stats: dict[str, tuple[int, int]]) -> set[str]:
        hits = set()
        for sid, path in files.items():
            e = idx["slides"].get(sid)
            if e and e["path"] == str(path) and (e["size"], e["mtime_ns"]) == stats[sid] \
                    and e["seg"] in idx["segments"]:
                hits.add(sid)
        return hits

    def _views(self, idx: dict, wanted: list[str]) -> dict[str, ParsedSlide]:
        maps = {}
        out = {}
        for sid in wanted:
            e = idx["slides"][sid]
            if e["seg"] not in maps:
                maps[e["seg"]] = self._map(e["seg"], idx["segments"][e["seg"]])
            feat, coords, nbr = maps[e["seg"]]
            r, n = e["row"], e["P"]
            out[sid] = ParsedSlide(features=torch.from_numpy(feat[r:r + n]),  # (P, D)
                                   coords=torch.from_numpy(coords[r:r + n]),  # (P, 2)
                                   neighbors=torch.from_numpy(np.ascontiguousarray(nbr[r:r + n, :e["W"]])),
                                   patch_size_level0=e["psl0"], fmt=e["fmt"])
        return out

    # -- public --------------------------------------------------------------------------------------------------
    def load(self, files: dict[str, Path], errors: list[DataError] | None = None) -> dict[str, ParsedSlide]:
        """Parsed slides for ``files`` (slide_id -> .h5 path), from the cache where the source is unchanged.

        Parameters
        ----------
        errors : None = raise the first DataError; a list = append each bad file's DataError and skip it.
        """
        stats = {sid: _stat(p) for sid, p in files.items()}
        for _ in range(3):
            idx = self._read_index()
            if len(self._hits(idx, files, stats)) == len(files):
                try:
                    return self._views(idx, list(files))
                except (FileNotFoundError, KeyError):
                    continue  # a writer replaced the index under us, or a segment is damaged: re-read / rebuild
            break
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            idx = self._read_index()
            for seg, rows in list(idx["segments"].items()):  # drop damaged segments (e.g. a full disk earlier)
                try:
                    self._map(seg, rows)
                except (FileNotFoundError, ValueError, OSError):
                    del idx["segments"][seg]
            hits = self._hits(idx, files, stats)
            misses = [sid for sid in files if sid not in hits]
            if misses:
                log.info("%s: parsing %d of %d slides (cache %s)", self.dir, len(misses), len(files), self.dir.name)
            live_rows = sum(idx["slides"][s]["P"] for s in hits)
            seg_rows = sum(idx["segments"].values())
            compact = len(idx["segments"]) >= MAX_SEGMENTS or seg_rows > 2 * max(live_rows, 1)
            new_entries, seg, rows = self._write_segment(idx, files, stats, hits if compact else set(),
                                                         misses, errors)
            slides = {} if compact else {s: idx["slides"][s] for s in hits}
            slides.update(new_entries)
            segments = {s: idx["segments"][s] for s in {e["seg"] for e in slides.values()} if s in idx["segments"]}
            if seg is not None:
                segments[seg] = rows
            new_idx = {"segments": segments, "slides": slides}
            self._write_index(new_idx)
            self._collect_garbage(set(segments))
            return self._views(new_idx, [s for s in files if s in slides])

    def _write_segment(self, idx: dict, files: dict[str, Path], stats: dict, copy: set[str], parse: list[str],
                       errors: list[DataError] | None) -> tuple[dict, str | None, int]:
        """Write slides ``copy`` (from existing segments) and ``parse`` (from their .h5) into one new segment."""
        if not copy and not parse:
            return {}, None, 0
        name = f"seg-{uuid.uuid4().hex[:12]}"
        entries: dict[str, dict] = {}
        row = 0
        old = self._views(idx, sorted(copy)) if copy else {}
        fp, cp, np_ = self._seg_paths(name)
        with open(fp, "wb") as ff, open(cp, "wb") as fc, open(np_, "wb") as fn:
            for sid in [s for s in files if s in copy or s in parse]:
                if sid in old:
                    ps = old[sid]
                else:
                    try:
                        ps = parse_slide(files[sid], self.feature_dim, self.knn_k)
                    except DataError as exc:
                        if errors is None:
                            raise
                        errors.append(exc)
                        continue
                n, w = ps.neighbors.shape
                pad = np.full((n, self.width), -1, dtype=np.int64)  # (P, knn_k + 1)
                pad[:, :w] = ps.neighbors.numpy()
                ff.write(np.ascontiguousarray(ps.features.numpy(), dtype=np.float32).tobytes())
                fc.write(np.ascontiguousarray(ps.coords.numpy(), dtype=np.int64).tobytes())
                fn.write(pad.tobytes())
                size, mtime = stats[sid]
                entries[sid] = {"path": str(files[sid]), "size": size, "mtime_ns": mtime, "seg": name, "row": row,
                                "P": n, "W": w, "psl0": ps.patch_size_level0, "fmt": ps.fmt}
                row += n
            for fh in (ff, fc, fn):
                fh.flush()
                os.fsync(fh.fileno())
        return entries, name, row

    def _collect_garbage(self, keep: set[str]) -> None:
        for p in self.dir.iterdir():
            if p.name.startswith("seg-") and p.name.split(".")[0] not in keep:
                p.unlink(missing_ok=True)
            elif p.name.startswith("index.json.") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)


def load_slides(files: dict[str, Path], feature_dim: int, knn_k: int, cache: SlideCache | None = None,
                errors: list[DataError] | None = None) -> dict[str, ParsedSlide]:
    """Parsed slides, through ``cache`` when given (falls back to parsing, with a warning, when the cache folder
    cannot be written). ``errors``: as in :meth:`SlideCache.load`."""
    if cache is not None:
        n_err = len(errors) if errors is not None else 0
        try:
            return cache.load(files, errors)
        except OSError as exc:  # read-only features folder, full disk: the cache is an optimisation only
            log.warning("slide cache %s not usable (%s); parsing without a cache", cache.dir, exc)
            if errors is not None:
                del errors[n_err:]
    out = {}
    for sid, path in files.items():
        try:
            out[sid] = parse_slide(path, feature_dim, knn_k)
        except DataError as exc:
            if errors is None:
                raise
            errors.append(exc)
    return out
