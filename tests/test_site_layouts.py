"""benchmarks/site_layouts.py: the same slides as one site, or dealt at random into sites of the original sizes."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import site_layouts  # noqa: E402

from momkd_fed.config import load_config  # noqa: E402
from momkd_fed.data.site import load_site  # noqa: E402


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from momkd_fed.synth import synthesize

    return synthesize("tiny", tmp_path_factory.mktemp("tiny") / "data", seed=0)


def _slides(yaml_path: Path) -> dict[str, list]:
    """site -> its bags, as the federation loads them."""
    cfg = load_config(yaml_path)
    return {sc.name: load_site(sc, cfg, use_cache=False).bags for sc in cfg.sites}


def _key(b) -> tuple:
    return b.slide_id, b.case_id, b.split, b.label, b.omics is not None, tuple(b.features.shape)


@pytest.mark.parametrize("layout", site_layouts.LAYOUTS)
def test_a_layout_holds_every_slide_once_with_its_split_label_and_genomics(cohort, tmp_path, layout):
    original = _slides(cohort)
    new_yaml = site_layouts.relayout(cohort, tmp_path / layout, layout)
    new = _slides(new_yaml)
    flat = lambda sites: sorted(_key(b) for bags in sites.values() for b in bags)  # noqa: E731
    assert flat(new) == flat(original)  # same slides, splits, labels, genomics present or not, patch counts
    cfg = load_config(new_yaml)
    assert cfg.federation.min_sites == len(cfg.sites)
    if layout == "one_site":
        assert list(new) == [site_layouts.ONE_SITE]
        return
    # iid: the original sites' names and manifest sizes, whole cases at one site, the regions mixed
    sizes = lambda c: {s.name: len(Path(s.manifest).read_text().splitlines()) for s in c.sites}  # noqa: E731
    got, want = sizes(cfg), sizes(load_config(cohort))
    per_case = max(Counter(b.case_id for bags in original.values() for b in bags).values())
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) < per_case for s in want), (got, want)
    owner = {b.case_id: s for s, bags in new.items() for b in bags}
    assert all(owner[b.case_id] == s for s, bags in new.items() for b in bags)
    home = {b.slide_id: s for s, bags in original.items() for b in bags}
    mixed = [Counter(home[b.slide_id] for b in bags) for bags in new.values()]
    assert all(len(c) > 1 for c in mixed)  # every new site holds slides of several original sites
    assert site_layouts.relayout(cohort, tmp_path / layout, layout) == new_yaml  # written once, then reused
