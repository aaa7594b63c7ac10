"""Load one site: manifest -> feature files -> slides and graphs (cached) -> genomics -> splits -> Bags."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..config import Config, SiteConfig
from ..errors import DataError
from .bag import Bag, SiteData
from .cache import SlideCache, load_slides
from .manifest import Manifest, read_manifest
from .omics import Omics, read_omics
from .splits import patient_splits
from .table_cache import cached_manifest, cached_omics

log = logging.getLogger(__name__)

CACHE_FOLDER = ".momkd_cache"  # default cache folder inside features_dir


def index_feature_files(features_dir: str | Path) -> dict[str, list[Path]]:
    """Every ``*.h5`` under ``features_dir`` (recursive, one walk), by stem; the cache folder is skipped.

    Returns
    -------
    dict stem -> list of paths (more than one path = an ambiguous slide id).
    """
    root = Path(os.path.abspath(features_dir))  # absolute: cache entries and messages name one path per file
    if not root.is_dir():
        raise DataError(str(root), "features_dir not found or not a folder",
                        "set the site's features_dir to the folder holding <slide_id>.h5 files")
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != CACHE_FOLDER)
        for fn in sorted(filenames):
            if fn.endswith(".h5"):
                found.setdefault(fn[:-3], []).append(Path(dirpath) / fn)
    return found


def resolve_feature_files(features_dir: str | Path, slide_ids: list[str]) -> tuple[dict[str, Path], list[DataError]]:
    """Map each slide id to its one .h5 file; problems (missing, ambiguous) are returned, not raised."""
    found = index_feature_files(features_dir)
    files: dict[str, Path] = {}
    problems: list[DataError] = []
    for sid in slide_ids:
        paths = found.get(sid, [])
        if not paths:
            problems.append(DataError(os.path.join(os.path.abspath(features_dir), f"{sid}.h5"),
                                      f"feature file for slide {sid!r} not found under features_dir",
                                      "extract features for this slide or remove it from the manifest"))
        elif len(paths) > 1:
            problems.append(DataError(str(paths[0]), f"slide {sid!r} has {len(paths)} feature files: "
                                                     f"{[str(p) for p in paths]}",
                                      "point features_dir at one encoder's folder (e.g. features_uni_v2/)"))
        else:
            files[sid] = paths[0]
    return files, problems


def site_cache(site: SiteConfig, cfg: Config) -> SlideCache:
    """The site's slide cache (``data.cache_dir`` or ``<features_dir>/.momkd_cache``)."""
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(site.features_dir) / CACHE_FOLDER
    return SlideCache(root, site.name, Path(site.features_dir), cfg.data.feature_dim, cfg.data.knn_k)


def assign_splits(manifest: Manifest, cfg: Config, slide_ids: list[str] | None = None) -> dict[str, str]:
    """slide_id -> split: the manifest's split column when present, else patient-level stratified splits over
    ``slide_ids`` (default: every labelled slide)."""
    keep = set(slide_ids) if slide_ids is not None else None
    rows = [r for r in manifest.rows if keep is None or r.slide_id in keep]
    if manifest.has_split:
        return {r.slide_id: r.split or "train" for r in rows}
    by_case = patient_splits([r.case_id for r in rows], [r.label for r in rows], cfg.split.val_fraction,
                             cfg.split.test_fraction, cfg.split.seed)
    return {r.slide_id: by_case[r.case_id] for r in rows}


def load_site(site: SiteConfig, cfg: Config, use_cache: bool = True) -> SiteData:
    """Everything one site trains and evaluates on.

    Parameters
    ----------
    site : the site's paths (manifest, features_dir, optional omics).
    cfg : the federation config (label column/map, feature_dim, knn_k, gene panel, splits, cache_dir).
    use_cache : read/write the site-local slide cache (see :mod:`momkd_fed.data.cache`) and the parsed manifest
        and genomics beside it (:mod:`momkd_fed.data.table_cache`).

    Returns
    -------
    SiteData with one Bag per labelled, non-empty slide. Omics vectors are raw (after the optional log2(x+1));
    cases without genomics get ``omics=None``. Unlabelled and empty slides are in ``excluded`` with the reason.

    Raises
    ------
    DataError for a missing/invalid manifest, features_dir or genomics, and for a missing, ambiguous or corrupt
    feature file of a labelled slide (never substituted).
    """
    cache = site_cache(site, cfg) if use_cache else None
    if cache is not None:  # parsed tables from the cache folder (no pandas in a process that finds them there)
        manifest = cached_manifest(cache.dir, site.manifest, cfg.data.label_column, cfg.data.label_map,
                                   site.split_column)
    else:
        manifest = read_manifest(site.manifest, cfg.data.label_column, cfg.data.label_map, site.split_column)
    files, problems = resolve_feature_files(site.features_dir, [r.slide_id for r in manifest.rows])
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more feature-file problems; run momkd-fed check-data)" \
            if len(problems) > 1 else ""
        raise DataError(first.path, first.problem + more, first.fix)
    slides = load_slides(files, cfg.data.feature_dim, cfg.data.knn_k, cache)
    omics: Omics | None = None
    if site.omics:
        omics = (cached_omics(cache.dir, site.omics, cfg.data.gene_panel, cfg.data.omics_log1p) if cache is not None
                 else read_omics(site.omics, cfg.data.gene_panel, cfg.data.omics_log1p))

    excluded = list(manifest.excluded)
    usable = []
    for r in manifest.rows:
        if slides[r.slide_id].features.shape[0] == 0:
            excluded.append((r.slide_id, "empty bag (0 patches)"))
        else:
            usable.append(r.slide_id)
    splits = assign_splits(manifest, cfg, usable)
    bags = []
    n_paired = 0
    for r in manifest.rows:
        if r.slide_id not in splits:
            continue
        ps = slides[r.slide_id]
        vec = omics.by_case.get(r.case_id) if omics is not None else None
        n_paired += vec is not None
        bags.append(Bag(slide_id=r.slide_id, case_id=r.case_id, label=r.label, features=ps.features,
                        coords=ps.coords, neighbors=ps.neighbors,
                        omics=torch.from_numpy(vec.copy()) if vec is not None else None,
                        patch_size_level0=ps.patch_size_level0, split=splits[r.slide_id]))
    if omics is not None and n_paired == 0:
        raise DataError(site.omics, f"no manifest case has genomics ({len(omics.by_case)} cases in the file, e.g. "
                                    f"{sorted(omics.by_case)[:3]}; manifest cases e.g. {manifest.case_ids[:3]})",
                        "use the same case ids (TCGA: the first 12 characters of the slide id) in both files")
    log.info("site %s: %d slides (%d with genomics), %d excluded", site.name, len(bags), n_paired, len(excluded))
    return SiteData(name=site.name, bags=bags, genes=list(omics.genes) if omics is not None else [],
                    excluded=excluded)
