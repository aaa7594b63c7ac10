"""Patient-level stratified (and group-preserving) splits."""

from __future__ import annotations

from collections import Counter

import numpy as np

from momkd_fed.data.splits import patient_splits


def _cohort(n_patients=200, pos=0.3, seed=0):
    rng = np.random.default_rng(seed)
    cases, labels, groups = [], [], []
    for i in range(n_patients):
        y = int(rng.random() < pos)
        for _ in range(1 + (rng.random() < 0.2)):  # ~20% of patients have two slides
            cases.append(f"P{i:03d}")
            labels.append(y)
            groups.append(f"site{i % 13}")
    return cases, labels, groups


def test_patient_level_stratified_deterministic():
    cases, labels, _ = _cohort()
    s = patient_splits(cases, labels, 0.15, 0.2, seed=3)
    assert set(s) == set(cases)  # one split per patient: slides cannot be split
    lab = {c: y for c, y in zip(cases, labels)}
    for split, frac in (("val", 0.15), ("test", 0.2), ("train", 0.65)):
        for y in (0, 1):
            n_y = sum(v == y for v in lab.values())
            got = sum(1 for c, sp in s.items() if sp == split and lab[c] == y)
            assert abs(got - frac * n_y) <= 1, (split, y, got)
    rev = patient_splits(cases[::-1], labels[::-1], 0.15, 0.2, seed=3)
    assert rev == s  # deterministic, independent of input order
    assert patient_splits(cases, labels, 0.15, 0.2, seed=4) != s


def test_patient_label_is_max_of_slides():
    s = patient_splits(["A", "A", "B", "C", "D"], [0, 1, 0, 0, 0], 0.34, 0.34, seed=0)
    assert set(s.values()) == {"train", "val", "test"}


def test_every_split_nonempty_when_possible():
    for n in (3, 4, 5, 7):
        cases = [f"c{i}" for i in range(n)]
        s = patient_splits(cases, [i % 2 for i in range(n)], 0.15, 0.2, seed=0)
        assert set(s.values()) == {"train", "val", "test"}, n
    assert set(patient_splits(["a", "b"], [0, 1], 0.15, 0.2, seed=0)) == {"a", "b"}


def test_groups_preserved_and_roughly_stratified():
    cases, labels, groups = _cohort(300)
    s = patient_splits(cases, labels, 0.15, 0.2, seed=0, groups=groups)
    per_group = {}
    for c, g in zip(cases, groups):
        per_group.setdefault(g, set()).add(s[c])
    assert all(len(v) == 1 for v in per_group.values())  # a whole site goes to one split
    n = Counter(s.values())
    assert set(n) == {"train", "val", "test"}
    assert n["train"] > n["test"] > 0 and n["val"] > 0
    assert patient_splits(cases, labels, 0.15, 0.2, seed=0, groups=groups) == s
