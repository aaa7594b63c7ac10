"""`momkd-fed report`: plots and the HTML page built from recorded run folders, and attention heat maps."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from momkd_fed.errors import MomkdError
from momkd_fed.metrics import roc_auc
from momkd_fed.report import build_report, render_heatmap
from momkd_fed.report.comparison import auc_columns
from momkd_fed.report.heatmap import normalise_attention
from momkd_fed.report.plots import roc_points

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = ("north", "south", "west")
FEDERATED_PLOTS = ("roc", "auc_per_round", "losses", "bytes_per_round", "baselines", "privacy", "seconds_per_round")
TRAIN_PLOTS = ("roc", "auc_per_epoch", "losses", "seconds_per_epoch")
CONFIG_YAML = "federation:\n  rounds: 3\n  local_epochs: 1\nmodel:\n  name: momkd\n"


def _write_predictions(folder: Path, name: str, n: int, rng: np.random.Generator, memory: bool = True) -> None:
    """predictions/test_<name>.csv: slide_id, label, probability, memory_score (empty for a model without memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]  # (n,) both classes
    logit = 1.5 * (2 * labels - 1) + rng.normal(0, 1.5, n)  # (n,) informative but imperfect
    lines = ["slide_id,label,probability,memory_score"]
    for i in range(n):
        mem = f"{logit[i] + rng.normal(0, 0.5):.6f}" if memory else ""
        lines.append(f"{name}-{i:03d},{labels[i]},{1 / (1 + math.exp(-logit[i])):.6f},{mem}")
    (folder / f"test_{name}.csv").write_text("\n".join(lines) + "\n")


def _eval(auc: float, auc_mem: float, n: int, val: float = 0.5) -> dict:
    return {"num-examples": n, "test_auc": auc, "test_auc_memory": auc_mem, "test_loss": 0.6, "val_slides": 10,
            "val_auc": val, "val_auc_memory": val - 0.01}


GLOBAL_VAL = {1: 0.62, 2: 0.81, 3: 0.74}  # the global model's validation AUC per round: round 2 is the best


def write_federated_run(run: Path, seed: int = 0) -> Path:
    """A recorded 3-round, 3-site federated run folder as server/rounds.py writes it (south: histology-only, its
    genomic loss terms null), plus a privacy budget, baselines and per-slide test predictions."""
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(CONFIG_YAML)
    rows = []
    for r in range(1, 4):
        train, evaluate = {}, {}
        for j, site in enumerate(SITES):
            paired = site != "south"
            train[site] = {"num-examples": 40 + 10 * j, "paired": int(paired), "loss_total": 2.0 / r + 0.1 * j,
                           "loss_ce": 0.7 / r, "loss_mem": 0.5 / r + 0.02 * j, "loss_align_omics": 0.4 / r if paired
                           else None, "loss_align_wsi": 0.3 / r, "loss_recon": 0.2 / r if paired else None,
                           "val_auc": 0.6 + 0.05 * r + 0.01 * j, "val_auc_memory": 0.58 + 0.05 * r,
                           "train_seconds": 12.5}
            evaluate[site] = {"global": _eval(0.55 + 0.08 * r - 0.02 * j, 0.5 + 0.07 * r, 20, GLOBAL_VAL[r] + 0.01 * j),
                              "personal": _eval(0.6 + 0.07 * r - 0.01 * j, 0.55 + 0.06 * r, 20)}
        rows.append({
            "round": r, "seconds": {"train": 25.0, "evaluate": 5.0 + r, "total": 30.5 + r}, "sampled": list(SITES),
            "test_auc": {"pooled": 0.5 + 0.07 * r, **{s: evaluate[s]["global"]["test_auc_memory"] for s in SITES}},
            "test_auc_personal": {"pooled": 0.6 + 0.07 * r},
            "train": train, "train_aggregate": {"val_auc": 0.61 + 0.05 * r, "val_auc_memory": 0.58 + 0.05 * r},
            "evaluate": evaluate,
            "val_auc": {"monitor": "val_auc_memory", "pooled": GLOBAL_VAL[r]},
            "evaluate_aggregate": {"global_test_auc": 0.53 + 0.08 * r, "global_test_auc_memory": 0.5 + 0.07 * r,
                                   "personal_test_auc": 0.59 + 0.07 * r, "personal_test_auc_memory": 0.55 + 0.06 * r},
            "memory": {}, "frozen_keys": 0,
            "bytes_sent": {s: 4_200_000 + 1000 * j for j, s in enumerate(SITES)},
            "bytes_received": {s: 4_100_000 + 2000 * j for j, s in enumerate(SITES)},
            "dropouts": [{"site": "west", "phase": "evaluate", "reason": "timeout"}] if r == 2 else [],
            "paired_sites": ["north", "west"], "privacy": {"epsilon": 0.8 * r, "delta": 1e-5},
        })
    (run / "rounds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    by_head = {"global_test_auc_memory": {"pooled": 0.812, "north": 0.83, "south": 0.79, "west": 0.8},
               "global_test_auc": {"pooled": 0.79, "north": 0.8, "south": None, "west": 0.78},
               "personal_test_auc": {"pooled": 0.805, "north": 0.81, "south": 0.8, "west": 0.8},
               "personal_test_auc_memory": {"pooled": 0.8, "north": 0.8, "south": 0.8, "west": 0.8}}
    summary = {
        "kind": "federated", "model": "momkd", "rounds_completed": 3, "rounds_planned": 3,
        "test_auc": by_head["global_test_auc_memory"],
        "test_auc_model": "global model (shared encoders + global memory), memory score delta(F_wsi)",
        "test_auc_pooled_method": "slide-weighted mean of the sites' test AUCs",
        "test_auc_personal": by_head["personal_test_auc"], "test_auc_by_head": by_head,
        "bytes_sent": 37_809_000, "bytes_received": 36_918_000, "dropouts": 1, "seconds": 98.5,
        "best": {"round": 2, "monitor": "val_auc_memory", "val_auc": GLOBAL_VAL[2], "model_file": "best_model.pt"},
        "models": {  # every AUC named by the model file and head it belongs to (server/rounds.py summary)
            "best_model.pt": {"label": "global model (best_model.pt, round 2), memory head", "head": "memory",
                              "test_auc": {"pooled": 0.823, "north": 0.84, "south": 0.8, "west": 0.81}},
            "global_model.pt": {"label": "global model (global_model.pt, round 3), memory head", "head": "memory",
                                "test_auc": by_head["global_test_auc_memory"]},
            "personal_model.pt": {"label": "personal models (personal_model.pt at each site), classifier",
                                  "head": "classifier", "test_auc": {"pooled": 0.805, "north": 0.81, "south": 0.8,
                                                                     "west": 0.8}},
        },
        "baselines": {
            "local": {"momkd": {"test_auc": {"north": 0.74, "south": 0.61, "west": 0.7}},
                      "abmil": {"north": [0.7, 0.72, 0.69], "south": [0.58, 0.6, 0.62], "west": [0.66, 0.7, 0.68]}},
            "centralized": {"momkd": {"pooled": [0.84, 0.86, 0.83]}, "abmil": {"pooled": {"mean": 0.8, "std": 0.02,
                                                                                          "n": 3}}},
        },
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    for site in SITES:
        _write_predictions(run / "predictions", site, 30, rng)
    return run


def write_train_run(run: Path, seed: int = 1) -> Path:
    """A recorded pooled train run folder as momkd_fed/training.py writes it, plus per-slide predictions."""
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("train:\n  epochs: 4\n")
    epochs = [{"epoch": e, "train_total": 1.5 / e, "train_ce": 0.7 / e, "train_mem": 0.4 / e,
               "train_num_slides": 80.0, "val_auc": 0.6 + 0.05 * e, "val_auprc": 0.6, "val_balanced_accuracy": 0.6,
               "val_loss": 0.65, "val_memory_auc": 0.55 + 0.05 * e, "monitor": "val_auc", "best_epoch": e,
               "seconds": 3.0 + e} for e in range(1, 5)]
    (run / "epochs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in epochs))
    head = {"auprc": 0.7, "balanced_accuracy": 0.7, "macro_f1": 0.69, "sensitivity": 0.7, "specificity": 0.7,
            "n": 40, "n_pos": 20, "threshold": 0.5, "reason": ""}
    metrics = {"model": "momkd", "sites": ["north", "south"], "pooled": True,
               "test": {"classifier": {"auc": 0.777, **head}, "memory": {"auc": 0.755, **head}},
               "val": {"classifier": {"auc": 0.7, **head}, "memory": None},
               "test_per_site": {"north": {"classifier": {"auc": 0.801, **head}, "memory": {"auc": 0.79, **head}},
                                 "south": {"classifier": {"auc": None, **head}, "memory": None}},
               "best_epoch": 4, "epochs_run": 4, "stopped_early": False, "seconds": {"total": 20.0}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    _write_predictions(run / "predictions", "north", 20, rng)
    _write_predictions(run / "predictions", "south", 20, rng, memory=False)
    return run


def assert_valid_png(path: Path) -> np.ndarray:
    """A non-empty PNG that PIL decodes and that is not blank; returns its RGB pixels (H, W, 3)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    assert rgb.shape[0] > 50 and rgb.shape[1] > 50, f"{path}: tiny image {rgb.shape}"
    assert rgb.var() > 0, f"{path}: blank image"
    assert (rgb < 250).mean() > 0.005, f"{path}: almost nothing drawn"
    return rgb


def test_federated_report_draws_every_plot_and_embeds_it(tmp_path):
    run = write_federated_run(tmp_path / "run")
    page = build_report(run)
    assert page == run / "report" / "index.html"
    text = page.read_text(encoding="utf-8")
    for name in FEDERATED_PLOTS:
        png = run / "report" / f"{name}.png"
        assert_valid_png(png)
        # the page embeds exactly this file as a data URI
        m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*data-file="%s\.png"' % name, text)
        assert m, f"{name}.png not embedded in the page"
        assert base64.b64decode(m.group(1)) == png.read_bytes()
    assert text.count("<img ") == len(FEDERATED_PLOTS)
    # self-contained: no scripts, no external references
    assert "<script" not in text.lower()
    assert not re.search(r'(src|href)="(?!data:)', text)
    # the AUC table: pooled first, every head of the federated model, then the baselines, seeds summarised
    table = re.search(r'<table id="auc-table">(.*?)</table>', text, re.S).group(1)
    assert table.index(">pooled<") < table.index(">north<")
    for cell in ("0.823", "0.812", "0.830", "0.740", "0.843 ± 0.015 (n=3)", "0.800 ± 0.020 (n=3)"):
        assert cell in table, cell
    for col in ("global model (best_model.pt, round 2), memory head", "global model (global_model.pt, round 3), "
                "memory head", "personal models (personal_model.pt at each site), classifier", "local momkd",
                "local abmil", "centralized momkd", "centralized abmil"):
        assert f"<th>{col}</th>" in table, col
    assert "classifier</th>" not in table.replace("personal_model.pt at each site), classifier</th>", "")
    assert "ROC curves on the test split: global model (best_model.pt, round 2), memory head" in text
    assert "slide-weighted mean of the sites" in text  # how "pooled" was computed is said
    dropouts = re.search(r'<table id="dropouts">(.*?)</table>', text, re.S).group(1)
    assert "<td>2</td><td>west</td><td>evaluate</td><td>timeout</td>" in dropouts
    assert "rounds: 3" in text  # the config is shown
    assert 'id="skipped"' not in text


def test_validation_panel_is_the_global_model_and_the_best_round_is_marked(tmp_path):
    from momkd_fed.report.run_folder import MEAN_OF_SITES, MEMORY, load_run

    run = load_run(write_federated_run(tmp_path / "run"))
    val = run.auc[("validation", MEMORY)]
    # the evaluate replies' validation AUCs of the global model, not the train replies' (trained local models)
    assert val["north"] == ([1.0, 2.0, 3.0], pytest.approx([GLOBAL_VAL[r] - 0.01 for r in (1, 2, 3)]))
    assert val[MEAN_OF_SITES][1] == pytest.approx([GLOBAL_VAL[r] for r in (1, 2, 3)])
    text = build_report(run.run_dir).read_text(encoding="utf-8")
    assert "best validation AUC (round 2)" in text and "best_model.pt" in text


def test_train_report_shows_test_metrics_per_head(tmp_path):
    run = write_train_run(tmp_path / "train")
    text = build_report(run).read_text(encoding="utf-8")
    for name in TRAIN_PLOTS:
        assert_valid_png(run / "report" / f"{name}.png")
        assert f'data-file="{name}.png"' in text
    table = re.search(r'<table id="auc-table">(.*?)</table>', text, re.S).group(1)
    assert "<th>classifier</th>" in table and "<th>memory</th>" in table
    assert "0.777" in table and "0.755" in table
    assert table.index(">auc<") < table.index(">auprc<")
    per_site = re.search(r'<table id="auc-per-site">(.*?)</table>', text, re.S).group(1)
    assert "0.801" in per_site and "n/a" in per_site and per_site.index(">pooled<") < per_site.index(">north<")
    assert "best epoch" in text  # run facts from metrics.json


def test_absent_data_is_skipped_and_said(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"rounds_completed": 2, "test_auc": {"pooled": 0.7, "a": 0.6}}))
    text = build_report(run).read_text(encoding="utf-8")
    assert "<img " not in text
    skipped = re.search(r'<ul id="skipped">(.*?)</ul>', text, re.S).group(1)
    assert "predictions/test_&lt;site&gt;.csv" in skipped  # ROC: why not drawn
    assert "no baselines" in skipped and "epsilon" in skipped
    assert not (run / "report" / "roc.png").exists()
    assert "0.700" in text and "No config.yaml" in text


def test_missing_or_empty_run_folder_names_path(tmp_path):
    with pytest.raises(MomkdError, match="no such run folder"):
        build_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MomkdError, match=r"empty: not a run folder.*rounds\.jsonl"):
        build_report(tmp_path / "empty")


def test_partial_last_line_is_skipped_but_a_broken_line_is_named(tmp_path):
    run = write_federated_run(tmp_path / "run")
    with (run / "rounds.jsonl").open("a") as f:
        f.write('{"round": 4, "train": {"nor')  # the run stopped while writing round 4
    from momkd_fed.report.run_folder import load_run

    assert load_run(run).seconds[0] == [1.0, 2.0, 3.0]  # three complete rounds read, no error
    lines = (run / "rounds.jsonl").read_text().splitlines()
    (run / "rounds.jsonl").write_text("\n".join([lines[0], lines[3], lines[1]]) + "\n")
    with pytest.raises(MomkdError, match=r"rounds\.jsonl:2: not valid JSON"):
        build_report(run)


def test_predictions_csv_without_scores_is_refused_and_an_untrained_classifier_is_not_drawn(tmp_path):
    run = write_train_run(tmp_path / "train")
    (run / "predictions" / "test_north.csv").write_text("slide_id,label\na,0\nb,1\n")
    with pytest.raises(MomkdError, match=r"test_north\.csv: columns .* lack 'label' or a score"):
        build_report(run)
    # a federated global model whose classifier never left the sites: its CSVs carry the memory score only,
    # and the ROC figure has the memory panel alone
    from momkd_fed.report.run_folder import load_run
    from momkd_fed.run_log import write_predictions_csv

    fed = write_federated_run(tmp_path / "fed")
    for site in SITES:
        write_predictions_csv(fed / "predictions" / f"test_{site}.csv", ["a", "b", "c"], np.array([0, 1, 1]), None,
                              np.array([-0.5, 0.2, 0.4]))
    assert "probability" not in (fed / "predictions" / "test_north.csv").read_text().splitlines()[0]
    data = load_run(fed)
    assert all(p.prob is None and p.memory_score is not None for p in data.predictions.values())
    build_report(fed)
    with Image.open(fed / "report" / "roc.png") as im:
        w, h = im.size
    assert w < 1.3 * h  # one panel (two would be about twice as wide as high)


def test_site_major_rounds_layout_is_read(tmp_path):
    from momkd_fed.report.run_folder import CLASSIFIER, load_run

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"round": r, "sites": {"a": {"train": {"loss_total": 1.0 / r}, "eval_global": {"auc": 0.5 + r / 10},
                                         "bytes_sent": 100 * r}}, "seconds": 2.0} for r in (1, 2)]
    (run / "rounds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    data = load_run(run)
    assert data.auc[("global", CLASSIFIER)]["a"] == ([1.0, 2.0], [0.6, 0.7])
    assert data.losses["total"]["a"] == ([1.0, 2.0], [1.0, 0.5])
    assert data.bytes_sent["a"] == ([1.0, 2.0], [100.0, 200.0])
    assert data.seconds == ([1.0, 2.0], [2.0, 2.0])


def test_roc_points_match_auc_and_sklearn():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)  # (200,)
    s = np.round(y + rng.normal(0, 1, 200), 1)  # (200,) with ties
    fpr, tpr = roc_points(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s), abs=1e-12)
    ref_fpr, ref_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_a_summary_written_before_model_files_were_named_still_reads():
    by_head = {"global_test_auc_memory": {"pooled": 0.8}, "global_test_auc": {"pooled": None},
               "personal_test_auc": {"pooled": 0.7}}
    cols = auc_columns({"test_auc": by_head["global_test_auc_memory"], "test_auc_by_head": by_head})
    assert list(cols) == ["global model (last round), memory head", "global model (last round), classifier",
                          "personalised model (last round), classifier"]
    assert math.isnan(cols["global model (last round), classifier"]["pooled"].mean)  # untrained: n/a, not a number
    assert list(auc_columns({"test_auc": {"pooled": 0.8}}, every_head=False)) == ["federated"]


def test_baseline_shapes_are_summarised_over_seeds():
    cols = auc_columns({"test_auc": {"pooled": 0.8},
                        "baselines": {"local": {"abmil": [{"pooled": 0.6}, {"pooled": 0.7}]},
                                      "centralized": {"test_auc": {"pooled": [0.9, math.nan]}},
                                      "weird": "not a number"}})
    assert list(cols) == ["federated", "local abmil", "centralized"]
    assert cols["local abmil"]["pooled"].mean == pytest.approx(0.65)
    assert cols["local abmil"]["pooled"].n == 2
    assert cols["local abmil"]["pooled"].std == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert cols["centralized"]["pooled"].n == 1  # NaN seeds are not averaged in


def test_heatmap_is_brighter_where_attention_is_high(tmp_path):
    ps, n = 64, 10
    gx, gy = np.meshgrid(np.arange(n), np.arange(n))
    coords = np.stack([gx.ravel(), gy.ravel()], 1) * ps + 1000  # (100, 2) offset like a real slide
    attention = np.exp(gx.ravel().astype(float))  # (100,) rises left to right, softmax-like spread
    out = render_heatmap(coords, attention, ps, tmp_path / "h" / "slide.png")
    rgb = assert_valid_png(out)
    lum = rgb @ np.array([0.299, 0.587, 0.114])  # (H, W)
    # canvas at native scale (640 px < max_side) in the top-left corner; sample patch centres along one row
    row = lum[n * ps // 2, [ps * i + ps // 2 for i in range(n)]]  # (10,)
    assert np.all(np.diff(row) > 0), row
    assert rgb.shape[1] > n * ps  # the colorbar sits right of the canvas
    # a slide larger than max_side is shrunk to it
    big = render_heatmap(coords * 50, attention, ps * 50, tmp_path / "big.png", max_side=300)
    with Image.open(big) as im:
        assert im.height == 300


def test_heatmap_normalisation_and_errors(tmp_path):
    a = np.array([0.1, 5.0, 0.1, 2.0])
    np.testing.assert_allclose(normalise_attention(a, "rank"), [1 / 6, 1.0, 1 / 6, 2 / 3])
    np.testing.assert_allclose(normalise_attention(a, "minmax"), (a - 0.1) / 4.9)
    np.testing.assert_allclose(normalise_attention(np.ones(3), "rank"), 0.5)
    with pytest.raises(MomkdError, match="row-aligned"):
        render_heatmap(np.zeros((3, 2)), np.zeros(4), 256, tmp_path / "x.png")
    with pytest.raises(MomkdError, match="no patches"):
        render_heatmap(np.zeros((0, 2)), np.zeros(0), 256, tmp_path / "x.png")
    with pytest.raises(MomkdError, match="normalisation 'zscore'"):
        render_heatmap(np.zeros((1, 2)), np.zeros(1), 256, tmp_path / "x.png", normalize="zscore")
