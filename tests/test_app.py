"""The Streamlit app: its logic functions, and the page driven by AppTest (no browser)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("streamlit", reason="streamlit not installed (pip install -e '.[app]')")

from streamlit.testing.v1 import AppTest  # noqa: E402
from test_predict import make_runs  # noqa: E402

from patchbank.app import logic  # noqa: E402
from patchbank.data.demo import make_demo_dataset  # noqa: E402
from patchbank.features.spec import ExtractSpec  # noqa: E402
from patchbank.inference import load_run_model, predict  # noqa: E402

PAGE = Path(logic.__file__).with_name("page.py")
TIMEOUT = 300


def png_bytes(arr: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit PNG of side x side pixels: a few KB on disk, 400 megapixels decoded."""
    return png_bytes(Image.new("1", (side, side)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("app")
    root = make_demo_dataset(base / "demo", size=64, n_train=10, n_test_good=3,
                             n_test_defect=2)
    spec = ExtractSpec("efficientnet_lite0", weights="random", image_size=64)
    runs = make_runs(base, root, ["demo_texture"], {"patchcore": {"coreset": "0.25"},
                                                    "mahalanobis": {}}, spec)
    from patchbank.stages.evaluate import leaderboard

    leaderboard(base / "scores")
    test = pd.read_csv(runs["patchcore", "demo_texture"] / "image_scores.csv")
    return {"base": base, "root": root, "runs": runs, "scores": base / "scores", "test": test}


# --------------------------------------------------------------------------- logic


def test_run_table_lists_fitted_runs_with_metrics(demo) -> None:
    table = logic.run_table(demo["scores"])
    assert sorted(table["method"]) == ["mahalanobis", "patchcore"]
    assert table["image_auroc"].notna().all()
    assert logic.run_table(demo["base"] / "nothing").empty


def test_check_image_bytes_accepts_and_converts(demo) -> None:
    rgb = np.asarray(Image.open(demo["test"]["path"][0]).convert("RGB"))
    up = logic.check_image_bytes("a.png", png_bytes(rgb))
    assert up.ok and not up.notes and np.array_equal(np.asarray(up.image), rgb)
    gray16 = (np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)
    up = logic.check_image_bytes("deep.png", png_bytes(Image.fromarray(gray16)))
    assert up.ok and up.image.mode == "RGB" and "16/32-bit" in up.notes[0]
    up = logic.check_image_bytes("gray.png", png_bytes(rgb[..., 0]))
    assert up.ok and "grayscale" in up.notes[0]
    up = logic.check_image_bytes("alpha.png", png_bytes(np.dstack([rgb, rgb[..., :1]])))
    assert up.ok and "alpha dropped" in up.notes[0]
    up = logic.check_image_bytes("photo.jpg", png_bytes(rgb, "JPEG"))
    assert up.ok


@pytest.mark.parametrize("name, data, message", [
    ("empty.png", b"", "empty file"),
    ("notes.png", b"hello, not an image", "not an image PIL can read"),
    ("anim.gif", png_bytes(np.zeros((8, 8, 3), np.uint8), "GIF"), "GIF images are not accepted"),
    ("big.png", None, "(8000x8000 pixels, decompression bomb?)"),
    ("bomb.png", None, "image too large"),
    ("trunc.png", None, "cannot read image"),
    ("../../etc/evil.png", b"x", "evil.png: not an image"),
])
def test_check_image_bytes_refuses_with_one_line(demo, name, data, message) -> None:
    if name == "bomb.png":
        data = bomb_png()  # over PIL's own limit: refused when the header is read
    if name == "big.png":
        data = bomb_png(8000)  # under PIL's limit, over the app's
    if name == "trunc.png":
        data = Path(demo["test"]["path"][0]).read_bytes()
        data = data[: len(data) // 2]
    up = logic.check_image_bytes(name, data)
    assert not up.ok and message in up.error and "\n" not in up.error


def test_read_zip_skips_unsafe_and_junk_members(demo) -> None:
    good = Path(demo["test"]["path"][0]).read_bytes()
    data = zip_bytes({
        "imgs/a.png": good, "imgs/b.PNG": good, "../escape.png": good, "/abs.png": good,
        "__MACOSX/imgs/._a.png": b"junk", "imgs/.DS_Store": b"junk", "readme.txt": b"hi",
        "nested.zip": zip_bytes({"c.png": good}), "imgs/": b"",
    })
    members, notes, error = logic.read_zip("batch.zip", data)
    assert error is None
    assert [n for n, _ in members] == ["batch.zip/a.png", "batch.zip/b.PNG"]
    text = "\n".join(notes)
    for expected in ("../escape.png: unsafe path", "/abs.png: unsafe path",
                     "__MACOSX/imgs/._a.png: hidden or system file", "readme.txt: not an image",
                     "nested.zip: not an image"):
        assert expected in text


def test_read_zip_refuses_too_many_corrupt_and_bombs(monkeypatch) -> None:
    tiny = png_bytes(np.zeros((4, 4, 3), np.uint8))
    monkeypatch.setattr(logic, "MAX_ZIP_IMAGES", 3)
    _, _, error = logic.read_zip("many.zip", zip_bytes({f"{i}.png": tiny for i in range(4)}))
    assert "4 images, the limit is 3" in error
    _, _, error = logic.read_zip("bad.zip", b"PK\x03\x04 not really a zip")
    assert "not a readable zip" in error
    members, notes, error = logic.read_zip("z.zip", zip_bytes({"zeros.png": bytes(10 << 20)}))
    assert error is None and not members and "zip bomb?" in notes[0]
    monkeypatch.setattr(logic, "MAX_MEMBER_BYTES", 100)
    members, notes, _ = logic.read_zip("z.zip", zip_bytes({"big.png": bytes(range(256)) * 2}))
    assert not members and "over the" in notes[0]


def test_check_uploads_expands_zips_and_keeps_errors(demo) -> None:
    good = Path(demo["test"]["path"][0]).read_bytes()
    uploads, notes = logic.check_uploads([
        ("one.png", good), ("set.zip", zip_bytes({"x/two.png": good, "bad.png": b"nope"})),
        ("empty.zip", zip_bytes({"readme.md": b"-"})),
    ])
    assert [u.name for u in uploads] == ["one.png", "set.zip/two.png", "set.zip/bad.png"]
    assert [u.ok for u in uploads] == [True, True, False]
    assert any("empty.zip: no images" in n for n in notes)


def test_batch_results_table_and_gallery_sorted_by_score(demo) -> None:
    model = load_run_model(demo["runs"]["patchcore", "demo_texture"], device="cpu")
    paths = demo["test"]["path"].tolist()
    uploads, _ = logic.check_uploads([(Path(p).name, Path(p).read_bytes()) for p in paths])
    seen = []
    table, gallery = logic.batch_results(model, uploads, progress=lambda d, t: seen.append(d))
    assert seen[-1] == len(paths) and len(table) == len(gallery) == len(paths)
    assert table["score"].is_monotonic_decreasing
    assert [g[2] for g in gallery] == table["score"].tolist()
    np.testing.assert_allclose(sorted(table["score"]), sorted(demo["test"]["score"]), rtol=1e-5)
    assert max(g[0].shape[0] for g in gallery) <= logic.THUMB_SIDE
    assert logic.table_csv(table).decode().splitlines()[0].startswith("image,score,decision")


def test_render_mask_follows_the_pixel_threshold(demo) -> None:
    model = load_run_model(demo["runs"]["patchcore", "demo_texture"], device="cpu")
    up = logic.check_image_bytes("x.png", Path(demo["test"]["path"].iloc[-1]).read_bytes())
    pred = logic.score_images(model, [up.image])[0]
    lo, hi = logic.pixel_range(model, [pred])
    _, none = logic.render(model, pred, 0.5, hi + 1)
    _, full = logic.render(model, pred, 0.5, lo - 1)
    assert none.max() == 0 and full.min() == 255 and full.shape == pred.image.shape[:2]


def test_quick_model_fits_in_memory(demo, tmp_path) -> None:
    goods = sorted((demo["root"] / "demo_texture" / "train" / "good").glob("*.png"))
    images = [Image.open(p).convert("RGB") for p in goods]
    model = logic.quick_model(images, method="padim", weights="random", image_size=64)
    assert model.train_scores is not None and len(model.train_scores) == 2
    assert model.image_threshold().kind == "unsupervised"
    assert model.pixel_threshold("auto").kind == "unsupervised"
    pred = predict(model, [images[0]], maps=True, pixel_threshold="auto")[0]
    assert pred.heatmap.shape == (64, 64)
    assert len(logic.quick_model(images[:5], method="padim", weights="random",
                                 image_size=64).train_scores) == 2
    small = logic.quick_model(images[:3], method="padim", weights="random", image_size=64)
    assert small.train_scores is None  # too few images to hold any out
    assert logic.safe_threshold(small)[0] is None
    assert logic.score_images(small, images[:1])[0].decision == "good"
    assert logic.safe_pixel_threshold(small, "auto")[0] is None
    assert logic.safe_pixel_threshold(small, "oracle")[0] is None
    with pytest.raises(Exception, match="at least 2 good images"):
        logic.quick_model(images[:1])


# --------------------------------------------------------------------------- the page


@pytest.fixture
def app(demo, monkeypatch) -> AppTest:
    monkeypatch.setenv("PATCHBANK_SCORES_DIR", str(demo["scores"]))
    monkeypatch.setenv("PATCHBANK_DEVICE", "cpu")
    at = AppTest.from_file(str(PAGE), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    return at


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def _pick(at: AppTest, method: str) -> None:
    run = next(o for o in at.selectbox(key="run").options if o.startswith(method))
    at.selectbox(key="run").set_value(run)
    at.run()
    assert not at.exception


def test_page_picks_a_run_and_shows_its_metrics(app, demo) -> None:
    assert app.radio(key="page").value == "Single image"
    assert app.selectbox(key="backbone").value == "efficientnet_lite0"
    assert len(app.selectbox(key="run").options) == 2
    _pick(app, "patchcore")
    assert "patchcore" in app.sidebar.markdown[0].value
    assert "image AUROC" in app.sidebar.markdown[0].value
    assert not _errors(app)


def test_page_single_upload_scores_and_draws(app, demo) -> None:
    _pick(app, "patchcore")
    row = demo["test"].iloc[-1]
    app.file_uploader(key="single_upload").set_value(
        ("defect.png", Path(row["path"]).read_bytes(), "image/png"))
    app.run()
    assert not app.exception and not _errors(app)
    metrics = {m.label: m.value for m in app.metric}
    assert float(metrics["Anomaly score"]) == pytest.approx(row["score"], rel=1e-3)
    assert metrics["Decision"] in ("ANOMALOUS", "GOOD")
    captions = [c for img in app.image for c in img.captions]
    assert "heatmap overlay" in captions and any("defect mask" in c for c in captions)
    # the threshold sliders change the decision without rescoring
    app.slider(key=f"thr::{demo['runs']['patchcore', 'demo_texture']}").set_value(
        app.slider(key=f"thr::{demo['runs']['patchcore', 'demo_texture']}").min)
    app.run()
    assert {m.label: m.value for m in app.metric}["Decision"] == "ANOMALOUS"
    app.slider(key="alpha").set_value(0.9)
    app.run()
    assert not app.exception


def test_page_test_image_path(app, demo) -> None:
    _pick(app, "mahalanobis")
    app.radio(key="single_source").set_value("A test image of this run")
    app.run()
    name = app.selectbox(key="single_test").options[0]
    app.selectbox(key="single_test").set_value(name)
    app.run()
    assert not app.exception and not _errors(app)
    scores = pd.read_csv(demo["runs"]["mahalanobis", "demo_texture"] / "image_scores.csv")
    expected = scores["score"][[f"{d}/{Path(p).name}" == name for d, p in
                                zip(scores["defect_type"], scores["path"], strict=True)]]
    shown = float({m.label: m.value for m in app.metric}["Anomaly score"])
    assert shown == pytest.approx(float(expected.iloc[0]), rel=1e-3)
    assert any("no heatmap" in c for img in app.image for c in img.captions)


@pytest.mark.parametrize("name, kind", [
    ("notes.png", "text"), ("trunc.png", "truncated"), ("bomb.png", "bomb"),
    ("deep.png", "16-bit"), ("gray.png", "grayscale")])
def test_page_bad_uploads_show_a_message(app, demo, name, kind) -> None:
    sample = Path(demo["test"]["path"][0]).read_bytes()
    data = {"text": b"just text", "truncated": sample[: len(sample) // 3], "bomb": bomb_png(),
            "16-bit": png_bytes(Image.fromarray(np.full((40, 40), 40000, np.uint16))),
            "grayscale": png_bytes(np.full((40, 30), 128, np.uint8))}[kind]
    app.file_uploader(key="single_upload").set_value((name, data, "image/png"))
    app.run()
    assert not app.exception
    if kind in ("16-bit", "grayscale"):
        assert not _errors(app)
        assert any("converted" in i.value or "scaled" in i.value for i in app.info)
        assert "Anomaly score" in [m.label for m in app.metric]
    else:
        assert len(_errors(app)) == 1 and name in _errors(app)[0]
        assert not app.metric


def test_page_batch_with_zip_table_gallery_and_csv(app, demo) -> None:
    _pick(app, "patchcore")
    app.radio(key="page").set_value("Batch")
    app.run()
    paths = demo["test"]["path"].tolist()
    files = [(Path(p).name, Path(p).read_bytes(), "image/png") for p in paths[:3]]
    files.append(("more.zip", zip_bytes({f"z/{i}_{Path(p).name}": Path(p).read_bytes()
                                         for i, p in enumerate(paths[3:])}
                                        | {"../evil.png": b"x", "junk.txt": b"x"}),
                  "application/zip"))
    files.append(("broken.png", b"garbage", "image/png"))
    app.file_uploader(key="batch_upload").set_value(files)
    app.run()
    app.button(key="batch_go").click()
    app.run()
    assert not app.exception
    assert _errors(app) == ["broken.png: not an image PIL can read (accepted: png, jpg, jpeg, "
                            "bmp, tif, tiff)"]
    table = app.dataframe[0].value
    assert len(table) == len(paths) and table["score"].is_monotonic_decreasing
    gallery = [c for img in app.image for c in img.captions]
    assert len(gallery) == len(paths) and gallery[0].startswith(table["image"][0])
    assert app.get("download_button")
    notes = " ".join(e.value for e in app.markdown)
    assert "../evil.png: unsafe path" in notes and "junk.txt: not an image" in notes


def test_page_leaderboard_and_figures(app, demo) -> None:
    app.radio(key="page").set_value("Leaderboard & figures")
    app.run()
    assert not app.exception and not _errors(app)
    assert len(app.dataframe[0].value) == 2
    assert app.header[1].value == "Figures"


def test_page_without_runs_says_what_to_do(demo, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATCHBANK_SCORES_DIR", str(tmp_path))
    at = AppTest.from_file(str(PAGE), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    assert "No fitted runs" in at.sidebar.warning[0].value


def test_page_quick_model(app, demo) -> None:
    app.radio(key="page").set_value("Quick model")
    app.run()
    goods = sorted((demo["root"] / "demo_texture" / "train" / "good").glob("*.png"))
    app.file_uploader(key="quick_goods").set_value(
        [(p.name, p.read_bytes(), "image/png") for p in goods])
    app.selectbox(key="quick_method").set_value("padim")
    app.selectbox(key="quick_weights").set_value("random")
    app.selectbox(key="quick_size").set_value(64)
    app.run()
    app.button(key="quick_fit").click()
    app.run()
    assert not app.exception and not _errors(app)
    assert "padim" in app.success[0].value
    app.file_uploader(key="quick_test").set_value(
        ("t.png", Path(demo["test"]["path"].iloc[-1]).read_bytes(), "image/png"))
    app.run()
    assert not app.exception
    assert "Anomaly score" in [m.label for m in app.metric]


def test_launcher_binds_localhost_only() -> None:
    from patchbank.app.launch import PAGE as LAUNCHED
    from patchbank.app.launch import streamlit_argv

    argv = streamlit_argv(8600)
    assert argv[:3] == ["streamlit", "run", str(LAUNCHED)] and LAUNCHED == PAGE
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8600"
    assert flags["--server.headless"] == "true"
    assert flags["--browser.gatherUsageStats"] == "false"
