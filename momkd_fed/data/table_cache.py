"""A site's manifest and genomics table, parsed once and kept in its slide cache folder.

A deployed site starts a fresh process for every Flower message, and every message loads the site. The slides come
from the slide cache (:mod:`momkd_fed.data.cache`: one JSON read and a few mmaps); the manifest and the genomics
table were parsed from CSV by pandas each time: importing pandas alone costs 0.5-1 s, and a 768-gene RNA-seq
table (tcga-brca) 1-2 s more on a loaded 2-core machine. Here each is parsed once and stored beside the slide
cache (``<cache>/tables/manifest.json``, ``<cache>/tables/omics.npz``, no pickle), keyed on the source's path,
size and modification time (every file's, for a folder of ``.npy`` vectors) and the settings that shape the
result; a changed source or setting is parsed afresh, exactly as :func:`~momkd_fed.data.manifest.read_manifest` /
:func:`~momkd_fed.data.omics.read_omics` would (their errors propagate; nothing is cached then). Files are
replaced atomically (temp + rename), so a reader never sees half of one; when the folder cannot be written the
table is parsed without a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np

from .manifest import Manifest, ManifestRow, read_manifest
from .omics import Omics, read_omics

log = logging.getLogger(__name__)

TABLES_FOLDER = "tables"  # inside the site's slide cache folder
FORMAT = 1  # bump when the stored layout changes


def _source_stat(path: Path) -> list:
    """(name, size, mtime_ns) of the file, or of every file in the folder: what changes when the source does."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()]
    st = path.stat()
    return [[str(path), st.st_size, st.st_mtime_ns]]


def _key(kind: str, path: Path, settings: dict) -> str:
    doc = [FORMAT, kind, str(Path(os.path.abspath(path))), _source_stat(path), settings]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _replace(folder: Path, name: str, write) -> None:
    """``write(tmp_path)``, then rename over ``folder/name``; OSError (read-only folder, full disk) is logged."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        write(tmp)
        os.replace(tmp, folder / name)
    except OSError as exc:
        log.warning("site table cache %s not writable (%s); the table is parsed in every process", folder, exc)


def cached_manifest(cache_dir: Path, path: str | Path, label_column: str, label_map: dict[str, int],
                    split_column: str = "split") -> Manifest:
    """:func:`~momkd_fed.data.manifest.read_manifest`, through ``cache_dir/tables/manifest.json``."""
    folder = Path(cache_dir) / TABLES_FOLDER
    try:
        key = _key("manifest", Path(path), {"label": label_column, "map": label_map, "split": split_column})
    except OSError:  # the manifest is missing: read_manifest says so, with the fix
        return read_manifest(path, label_column, label_map, split_column)
    try:
        doc = json.loads((folder / "manifest.json").read_text())
        if doc.get("key") == key:
            return Manifest(path=doc["path"], rows=[ManifestRow(*r) for r in doc["rows"]],
                            excluded=[tuple(e) for e in doc["excluded"]], has_split=bool(doc["has_split"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    m = read_manifest(path, label_column, label_map, split_column)
    doc = {"key": key, "path": m.path, "rows": [[r.case_id, r.slide_id, r.label, r.split] for r in m.rows],
           "excluded": [list(e) for e in m.excluded], "has_split": m.has_split}
    _replace(folder, "manifest.json", lambda tmp: tmp.write_text(json.dumps(doc)))
    return m


def cached_omics(cache_dir: Path, path: str | Path, gene_panel: list[str] | None = None,
                 log1p: bool = False) -> Omics:
    """:func:`~momkd_fed.data.omics.read_omics`, through ``cache_dir/tables/omics.npz`` (float32 values (N, G),
    case ids (N,), genes (G,), the key)."""
    folder = Path(cache_dir) / TABLES_FOLDER
    try:
        key = _key("omics", Path(path), {"panel": list(gene_panel or []), "log1p": bool(log1p)})
    except OSError:  # missing: read_omics says so, with the fix
        return read_omics(path, gene_panel, log1p)
    try:
        with np.load(folder / "omics.npz", allow_pickle=False) as z:
            if str(z["key"]) == key:
                values = z["values"]  # (N, G) float32
                return Omics(genes=[str(g) for g in z["genes"]],
                             by_case={str(c): values[i].copy() for i, c in enumerate(z["cases"])})
    except (OSError, ValueError, KeyError):
        pass
    om = read_omics(path, gene_panel, log1p)
    cases = list(om.by_case)
    values = (np.stack([om.by_case[c] for c in cases]).astype(np.float32) if cases
              else np.zeros((0, len(om.genes)), np.float32))  # (N, G)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.asarray(key), values=values, cases=np.asarray(cases, dtype=str),
                     genes=np.asarray(om.genes, dtype=str))

    _replace(folder, "omics.npz", write)
    return om
