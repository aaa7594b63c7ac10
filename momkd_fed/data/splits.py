"""Patient-level, label-stratified (optionally group-preserving) train/val/test splits."""

from __future__ import annotations

import numpy as np

from ..errors import DataError


def _case_table(case_ids, labels, groups) -> tuple[list[str], dict[str, int], dict[str, str]]:
    """Sorted cases, patient label (max over slides) and group per case (checked consistent)."""
    if len(case_ids) != len(labels) or (groups is not None and len(groups) != len(case_ids)):
        raise ValueError("case_ids, labels (and groups) must be aligned, one entry per slide")
    label: dict[str, int] = {}
    group: dict[str, str] = {}
    for i, (c, y) in enumerate(zip(case_ids, labels)):
        c = str(c)
        label[c] = max(label.get(c, int(y)), int(y))
        if groups is not None:
            g = str(groups[i])
            if group.setdefault(c, g) != g:
                raise DataError("<splits>", f"case {c!r} belongs to two groups ({group[c]!r}, {g!r})",
                                "give every slide of a patient the same site/group")
    return sorted(label), label, group


def _fill_empty(assign: dict[str, str], units: dict[str, list[str]], order: list[str]) -> None:
    """Move one unit (patient or group) into each empty split, taking from the largest split with > 1 unit."""
    for name in ("test", "val", "train"):
        members = {s: [u for u in order if assign[units[u][0]] == s] for s in ("train", "val", "test")}
        if members[name]:
            continue
        donor = max(members, key=lambda s: len(members[s]))
        if len(members[donor]) < 2:
            return
        # the smallest unit of the donor split, last in the seeded order on ties
        u = min(reversed(members[donor]), key=lambda u: len(units[u]))
        for c in units[u]:
            assign[c] = name


def patient_splits(case_ids, labels, val_fraction: float, test_fraction: float, seed: int,
                   groups=None) -> dict[str, str]:
    """Split patients (never their slides) into train/val/test.

    Parameters
    ----------
    case_ids, labels : one entry per slide; a patient's label is the max of its slides' labels.
    val_fraction, test_fraction : target fractions of patients, met per class (stratified).
    seed : split seed; the result does not depend on input order.
    groups : optional, one entry per slide (e.g. tissue-source site): whole groups go to one split, chosen
        greedily so that each split's per-class counts approach their targets.

    Returns
    -------
    dict case_id -> "train" | "val" | "test". Every split is non-empty when there are at least three
    patients (three groups with ``groups``).
    """
    cases, label, group = _case_table(case_ids, labels, groups)
    rng = np.random.default_rng(seed)
    fracs = {"val": val_fraction, "test": test_fraction}
    assign: dict[str, str] = {}
    if groups is None:
        for y in sorted(set(label.values())):
            members = [c for c in cases if label[c] == y]
            members = [members[i] for i in rng.permutation(len(members))]
            n_test = int(round(len(members) * test_fraction))
            n_val = int(round(len(members) * val_fraction))
            for i, c in enumerate(members):
                assign[c] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
        units = {c: [c] for c in cases}
        order = [cases[i] for i in rng.permutation(len(cases))]
    else:
        units: dict[str, list[str]] = {}
        for c in cases:
            units.setdefault(group[c], []).append(c)
        names = sorted(units)
        order = [names[i] for i in rng.permutation(len(names))]
        order.sort(key=lambda g: -len(units[g]))  # stable: largest groups first, seeded order among equals
        classes = sorted(set(label.values()))
        total = {y: sum(label[c] == y for c in cases) for y in classes}
        target = {s: {y: f * total[y] for y in classes} for s, f in fracs.items()}
        target["train"] = {y: (1 - val_fraction - test_fraction) * total[y] for y in classes}
        have = {s: {y: 0 for y in classes} for s in target}
        for g in order:
            cnt = {y: sum(label[c] == y for c in units[g]) for y in classes}

            def gain(s: str) -> float:  # how much of split s's unmet per-class target this group fills
                return sum(min(cnt[y], max(target[s][y] - have[s][y], 0.0)) for y in classes) - \
                    0.5 * sum(max(have[s][y] + cnt[y] - target[s][y], 0.0) for y in classes)

            best = max(("train", "val", "test"), key=gain)
            for y in classes:
                have[best][y] += cnt[y]
            for c in units[g]:
                assign[c] = best
    _fill_empty(assign, units, order)
    return assign
