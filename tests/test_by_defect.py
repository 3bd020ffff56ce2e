"""Per-defect-type metrics: each type against the good images, with and without masks."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from test_bootstrap import pixel_case

from patchbank.evaluation import metrics
from patchbank.evaluation.by_defect import BY_DEFECT_COLUMNS, metrics_by_defect


def test_each_type_against_the_good_images_with_masks() -> None:
    masks, maps, labels = pixel_case(3, n=14, n_good=5)
    types = ["good"] * 5 + ["scratch", "hole", "stain"] * 3
    scores = np.array([float(np.mean(a)) for a in maps]) + 0.1 * labels
    table = metrics_by_defect("widget", labels, scores, types, masks, maps, n_boot=200)
    assert list(table.columns) == BY_DEFECT_COLUMNS
    assert table["defect_type"].tolist() == ["hole", "scratch", "stain"]
    assert table["n_images"].tolist() == [3, 3, 3]
    for _, row in table.iterrows():
        sub = [i for i, t in enumerate(types) if t in ("good", row["defect_type"])]
        y, s = labels[sub], scores[sub]
        assert row["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert row["image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        exact = metrics.pixel_metrics([masks[i] for i in sub], [maps[i] for i in sub],
                                      progress=False)
        for k in ("pixel_auroc", "pro", "best_dice"):
            assert row[k] == exact[k]
            assert row[f"{k}_lo"] <= row[k] <= row[f"{k}_hi"], k
        assert row["image_auroc_lo"] <= row["image_auroc"] <= row["image_auroc_hi"]
    again = metrics_by_defect("widget", labels, scores, types, masks, maps, n_boot=200)
    assert again.equals(table)  # seeded


def test_without_masks_and_without_intervals() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.2, 0.9, 0.3, 0.8, 0.7])
    types = ["good"] * 3 + ["a", "a", "b", "b"]
    table = metrics_by_defect("c", labels, scores, types, n_boot=0)
    assert table["defect_type"].tolist() == ["a", "b"]
    assert table["image_auroc"].tolist() == [pytest.approx(5 / 6), 1.0]
    assert table[[c for c in BY_DEFECT_COLUMNS[5:]]].isna().all().all()  # pixel and CI NaN
    boot = metrics_by_defect("c", labels, scores, types, n_boot=100)
    assert boot["image_auroc_hi"].notna().all() and boot["pro_lo"].isna().all()
    only_bad = metrics_by_defect("c", [1, 1], [0.2, 0.3], ["a", "b"], n_boot=100)
    assert only_bad["image_auroc"].isna().all() and len(only_bad) == 2
