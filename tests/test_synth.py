"""Synthetic cohorts: determinism, on-disk formats, realism checks of the generative model, presets."""

from __future__ import annotations

import filecmp
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from momkd_fed.config import load_config
from momkd_fed.errors import ConfigError
from momkd_fed.synth import make_preset, synthesize
from momkd_fed.synth import tiny as tiny_preset
from momkd_fed.synth.generator import HistologyModel, stable_rng

COORD_ATTRS = {"patch_size": np.integer, "patch_size_level0": np.integer, "level0_magnification": np.integer,
               "target_magnification": np.integer, "overlap": np.integer, "name": str, "level0_width": np.integer,
               "level0_height": np.integer}


def shared_data() -> Path:
    env = os.environ.get("MOMKD_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("tiny")
    start = time.perf_counter()
    synthesize("tiny", out, seed=0)
    return out, time.perf_counter() - start


def _h5_files(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*.h5"))}


def _slide_table(out: Path) -> pd.DataFrame:
    """One row per slide: site, label, slide-mean feature (tiny preset)."""
    cfg = yaml.safe_load((out / "federation.yaml").read_text())
    rows = []
    for s in cfg["sites"]:
        man = pd.read_csv(out / s["manifest"], dtype=str, keep_default_na=False)
        files = {p.stem: p for p in (out / s["features_dir"]).rglob("*.h5")}
        for r in man.itertuples():
            with h5py.File(files[r.slide_id], "r") as f:
                rows.append({"site": s["name"], "label": r.label, "mean": f["features"][:].mean(axis=0)})
    return pd.DataFrame(rows)


def test_tiny_is_fast_and_yaml_loads(tiny):
    out, seconds = tiny
    assert seconds < 10.0, f"tiny generation took {seconds:.1f} s"  # ~2 s for its 300 slides on an idle core
    cfg = load_config(out / "federation.yaml")
    assert [s.name for s in cfg.sites] == ["hospital_a", "hospital_b", "hospital_c"]
    assert cfg.data.feature_dim == 32 and cfg.model.hidden_dim == 64 and cfg.memory.slots == 8
    assert cfg.federation.min_sites == 3 and cfg.federation.rounds == 3
    for s in cfg.sites:
        assert Path(s.manifest).is_file() and Path(s.features_dir).is_dir()
        assert (s.omics == "") == (s.name == "hospital_c")
    assert (out / "federation.yaml").read_text().startswith("# momkd-fed synthetic federation")


def test_tiny_deterministic(tiny, tmp_path):
    out, _ = tiny
    again, other = tmp_path / "again", tmp_path / "other"
    synthesize("tiny", again, seed=0)
    synthesize("tiny", other, seed=1)
    for name in ["federation.yaml", "hospital_a/manifest.csv", "hospital_a/omics.csv", "hospital_c/manifest.csv"]:
        assert filecmp.cmp(out / name, again / name, shallow=False), name
    assert not filecmp.cmp(out / "hospital_a/omics.csv", other / "hospital_a/omics.csv", shallow=False)
    a, b = _h5_files(out), _h5_files(again)
    assert a.keys() == b.keys()
    for key in a:
        with h5py.File(a[key], "r") as fa, h5py.File(b[key], "r") as fb:
            np.testing.assert_array_equal(fa["features"][:], fb["features"][:])
            np.testing.assert_array_equal(fa["coords"][:], fb["coords"][:])
    key = next(k for k in a if k in _h5_files(other))
    with h5py.File(a[key], "r") as fa, h5py.File(_h5_files(other)[key], "r") as fo:
        assert fa["features"].shape != fo["features"].shape or not np.array_equal(fa["features"][:], fo["features"][:])


def test_tiny_formats(tiny):
    out, _ = tiny
    mags = []
    for site in ["hospital_a", "hospital_b", "hospital_c"]:
        man = pd.read_csv(out / site / "manifest.csv", dtype=str, keep_default_na=False)
        assert list(man.columns) == ["case_id", "slide_id", "label", "split"]
        assert 80 <= len(man) <= 125
        assert set(man["split"]) == {"train", "val", "test"}
        fdir = out / site / "features" / "20x_256px_0px_overlap" / "features_synthetic"
        assert sorted(p.stem for p in fdir.glob("*.h5")) == sorted(man["slide_id"])
        for slide in man["slide_id"]:
            with h5py.File(fdir / f"{slide}.h5", "r") as f:
                feats, coords = f["features"], f["coords"]
                assert feats.dtype == np.float32 and feats.shape[1] == 32 and 30 <= feats.shape[0] <= 200
                assert coords.dtype == np.int64 and coords.shape == (feats.shape[0], 2)
                assert feats.attrs["encoder"] == "synthetic"
                for key, kind in COORD_ATTRS.items():
                    assert isinstance(coords.attrs[key], kind), key
                ps0, mag = int(coords.attrs["patch_size_level0"]), int(coords.attrs["level0_magnification"])
                assert (ps0, int(coords.attrs["patch_size"])) in {(512, 256), (256, 256)}
                assert ps0 == 256 * mag // 20 and coords.attrs["name"] == slide
                c = coords[:]
                assert len(np.unique(c, axis=0)) == len(c)
                assert np.all((c - c.min(axis=0)) % ps0 == 0), "coords must lie on the patch grid"
                assert c[:, 0].max() + ps0 <= coords.attrs["level0_width"]
                assert c[:, 1].max() + ps0 <= coords.attrs["level0_height"]
                mags.append(mag)
        omics = out / site / "omics.csv"
        if site == "hospital_c":
            assert not omics.exists()
        else:
            g = pd.read_csv(omics)
            assert g.columns[0] == "case_id" and g.shape[1] == 65
            assert sorted(g["case_id"]) == sorted(man["case_id"].unique())
    assert 0 < mags.count(20) < 0.15 * len(mags), "a few slides should be 20x-native scans"


def test_tiny_missing_labels_two_slide_patients_and_splits(tiny):
    out, _ = tiny
    mans = [pd.read_csv(out / s / "manifest.csv", dtype=str, keep_default_na=False)
            for s in ["hospital_a", "hospital_b", "hospital_c"]]
    allm = pd.concat(mans)
    assert set(allm["label"]) == {"positive", "negative", "", "Indeterminate"}
    assert 0 < (allm["label"].isin(["", "Indeterminate"])).mean() < 0.2
    per_case = allm.groupby("case_id")
    assert (per_case.size() == 2).sum() >= 3
    assert (per_case["split"].nunique() == 1).all(), "a patient's slides must share a split"
    assert (per_case["label"].nunique() == 1).all()
    prevalence = []
    for man in mans:
        lab = man[man["label"].isin(["positive", "negative"])]
        for split in ["train", "val", "test"]:
            assert set(lab.loc[lab["split"] == split, "label"]) == {"positive", "negative"}, split
        prevalence.append((lab["label"] == "positive").mean())
    expected = make_preset("tiny").prevalence  # realised prevalences scatter by ~0.05 around these (binomial)
    assert all(abs(p - e) < 0.15 for p, e in zip(prevalence, expected)), f"{prevalence} vs {expected}"
    assert max(prevalence) - min(prevalence) > 0.2, f"label shift expected, got {prevalence}"


def test_site_decodable_but_label_not_trivial(tiny):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out, _ = tiny
    t = _slide_table(out)
    x = np.stack(t["mean"])  # (N, D) slide means
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    site_acc = cross_val_score(clf, x, t["site"], cv=cv).mean()
    assert 0.7 <= site_acc <= 0.97, f"site decodability {site_acc:.2f}"
    lab = t["label"].isin(["positive", "negative"]).to_numpy()
    y = (t.loc[lab, "label"] == "positive").astype(int).to_numpy()
    p = cross_val_predict(clf, x[lab], y, cv=cv, method="predict_proba")[:, 1]
    assert roc_auc_score(y, p) < 0.95, "slide means must not give the label away"


def test_histology_carries_clustered_small_label_signal():
    """In memory: informative phenotypes are few, clustered, and (with an oracle mask) predictive."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    params = make_preset("tiny")
    cohort = tiny_preset.build(params, seed=0)
    model = HistologyModel(params.histology, cohort.genes.shape[1], seed=0)
    model.fit_programs(cohort.genes.to_numpy())
    programs = pd.DataFrame(model.programs(cohort.genes.to_numpy()), index=cohort.genes.index)
    assert np.allclose(programs.std(ddof=0), 1.0, atol=1e-6)
    nb = params.histology.n_background
    rows, fracs, clustered = [], [], []
    for site in cohort.sites:
        for r in site.slides.itertuples(index=False):
            rng = stable_rng(0, "slide", r.slide_id)
            s = model.slide(rng, site.name, programs.loc[r.case_id].to_numpy(), model.bag_size(rng))
            inf = s.tissue >= nb  # (P,)
            fracs.append(inf.mean())
            grid = s.coords // s.patch_size_level0
            cells = {tuple(c) for c in grid[inf]}
            for c in grid[inf]:
                clustered.append(any((c[0] + dx, c[1] + dy) in cells for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))))
            oracle = np.concatenate([[inf.mean()], s.features[inf].mean(axis=0) if inf.any() else np.zeros(32)])
            if r.label in ("positive", "negative"):
                rows.append((oracle, r.label == "positive"))
    assert 0.03 <= np.mean(fracs) <= 0.15 and max(fracs) < 0.3
    assert np.mean(clustered) > 0.8, "label phenotypes must form spatial blobs"
    x = np.stack([o for o, _ in rows])
    y = np.array([lab for _, lab in rows], dtype=int)
    p = cross_val_predict(LogisticRegression(C=0.1, max_iter=3000), x, y,
                          cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    assert roc_auc_score(y, p) > 0.7, "an oracle that knows the informative patches must find the label"


def test_tiny_genes_predict_label():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cohort = tiny_preset.build(make_preset("tiny"), seed=0)
    slides = pd.concat([s.slides for s in cohort.sites]).drop_duplicates("case_id")
    slides = slides[slides["label"].isin(["positive", "negative"])]
    x = cohort.genes.loc[slides["case_id"]].to_numpy()
    y = (slides["label"] == "positive").astype(int).to_numpy()
    p = cross_val_predict(LogisticRegression(C=0.1, max_iter=3000), x, y,
                          cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    assert 0.8 < roc_auc_score(y, p) < 0.98


def test_overrides(tmp_path):
    with pytest.raises(ConfigError, match="unknown override"):
        make_preset("tiny", not_a_knob=1)
    with pytest.raises(ConfigError, match="unknown preset"):
        synthesize("nope", tmp_path)
    p = make_preset("tiny", feature_dim=8, slides_per_site=[10, 12, 9], median_patches=40)
    assert p.histology.feature_dim == 8 and p.slides_per_site == (10, 12, 9)
    cfg = load_config(synthesize("tiny", tmp_path, seed=3, feature_dim=8, slides_per_site=[10, 12, 9]))
    assert cfg.data.feature_dim == 8
    assert len(pd.read_csv(cfg.sites[1].manifest)) == 12


def test_tcga_brca_subset(tmp_path):
    root = shared_data()
    if not (root / "tcga_brca" / "tcga_brca_labels_joined.csv").is_file():
        pytest.skip(f"TCGA-BRCA source data not found under {root} (set MOMKD_SHARED_DATA)")
    path = synthesize("tcga-brca", tmp_path, seed=0, shared_data=root, task="pr", max_slides_per_site=8,
                      median_patches=40, min_patches=20, max_patches=80)
    cfg = load_config(path)
    assert cfg.data.label_column == "pr_ihc" and cfg.data.label_map == {"Negative": 0, "Positive": 1}
    assert cfg.data.feature_dim == 1536
    names = [s.name for s in cfg.sites]
    assert sorted(names) == ["canada", "europe", "midwest", "northeast", "south", "west"]
    real = pd.read_csv(root / "tcga_brca" / "tcga_brca_labels_joined.csv", dtype=str).set_index("slide_id")
    for s in cfg.sites:
        man = pd.read_csv(s.manifest, dtype=str, keep_default_na=False)
        assert list(man.columns) == ["case_id", "slide_id", "her2_calc", "pr_ihc", "odx85", "split"]
        assert 1 <= len(man) <= 8
        assert (man["her2_calc"] == real.loc[man["slide_id"], "her2_calc"].fillna("").to_numpy()).all()
        assert (s.omics == "") == (s.name in ("canada", "midwest"))
        if s.omics:
            g = pd.read_csv(s.omics, index_col="case_id")
            assert g.shape[1] == 768 and "ERBB2" in g.columns and g.abs().to_numpy().max() <= 10.0
            assert sorted(g.index) == sorted(man["case_id"].unique())
        h5 = next(Path(s.features_dir).rglob("*.h5"))
        with h5py.File(h5, "r") as f:
            assert f["features"].shape[1] == 1536 and f["features"].attrs["encoder"] == "synthetic_uni_v2"
    with pytest.raises(ConfigError, match="task"):
        synthesize("tcga-brca", tmp_path / "bad", shared_data=root, task="er")
