"""Paired comparison: DeLong against its formula, paired bootstrap, Wilcoxon, Holm, the stage
(refusals, identical runs, outputs) and an end-to-end comparison of PaDiM and PatchCore."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import average_precision_score, roc_auc_score

from patchbank.cli.compare import compare_main
from patchbank.core.errors import ScoresError
from patchbank.evaluation import compare as cmp
from patchbank.evaluation import metrics
from patchbank.stages.compare import COLUMNS, compare_runs
from patchbank.store.catalog import resolve_run_name as resolve_run
from patchbank.store.runs import SCORE_COLUMNS, RunPaths, write_run

# --------------------------------------------------------------------------- DeLong


def direct_delong(labels, a, b) -> tuple[float, float, float]:
    """DeLong et al. (1988) straight from its definition: (auc_a - auc_b, se, p)."""
    y = np.asarray(labels) != 0

    def components(s):
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)  # AUC, V10, V01

    auc_a, v10_a, v01_a = components(np.asarray(a, float))
    auc_b, v10_b, v01_b = components(np.asarray(b, float))
    m, n = len(v10_a), len(v01_a)
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    c = np.array([1.0, -1.0])
    se = math.sqrt(c @ s10 @ c / m + c @ s01 @ c / n)
    z = (auc_a - auc_b) / se
    return auc_a - auc_b, se, 2 * sps.norm.sf(abs(z))


def test_delong_equals_its_direct_formula_with_ties() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(6, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        # coarse scores: many ties within and across classes; b correlated with a
        a = np.round(rng.normal(size=n) + y, 1 if trial % 2 else 0)
        b = np.round(a + rng.normal(scale=0.7, size=n), 1)
        got = cmp.delong(y, a, b)
        diff, se, p = direct_delong(y, a, b)
        assert got.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
        assert got.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
        assert abs(got.diff - diff) <= 1e-9 and abs(got.se - se) <= 1e-9
        assert abs(got.p - p) <= 1e-9 and got.z == pytest.approx(diff / se, abs=1e-9)


def test_delong_hand_checked_case() -> None:
    # b: V10 = (1, 1/2), V01 = (1/2, 1); a separates perfectly (all components 1):
    # var = var(1, 1/2)/2 + var(1/2, 1)/2 = 1/8 + ... = 0.125/2 + 0.125/2 = 1/8
    got = cmp.delong([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.1], [0.9, 0.2, 0.3, 0.1])
    assert (got.auc_a, got.auc_b, got.diff) == (1.0, 0.75, 0.25)
    assert got.se == pytest.approx(math.sqrt(1 / 8), abs=1e-12)
    assert got.z == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert got.p == pytest.approx(0.4795001221869535, abs=1e-12)  # 2 (1 - Phi(0.7071))


def test_delong_identical_runs_and_bad_input() -> None:
    y, s = [0, 0, 1, 1, 1], [0.1, 0.5, 0.4, 0.9, 0.5]
    got = cmp.delong(y, s, s)
    assert (got.diff, got.se, got.z, got.p) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ScoresError, match="needs both"):
        cmp.delong([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ScoresError, match="NaN or inf"):
        cmp.delong([0, 1, 1], [0.1, np.nan, 0.3], [0.3, 0.2, 0.1])


# --------------------------------------------------------------------------- bootstrap


def test_weighted_image_metrics_equal_repeated_images() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(4, 40))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.integers(0, 6, n).astype(float)  # ties
        w = rng.integers(0, 4, n)
        w[:2] = 1
        got = cmp.ImageStats(y, s).metrics(w)
        yy, ss = np.repeat(y, w), np.repeat(s, w)
        assert got["image_auroc"] == pytest.approx(roc_auc_score(yy, ss), abs=1e-12)
        assert got["image_ap"] == pytest.approx(average_precision_score(yy, ss), abs=1e-12)
        assert got["image_f1"] == pytest.approx(metrics.best_f1(yy, ss)[0], abs=1e-12)


def test_stratified_indices_keep_labels_and_are_seeded() -> None:
    y = np.array([0, 1, 0, 0, 1, 1, 1, 0, 0])
    idx = cmp.stratified_indices(y, 200, 3)
    assert idx.shape == (200, 9) and (y[idx] == y).all()
    assert np.array_equal(idx, cmp.stratified_indices(y, 200, 3))
    assert not np.array_equal(idx, cmp.stratified_indices(y, 200, 4))
    w = cmp.index_weights(idx, 9)
    assert (w.sum(axis=1) == 9).all() and (w[:, y == 1].sum(axis=1) == 4).all()
    assert np.array_equal(w[5], np.bincount(idx[5], minlength=9))


def _paired(y, a, b, seed=0, n_boot=1000) -> cmp.Paired:
    w = cmp.index_weights(cmp.stratified_indices(y, n_boot, seed), len(y))
    ra = cmp.replicates(cmp.ImageStats(y, a).metrics, w)["image_auroc"]
    rb = cmp.replicates(cmp.ImageStats(y, b).metrics, w)["image_auroc"]
    return cmp.paired_difference(roc_auc_score(y, a), roc_auc_score(y, b), ra, rb)


def test_paired_bootstrap_is_deterministic_and_holds_the_difference() -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(30, int), np.ones(25, int)]
    a = y * 1.2 + rng.normal(size=55)
    b = a + rng.normal(scale=1.0, size=55)
    one, two = _paired(y, a, b), _paired(y, a, b)
    assert np.array_equal(one.reps, two.reps) and (one.lo, one.hi, one.p) == \
        (two.lo, two.hi, two.p)
    assert one.lo <= one.diff <= one.hi and one.hi - one.lo > 0.01
    assert not np.array_equal(one.reps, _paired(y, a, b, seed=1).reps)
    # paired: a replicate's difference is the difference of the runs on the same images
    same = _paired(y, a, a)
    assert (same.diff, same.lo, same.hi, same.p) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_p_and_interval_on_known_replicates() -> None:
    assert cmp.bootstrap_p(np.full(99, 0.2)) == pytest.approx(2 / 100)
    assert cmp.bootstrap_p(np.r_[np.full(30, -1.0), np.full(70, 1.0)]) == \
        pytest.approx(2 * 31 / 101)
    assert cmp.bootstrap_p(np.zeros(10)) == 1.0
    assert cmp.percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    undefined = cmp.paired_difference(0.8, math.nan, np.ones(5), np.ones(5))
    assert math.isnan(undefined.diff) and "undefined" in undefined.note


# ------------------------------------------------------------- across categories, Holm


def test_wilcoxon_over_categories() -> None:
    p, note = cmp.wilcoxon_p([0.01, 0.02, 0.03, 0.04, 0.05])
    assert p == pytest.approx(2 / 32) and note == ""  # exact: all 5 of one sign
    p, note = cmp.wilcoxon_p([0.0, 0.03, 0.0])
    assert math.isnan(p) and "1 non-zero difference" in note


def test_mean_across_categories_resamples_every_category_at_once() -> None:
    cats = [cmp.Paired(0.9, 0.8, 0.1, 0, 0, 0, np.array([0.1, 0.2, 0.0])),
            cmp.Paired(0.7, 0.8, -0.1, 0, 0, 0, np.array([-0.1, 0.0, -0.2])),
            cmp.Paired(0.6, math.nan, math.nan, 0, 0, 0, np.empty(0))]
    mean = cmp.across_categories(cats, ci=0.5)
    assert (mean.a, mean.b, mean.diff) == pytest.approx((0.8, 0.8, 0.0))
    assert np.allclose(mean.reps, [0.0, 0.1, -0.1])
    assert (mean.lo, mean.hi) == pytest.approx((-0.05, 0.05))
    assert math.isnan(mean.p) or 0 < mean.p <= 1


def test_holm_on_a_known_vector() -> None:
    got = cmp.holm([0.01, 0.04, 0.03, 0.005])
    assert np.allclose(got, [0.03, 0.06, 0.06, 0.02])
    got = cmp.holm([0.5, math.nan, 0.2])
    assert np.allclose(got[[0, 2]], [0.5, 0.4]) and math.isnan(got[1])
    assert cmp.holm([0.6, 0.7]).tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- stage


def image_run(scores_dir: Path, name: str, scores, paths=None, category: str = "widget",
              labels=None) -> None:
    """An image-level run written through the real run writer."""
    n = len(scores)
    labels = [0] * (n // 2) + [1] * (n - n // 2) if labels is None else labels
    paths = paths or [f"/data/{category}/test/{i:03d}.png" for i in range(n)]
    df = pd.DataFrame({"path": paths, "defect_type": ["good" if v == 0 else "bad"
                                                      for v in labels],
                       "label": labels, "score": scores, "mask_path": [""] * n,
                       "height": [32] * n, "width": [32] * n})[SCORE_COLUMNS]
    write_run(RunPaths.of(scores_dir, "toy", name, category), df, None, None,
              {"method": name.split("-")[0], "pixel_level": False})


def test_different_test_images_are_refused_in_one_line(tmp_path: Path) -> None:
    image_run(tmp_path, "alpha", [0.1, 0.2, 0.8, 0.9])
    image_run(tmp_path, "beta", [0.1, 0.2, 0.8, 0.9],
              paths=["/data/widget/test/000.png", "/data/widget/test/001.png",
                     "/data/widget/test/002.png", "/data/widget/test/xyz.png"])
    with pytest.raises(ScoresError) as err:
        compare_runs(tmp_path, "toy", ["alpha", "beta"], ["widget"], n_boot=0)
    msg = str(err.value)
    assert "\n" not in msg and "different test images" in msg and "xyz.png" in msg


def test_identical_runs_give_zero_difference_and_p_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for cat in ("c1", "c2"):
        image_run(tmp_path, "alpha-1", rng.normal(size=12).round(1).tolist(), category=cat)
        src = tmp_path / "toy" / "alpha-1" / cat
        shutil.copytree(src, tmp_path / "toy" / "beta-1" / cat)
    # the same images in another row order are aligned by path
    shuffled = pd.read_csv(tmp_path / "toy/beta-1/c2/image_scores.csv").iloc[::-1]
    shuffled.to_csv(tmp_path / "toy/beta-1/c2/image_scores.csv", index=False)
    table = compare_runs(tmp_path, "toy", ["alp", "bet"], "all", n_boot=200)
    assert list(table.columns) == COLUMNS
    per_cat = table[table["category"] != "mean"]
    assert sorted(set(per_cat["category"])) == ["c1", "c2"]
    assert set(per_cat["metric"]) == set(cmp.IMAGE_METRICS)
    assert (per_cat["diff"] == 0).all() and (per_cat["p"] == 1).all()
    assert (per_cat["lo"] == 0).all() and (per_cat["hi"] == 0).all()
    mean = table[table["category"] == "mean"]
    assert len(mean) == 3 and mean["p"].isna().all()  # Wilcoxon: no non-zero difference
    out = tmp_path / "toy" / "compare"
    assert pd.read_csv(out / "compare.csv").shape == table.shape
    md = (out / "compare.md").read_text()
    assert "Wilcoxon undefined" in md and "smallest two-sided p possible is 0.5;" in md
    assert (out / "compare_forest.png").stat().st_size > 1000


def test_three_runs_are_holm_adjusted(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    y = [0] * 15 + [1] * 15
    base = np.r_[np.zeros(15), np.ones(15)] + rng.normal(size=30)
    for name, noise in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        image_run(tmp_path, name, (base + noise * rng.normal(size=30)).tolist(), labels=y)
    table = compare_runs(tmp_path, "toy", ["a", "b", "c"], ["widget"], n_boot=200,
                         out=tmp_path / "o")
    rows = table[(table["category"] == "widget") & (table["metric"] == "image_auroc")]
    assert rows[["run_a", "run_b"]].values.tolist() == [["a", "b"], ["a", "c"], ["b", "c"]]
    scores = {n: pd.read_csv(tmp_path / "toy" / n / "widget/image_scores.csv")["score"]
              for n in "abc"}
    raw = [cmp.delong(y, scores[i], scores[j]).p for i, j in ("ab", "ac", "bc")]
    assert np.allclose(rows["p"], cmp.holm(raw))


def test_run_names_resolve_by_unique_prefix(tmp_path: Path) -> None:
    for name in ("padim-s256-aaa", "patchcore-s256-bbb", "patchcore-s128-ccc"):
        image_run(tmp_path, name, [0.1, 0.9])
    assert resolve_run(tmp_path, "toy", "pad") == "padim-s256-aaa"
    assert resolve_run(tmp_path, "toy", "patchcore-s128") == "patchcore-s128-ccc"
    assert resolve_run(tmp_path, "toy", "padim") == "padim-s256-aaa"  # its method's only run
    with pytest.raises(ScoresError, match="2 runs of method 'patchcore'"):
        resolve_run(tmp_path, "toy", "patchcore")
    with pytest.raises(ScoresError, match="no run of method 'knn'"):
        resolve_run(tmp_path, "toy", "knn")


def test_cli_errors_are_one_line_and_bootstrap_below_100_is_refused(tmp_path: Path,
                                                                    capsys) -> None:
    image_run(tmp_path, "alpha", [0.1, 0.2, 0.8, 0.9])
    image_run(tmp_path, "beta", [0.2, 0.1, 0.7, 0.9])
    base = ["--scores-dir", str(tmp_path), "--backbone", "toy", "--runs", "alpha,beta"]
    with pytest.raises(SystemExit) as code:
        compare_main([*base, "--bootstrap", "50"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and "at least 100" in err
    compare_main([*base, "--bootstrap", "0", "--out", str(tmp_path / "o")])
    table = pd.read_csv(tmp_path / "o" / "compare.csv")
    auroc = table[(table["category"] == "widget") & (table["metric"] == "image_auroc")].iloc[0]
    assert auroc["p"] == pytest.approx(cmp.delong([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9],
                                                  [0.2, 0.1, 0.7, 0.9]).p)
    assert math.isnan(auroc["lo"]) and "| widget | image_auroc |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compare_main(["--help"])
    assert "--runs patchcore,padim" in capsys.readouterr().out


# --------------------------------------------------------------------------- end to end


@pytest.mark.usefixtures("one_torch_thread")
def test_padim_vs_patchcore_on_the_demo(tmp_path: Path) -> None:
    from patchbank.data.demo import make_demo_dataset
    from patchbank.features.spec import ExtractSpec
    from patchbank.stages.pipeline import run_pipeline

    root = make_demo_dataset(tmp_path / "demo", size=64, n_train=6, n_test_good=4,
                             n_test_defect=2)
    run_pipeline(root, "demo_object", [ExtractSpec("efficientnet_lite0", "random",
                                                   image_size=64)],
                 ["padim", "patchcore"], banks_dir=tmp_path / "banks",
                 scores_dir=tmp_path / "scores", device="cpu", figures=False, holdout=0.0)
    runs = sorted(p.name for p in (tmp_path / "scores/efficientnet_lite0").iterdir())
    patchcore, padim = runs[1], runs[0]
    assert patchcore.startswith("patchcore") and padim.startswith("padim")
    table = compare_runs(tmp_path / "scores", "efficientnet_lite0", ["patchcore", "padim"],
                         "all", data_root=root, n_boot=100)
    out = tmp_path / "scores/efficientnet_lite0/compare"
    csv = pd.read_csv(out / "compare.csv")
    assert list(csv.columns) == COLUMNS and len(csv) == len(table) == 2 * 6
    assert set(csv["metric"]) == set(cmp.IMAGE_METRICS + cmp.PIXEL_METRICS)
    assert set(csv["category"]) == {"demo_object", "mean"}
    frames = [pd.read_csv(tmp_path / "scores/efficientnet_lite0" / r /
                          "demo_object/image_scores.csv") for r in (patchcore, padim)]
    assert frames[0]["path"].tolist() == frames[1]["path"].tolist()
    diff, _, p = direct_delong(frames[0]["label"], frames[0]["score"], frames[1]["score"])
    row = csv[(csv["category"] == "demo_object") & (csv["metric"] == "image_auroc")].iloc[0]
    assert (row["run_a"], row["run_b"]) == (patchcore, padim)
    assert abs(row["p"] - p) <= 0.01 and row["diff"] == pytest.approx(diff, abs=1e-6)
    metrics_a = pd.read_csv(tmp_path / "scores/efficientnet_lite0" / patchcore / "metrics.csv")
    for metric in ("image_auroc", "pixel_auroc", "pro", "best_dice"):
        got = csv[(csv["category"] == "demo_object") & (csv["metric"] == metric)].iloc[0]
        assert got["a"] == pytest.approx(metrics_a[metric].iloc[0], abs=1e-5)
        assert got["lo"] <= got["hi"]
    assert "| demo_object | image_auroc |" in (out / "compare.md").read_text()
    assert (out / "compare_forest.png").stat().st_size > 1000


def test_pixel_replicates_plug_in_through_pixel_stats(monkeypatch) -> None:
    import sys
    import types

    from patchbank.stages import compare as stage

    rng = np.random.default_rng(5)
    masks = [np.zeros((8, 8), bool) for _ in range(3)] + \
        [np.pad(np.ones((3, 3), bool), ((i, 5 - i), (2, 3))) for i in range(3)]
    maps = [rng.random((8, 8)) + 0.8 * m for m in masks]
    point = metrics.pixel_metrics(masks, maps, progress=False)
    weights = cmp.index_weights(cmp.stratified_indices([0, 0, 0, 1, 1, 1], 20, 0), 6)
    monkeypatch.setitem(sys.modules, "patchbank.evaluation.bootstrap", None)  # not there
    exact = stage._pixel_replicates(masks, maps, point, weights)
    assert set(exact) >= set(cmp.PIXEL_METRICS)
    repeated = [int(c) for c in weights[7]]
    want = metrics.pixel_metrics(np.repeat(np.array(masks), repeated, axis=0),
                                 np.repeat(np.array(maps), repeated, axis=0), progress=False)
    assert exact["pro"][7] == pytest.approx(want["pro"], abs=1e-12)

    class BiasedPixelStats:  # an approximation off by a constant: the stage removes it
        def __init__(self, masks, maps) -> None:
            self.masks, self.maps = masks, maps

        def metrics(self, w) -> dict[str, float]:
            k = np.asarray(w, dtype=int)
            got = metrics.pixel_metrics(np.repeat(np.array(self.masks), k, axis=0),
                                        np.repeat(np.array(self.maps), k, axis=0),
                                        progress=False)
            return {key: v + 0.01 for key, v in got.items()}

    fake = types.ModuleType("patchbank.evaluation.bootstrap")
    fake.PixelStats = BiasedPixelStats
    monkeypatch.setitem(sys.modules, "patchbank.evaluation.bootstrap", fake)
    shifted = stage._pixel_replicates(masks, maps, point, weights)
    for key in cmp.PIXEL_METRICS:
        assert np.allclose(shifted[key], exact[key], atol=1e-12)
