"""load_site end to end on small synthetic sites (both formats), the slide cache, check_site, and real HEROHE
feature bags converted to TRIDENT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from momkd_fed.config import Config, DataConfig, SiteConfig
from momkd_fed.data.cache import SlideCache
from momkd_fed.data.check import check_federation, check_site, summarize_site
from momkd_fed.data.graph import knn_neighbors
from momkd_fed.data.h5 import write_clam_h5, write_trident_h5
from momkd_fed.data.site import load_site
from momkd_fed.errors import DataError

D = 8


def make_site(root, n_cases=12, genes=("G1", "G2", "G3"), seed=0, split=False, omics=True):
    """A site: cases with 1-2 slides, alternating TRIDENT/CLAM files in nested folders, one unlabelled slide,
    one empty slide, genomics for all but the last case."""
    rng = np.random.default_rng(seed)
    feat_dir = root / "features"
    rows = []
    for i in range(n_cases):
        case = f"CASE-{i:02d}"
        for j in range(1 + (i % 4 == 0)):
            sid = f"{case}-S{j}"
            P = int(rng.integers(5, 40))
            f = rng.normal(size=(P, D)).astype(np.float32)
            c = rng.permutation(np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(-1, 2))[:P] * 256
            sub = feat_dir / f"batch{i % 3}"
            (write_trident_h5 if i % 2 else write_clam_h5)(sub / f"{sid}.h5", f, c)
            rows.append({"case_id": case, "slide_id": sid, "label": ["negative", "positive"][i % 2]})
    rows.append({"case_id": "CASE-XX", "slide_id": "CASE-XX-S0", "label": "Indeterminate"})
    write_trident_h5(feat_dir / "CASE-EM-S0.h5", np.zeros((0, D)), np.zeros((0, 2)))
    rows.append({"case_id": "CASE-EM", "slide_id": "CASE-EM-S0", "label": "positive"})
    df = pd.DataFrame(rows)
    if split:
        def split_of(case):
            if not case[-2:].isdigit() or int(case[-2:]) < n_cases - 4:
                return "train"
            return "val" if int(case[-2:]) % 2 else "test"
        df["split"] = [split_of(c) for c in df.case_id]
    df.to_csv(root / "manifest.csv", index=False)
    om = ""
    if omics:
        cases = [f"CASE-{i:02d}" for i in range(n_cases - 1)]
        pd.DataFrame({"case_id": cases, **{g: rng.normal(size=len(cases)) for g in genes}}).to_csv(
            root / "omics.csv", index=False)
        om = str(root / "omics.csv")
    site = SiteConfig(name="siteA", manifest=str(root / "manifest.csv"), features_dir=str(feat_dir), omics=om)
    cfg = Config(data=DataConfig(feature_dim=D, knn_k=4), sites=[site])
    return site, cfg


def test_load_site(tmp_path):
    site, cfg = make_site(tmp_path)
    data = load_site(site, cfg)
    assert data.name == "siteA" and len(data.bags) == 15  # 12 cases, 3 with two slides
    assert data.genes == ["G1", "G2", "G3"]
    excl = dict(data.excluded)
    assert "Indeterminate" in excl["CASE-XX-S0"] and excl["CASE-EM-S0"] == "empty bag (0 patches)"
    for b in data.bags:
        P = b.num_patches
        assert b.features.shape == (P, D) and b.features.dtype == torch.float32
        assert b.coords.shape == (P, 2) and b.coords.dtype == torch.int64
        assert b.neighbors.shape == (P, min(4, P - 1) + 1) and b.neighbors.dtype == torch.int64
        assert torch.equal(b.neighbors, knn_neighbors(b.coords.numpy(), 4))
        assert b.label == int(b.case_id[-2:]) % 2
        assert (b.omics is None) == (b.case_id == "CASE-11")
        if b.omics is not None:
            assert b.omics.shape == (3,) and b.omics.dtype == torch.float32
    by_case = {}
    for b in data.bags:
        by_case.setdefault(b.case_id, set()).add(b.split)
    assert all(len(s) == 1 for s in by_case.values())
    assert {b.split for b in data.bags} == {"train", "val", "test"}
    summary = summarize_site(data)
    assert "15 slides, 12 patients, 14 with genomics" in summary and "excluded" in summary


def test_manifest_split_column_and_histology_only(tmp_path):
    site, cfg = make_site(tmp_path, split=True, omics=False)
    data = load_site(site, cfg, use_cache=False)
    assert not data.has_omics and data.genes == []
    assert {b.case_id for b in data.split("train")} == {f"CASE-{i:02d}" for i in range(8)}


def test_cache_second_load_identical_and_notices_changes(tmp_path, monkeypatch):
    import momkd_fed.data.cache as cache_module

    parsed: list[str] = []
    real_parse = cache_module.parse_slide

    def counting_parse(path, *args, **kwargs):
        parsed.append(Path(path).stem)
        return real_parse(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "parse_slide", counting_parse)
    site, cfg = make_site(tmp_path, n_cases=30)
    first = load_site(site, cfg)
    n_files = len(list((tmp_path / "features").rglob("*.h5")))
    assert len(parsed) == n_files  # the cold load parses every file once
    parsed.clear()
    second = load_site(site, cfg)
    assert parsed == []  # the warm load parses nothing (speed itself: benchmarks/data_loading.py)
    for a, b in zip(first.bags, second.bags):
        assert a.slide_id == b.slide_id and a.split == b.split
        assert torch.equal(a.features, b.features) and torch.equal(a.coords, b.coords)
        assert torch.equal(a.neighbors, b.neighbors)
    cache_dirs = list((tmp_path / "features" / ".momkd_cache").iterdir())
    assert len(cache_dirs) == 1
    # rewrite one slide with new content: noticed by (size, mtime_ns)
    target = second.bags[3]
    path = next((tmp_path / "features").rglob(f"{target.slide_id}.h5"))
    new = np.full((6, D), 7.0, np.float32)
    write_trident_h5(path, new, np.arange(12).reshape(6, 2) * 256)
    third = load_site(site, cfg)
    assert parsed == [target.slide_id]  # only the changed file is re-parsed
    got = next(b for b in third.bags if b.slide_id == target.slide_id)
    assert torch.equal(got.features, torch.from_numpy(new))
    others = [(a, b) for a, b in zip(first.bags, third.bags) if a.slide_id != target.slide_id]
    assert all(torch.equal(a.features, b.features) for a, b in others)
    # only touching the file (same bytes, new mtime) is noticed too, and re-parsed to the same content
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    cache = SlideCache(tmp_path / "features" / ".momkd_cache", "siteA", tmp_path / "features", D, 4)
    idx = json.loads((cache.dir / "index.json").read_text())
    assert idx["slides"][target.slide_id]["mtime_ns"] != path.stat().st_mtime_ns
    fourth = load_site(site, cfg)
    idx = json.loads((cache.dir / "index.json").read_text())
    assert idx["slides"][target.slide_id]["mtime_ns"] == path.stat().st_mtime_ns
    assert torch.equal(next(b for b in fourth.bags if b.slide_id == target.slide_id).features, got.features)
    segs = {e["seg"] for e in idx["slides"].values()}
    assert {p.name.split(".")[0] for p in cache.dir.glob("seg-*")} == segs  # unreferenced segments deleted


def test_manifest_and_genomics_parsed_once_and_reparsed_when_changed(tmp_path, monkeypatch):
    import momkd_fed.data.table_cache as tables

    calls: list[str] = []
    real_manifest, real_omics = tables.read_manifest, tables.read_omics
    monkeypatch.setattr(tables, "read_manifest", lambda *a, **k: calls.append("manifest") or real_manifest(*a, **k))
    monkeypatch.setattr(tables, "read_omics", lambda *a, **k: calls.append("omics") or real_omics(*a, **k))
    site, cfg = make_site(tmp_path)
    plain = load_site(site, cfg, use_cache=False)
    first = load_site(site, cfg)
    assert calls == ["manifest", "omics"]
    second = load_site(site, cfg)
    assert calls == ["manifest", "omics"]  # read from <cache>/tables, not parsed again
    for data in (first, second):
        assert [(b.slide_id, b.case_id, b.label, b.split) for b in data.bags] == \
            [(b.slide_id, b.case_id, b.label, b.split) for b in plain.bags]
        assert data.genes == plain.genes and data.excluded == plain.excluded
        assert all((a.omics is None and b.omics is None) or torch.equal(a.omics, b.omics)
                   for a, b in zip(data.bags, plain.bags))
    # a changed genomics file and a changed label setting are parsed afresh
    om = pd.read_csv(tmp_path / "omics.csv")
    om["G1"] = 5.0
    om.to_csv(tmp_path / "omics.csv", index=False)
    third = load_site(site, cfg)
    assert calls == ["manifest", "omics", "omics"]
    assert all(float(b.omics[0]) == 5.0 for b in third.bags if b.omics is not None)
    cfg.data.label_map = {"negative": 1, "positive": 0}
    flipped = load_site(site, cfg)
    assert calls[-1] == "manifest" and [b.label for b in flipped.bags] == [1 - b.label for b in third.bags]
    # a fresh process finds both tables in the cache and never imports pandas
    code = ("import sys; from momkd_fed.config import Config, DataConfig, SiteConfig; "
            "from momkd_fed.data.site import load_site; "
            f"s = SiteConfig(name='siteA', manifest={site.manifest!r}, features_dir={site.features_dir!r}, "
            f"omics={site.omics!r}); c = Config(data=DataConfig(feature_dim={D}, knn_k=4, "
            "label_map={'negative': 1, 'positive': 0}), sites=[s]); "
            "d = load_site(s, c); print(len(d.bags), 'pandas' in sys.modules)")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["15", "False"]


def test_corrupt_or_missing_feature_file_is_an_error(tmp_path):
    site, cfg = make_site(tmp_path)
    load_site(site, cfg)  # warm the cache
    victim = next((tmp_path / "features").rglob("CASE-03-S0.h5"))
    victim.write_bytes(b"garbage")
    with pytest.raises(DataError) as ei:
        load_site(site, cfg)
    assert str(victim) in str(ei.value) and "HDF5" in str(ei.value)
    victim.unlink()
    with pytest.raises(DataError) as ei:
        load_site(site, cfg)
    assert "CASE-03-S0" in str(ei.value) and "not found" in str(ei.value)


def test_duplicate_stems_are_an_error(tmp_path):
    site, cfg = make_site(tmp_path)
    src = next((tmp_path / "features").rglob("CASE-01-S0.h5"))
    (tmp_path / "features" / "other").mkdir()
    (tmp_path / "features" / "other" / "CASE-01-S0.h5").write_bytes(src.read_bytes())
    with pytest.raises(DataError, match="has 2 feature files"):
        load_site(site, cfg)


def test_check_site_lists_every_problem(tmp_path):
    site, cfg = make_site(tmp_path)
    assert not [p for p in check_site(site, cfg) if p.level == "error"]
    feats = tmp_path / "features"
    next(feats.rglob("CASE-01-S0.h5")).write_bytes(b"not hdf5")
    write_trident_h5(next(feats.rglob("CASE-02-S0.h5")), np.zeros((5, 1024)), np.zeros((5, 2)))
    next(feats.rglob("CASE-03-S0.h5")).unlink()
    probs = check_site(site, cfg)
    errors = [p for p in probs if p.level == "error"]
    text = "\n".join(map(str, errors))
    assert len(errors) == 3, text
    assert "CASE-01-S0.h5" in text and "CASE-02-S0.h5" in text and "CASE-03-S0" in text
    assert "1024 (UNI" in text and "not a readable HDF5" in text and "not found" in text
    info = [str(p) for p in probs if p.level == "info"]
    assert any("1 slides excluded" in s and "Indeterminate" in s for s in info)
    assert all("\n" not in str(p) for p in probs)


def test_check_federation_gene_panel_mismatch(tmp_path):
    a, cfg = make_site(tmp_path / "a")
    b, _ = make_site(tmp_path / "b", genes=("G1", "G2", "G4"))
    b.name = "siteB"
    cfg.sites = [a, b]
    probs = [p for p in check_federation(cfg) if p.level == "error"]
    assert len(probs) == 1 and "gene panel differs" in probs[0].problem and "G3" in probs[0].problem


def _herohe_dir(shared_data):
    d = shared_data / "features" / "herohe_nuhtc_subset"
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    return d


def test_real_herohe_bags_as_trident(tmp_path, shared_data):
    src = _herohe_dir(shared_data)
    rows = []
    for sid, lab in (("165", "positive"), ("218", "positive"), ("24", "negative"), ("36", "negative")):
        a = np.load(src / f"{sid}.npy")  # (N, 259): x, y, 0, 256 features
        write_trident_h5(tmp_path / "feats" / f"{sid}.h5", a[:, 3:], a[:, :2].astype(np.int64),
                         patch_size_level0=512, encoder="nuhtc")
        rows.append({"case_id": f"H{sid}", "slide_id": sid, "her2": lab})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    site = SiteConfig(name="herohe", manifest=str(tmp_path / "m.csv"), features_dir=str(tmp_path / "feats"))
    cfg = Config(data=DataConfig(feature_dim=256, label_column="her2"), sites=[site])
    data = load_site(site, cfg)
    assert len(data.bags) == 4 and not data.has_omics
    for b in data.bags:
        a = np.load(src / f"{b.slide_id}.npy")
        assert b.features.shape == (a.shape[0], 256) and b.neighbors.shape == (a.shape[0], 9)
        np.testing.assert_array_equal(b.features.numpy(), a[:, 3:])
        assert b.patch_size_level0 == 512
        # on a 512-px grid, an interior patch's 8 neighbours are its ring: within one diagonal step
        d = (b.coords[b.neighbors[:, 1:]] - b.coords[:, None, :]).abs().max(-1).values  # (P, 8)
        assert (d.min(1).values == 512).float().mean() > 0.9
    assert not [p for p in check_site(site, cfg) if p.level == "error"]


def test_stored_edge_index_used_when_k8_else_rebuilt(tmp_path, caplog):
    rng = np.random.default_rng(1)
    coords = rng.permutation(np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2))[:30] * 512
    nb = knn_neighbors(coords, 8)
    ei = np.stack([np.arange(30).repeat(8), nb[:, 1:].flatten().numpy()])
    feats = tmp_path / "f"
    write_trident_h5(feats / "good.h5", rng.normal(size=(30, D)), coords, edge_index=ei)
    write_trident_h5(feats / "ragged.h5", rng.normal(size=(30, D)), coords, edge_index=ei[:, 3:])
    pd.DataFrame({"case_id": ["a", "b"], "slide_id": ["good", "ragged"], "label": [0, 1]}).to_csv(
        tmp_path / "m.csv", index=False)
    site = SiteConfig(name="s", manifest=str(tmp_path / "m.csv"), features_dir=str(feats))
    cfg = Config(data=DataConfig(feature_dim=D, knn_k=8), sites=[site])
    with caplog.at_level("WARNING"):
        data = load_site(site, cfg, use_cache=False)
    assert all(torch.equal(b.neighbors, nb) for b in data.bags)
    assert any("ragged.h5" in r.getMessage() and "building the graph from coords" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow  # two fresh Python processes (torch import) on a shared machine: ~15 s
def test_concurrent_cold_loads_do_not_corrupt_the_cache(tmp_path):
    import subprocess
    import sys
    site, cfg = make_site(tmp_path, n_cases=20)
    code = ("import sys; from momkd_fed.config import Config, DataConfig, SiteConfig; "
            "from momkd_fed.data.site import load_site; "
            f"s = SiteConfig(name='siteA', manifest={site.manifest!r}, features_dir={site.features_dir!r}, "
            f"omics={site.omics!r}); "
            f"d = load_site(s, Config(data=DataConfig(feature_dim={D}, knn_k=4), sites=[s])); "
            "print(sum(float(b.features.sum()) for b in d.bags))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    data = load_site(site, cfg)
    ref = sum(float(b.features.sum()) for b in data.bags)
    assert all(float(o[0].strip()) == pytest.approx(ref, rel=1e-6) for o in outs)
