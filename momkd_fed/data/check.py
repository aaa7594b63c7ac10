"""Data validation for ``momkd-fed check-data``: list every problem of a site (or a federation), not the first."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, SiteConfig
from ..errors import DataError
from .bag import SPLITS, SiteData
from .cache import load_slides
from .manifest import UNKNOWN_LABEL, Manifest, read_manifest
from .omics import Omics, read_omics
from .site import assign_splits, resolve_feature_files, site_cache

LEVELS = ("error", "warning", "info")  # error: the site cannot train; warning: it can, but look; info: counts


@dataclass
class Problem:
    """One finding: where (file, config field), what, and what to do."""

    file: str
    field: str
    problem: str
    fix: str = ""
    level: str = "error"  # one of LEVELS

    def __str__(self) -> str:
        s = f"{self.level.upper()} {self.file} [{self.field}]: {self.problem}"
        return s + (f" (fix: {self.fix})" if self.fix else "")


@dataclass
class _Facts:
    """What check_federation needs from each site."""

    genes: list[str] = field(default_factory=list)
    train_counts: Counter = field(default_factory=Counter)  # class -> training slides


def _from_error(exc: DataError, fld: str, level: str = "error") -> Problem:
    return Problem(file=exc.path, field=fld, problem=exc.problem, fix=exc.fix, level=level)


def _check_site(site: SiteConfig, cfg: Config) -> tuple[list[Problem], _Facts]:
    out: list[Problem] = []
    facts = _Facts()
    pre = f"sites[{site.name}]"
    manifest: Manifest | None = None
    if not site.manifest:
        out.append(Problem("<config>", f"{pre}.manifest", "no manifest set", "set the site's manifest CSV"))
    else:
        try:
            manifest = read_manifest(site.manifest, cfg.data.label_column, cfg.data.label_map, site.split_column)
        except DataError as exc:
            out.append(_from_error(exc, f"{pre}.manifest"))
    features_ok = bool(site.features_dir) and Path(site.features_dir).is_dir()
    if not features_ok:
        out.append(Problem(site.features_dir or "<config>", f"{pre}.features_dir", "features_dir not found",
                           "set it to the folder holding <slide_id>.h5 files"))
    omics: Omics | None = None
    if site.omics:
        try:
            omics = read_omics(site.omics, cfg.data.gene_panel, cfg.data.omics_log1p)
            facts.genes = list(omics.genes)
        except DataError as exc:
            out.append(_from_error(exc, f"{pre}.omics"))
    if manifest is None:
        return out, facts

    for reason, n in sorted(Counter(r for _, r in manifest.excluded).items()):
        if reason.startswith(UNKNOWN_LABEL):
            out.append(Problem(manifest.path, cfg.data.label_column, f"{n} slides have an {reason}",
                               "add the value to data.label_map, or correct the manifest"))
        else:
            out.append(Problem(manifest.path, cfg.data.label_column, f"{n} slides excluded: {reason}",
                               level="info"))
    if not manifest.rows:
        out.append(Problem(manifest.path, cfg.data.label_column,
                           f"no slide has a label in data.label_map {sorted(cfg.data.label_map)}",
                           "set data.label_column / data.label_map to the manifest's values"))
        return out, facts
    if not features_ok:
        return out, facts

    files, missing = resolve_feature_files(site.features_dir, [r.slide_id for r in manifest.rows])
    out.extend(_from_error(e, f"{pre}.features_dir") for e in missing)
    errors: list[DataError] = []
    slides = load_slides(files, cfg.data.feature_dim, cfg.data.knn_k, site_cache(site, cfg), errors)
    out.extend(_from_error(e, f"{pre}.features_dir") for e in errors)
    empty = [s for s, ps in slides.items() if ps.features.shape[0] == 0]
    if empty:
        out.append(Problem(site.features_dir, f"{pre}.features_dir", f"{len(empty)} empty slides (0 patches) "
                                                                       f"excluded, e.g. {empty[:3]}", level="info"))
    usable = [r.slide_id for r in manifest.rows if r.slide_id in slides and r.slide_id not in empty]

    if omics is not None:
        cases = {r.case_id for r in manifest.rows}
        paired = cases & set(omics.by_case)
        if not paired:
            out.append(Problem(site.omics, f"{pre}.omics", "no manifest case has genomics",
                               "use the same case ids in the manifest and the genomics file"))
        elif len(paired) < len(cases):
            out.append(Problem(site.omics, f"{pre}.omics", f"{len(cases) - len(paired)} of {len(cases)} labelled "
                                                             "cases have no genomics (trained histology-only)",
                               level="info"))

    splits = assign_splits(manifest, cfg, usable)
    label = {r.slide_id: r.label for r in manifest.rows}
    counts = Counter((splits[s], label[s]) for s in usable)
    facts.train_counts = Counter({y: counts[("train", y)] for y in (0, 1)})
    for y in (0, 1):
        if counts[("train", y)] == 0:
            out.append(Problem(manifest.path, cfg.data.label_column, f"no training slides of class {y}",
                               "the site still trains, but cannot learn this class locally; check the labels",
                               level="warning"))
        for s in ("val", "test"):
            if usable and counts[(s, y)] == 0:
                out.append(Problem(manifest.path, site.split_column, f"no {s} slides of class {y} "
                                                                      f"({s} AUC will be NaN)", level="warning"))
    return out, facts


def check_site(site: SiteConfig, cfg: Config) -> list[Problem]:
    """Every problem of one site: paths, manifest, labels, each bad .h5, genomics, split composition.

    Errors mean the site cannot take part; warnings and infos (e.g. counts of excluded slides) do not.
    """
    return _check_site(site, cfg)[0]


def check_federation(cfg: Config) -> list[Problem]:
    """Every site's problems plus federation-wide ones (no sites, gene panels that differ between paired sites,
    a class with no training slides anywhere)."""
    if not cfg.sites:
        return [Problem("<config>", "sites", "no sites configured", "add at least one site")]
    out: list[Problem] = []
    genes: dict[str, list[str]] = {}
    total: Counter = Counter()
    for site in cfg.sites:
        probs, facts = _check_site(site, cfg)
        out.extend(probs)
        if facts.genes:
            genes[site.name] = facts.genes
        total += facts.train_counts
    panels = {tuple(g) for g in genes.values()}
    if len(panels) > 1:
        ref_site, ref = next(iter(genes.items()))
        for name, g in genes.items():
            if g != ref:
                diff = sorted(set(g) ^ set(ref))
                what = f"{len(diff)} genes differ, e.g. {diff[:5]}" if diff else "same genes, different order"
                out.append(Problem(next(s.omics for s in cfg.sites if s.name == name), f"sites[{name}].omics",
                                   f"gene panel differs from site {ref_site!r}: {what}",
                                   "set data.gene_panel to the genes every paired site shares"))
    if not any(p.level == "error" for p in out):
        for y in (0, 1):
            if total[y] == 0:
                out.append(Problem("<federation>", cfg.data.label_column, f"no site has training slides of class {y}",
                                   "check data.label_column and data.label_map"))
    return out


def summarize_site(data: SiteData) -> str:
    """A few lines for a clean site: slides, patients, paired, per split per class, excluded counts."""
    patients = {b.case_id for b in data.bags}
    paired = sum(b.omics is not None for b in data.bags)
    lines = [f"site {data.name}: {len(data.bags)} slides, {len(patients)} patients, {paired} with genomics"
             + (f" ({len(data.genes)} genes)" if data.genes else "")]
    for s in SPLITS:
        bags = data.split(s)
        c = Counter(b.label for b in bags)
        lines.append(f"  {s:<5} {len(bags):>5} slides  class0 {c[0]:>5}  class1 {c[1]:>5}")
    if data.excluded:
        reasons = Counter(r for _, r in data.excluded)
        lines.append("  excluded: " + "; ".join(f"{n} {r}" for r, n in sorted(reasons.items())))
    return "\n".join(lines)
