"""The Streamlit page: layout only; every computation lives in :mod:`patchbank.app.logic`.

Start it with ``patchbank-app`` or ``make app`` (127.0.0.1 only); the scores folder comes from
``PATCHBANK_SCORES_DIR`` (default ``scores``).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import streamlit as st

from patchbank.app import logic
from patchbank.core.errors import PatchbankError

SCORES_DIR = Path(os.environ.get("PATCHBANK_SCORES_DIR", "scores"))
DEVICE = os.environ.get("PATCHBANK_DEVICE", "auto")
#: launch options that narrow the run picker (``patchbank app --method patchcore`` ...)
PRESELECT = ("BACKBONE", "METHOD", "RUN", "CATEGORY")
PAGES = ["Single image", "Batch", "Leaderboard & figures", "Quick model"]


@st.cache_resource(show_spinner=False, max_entries=4)
def _load(folder: str, stamp: float, weights: str, banks_dir: str):
    return logic.load_model(folder, weights, banks_dir, DEVICE)


def _stamp(folder: str) -> float:
    try:
        return (Path(folder) / "model.npz").stat().st_mtime
    except OSError:
        return 0.0


def pick_run():
    """Sidebar: backbone -> run -> category; returns the loaded model or None."""
    runs = logic.preselect(logic.run_table(SCORES_DIR), *(os.environ.get(f"PATCHBANK_{k}")
                                                          for k in PRESELECT))
    if runs.empty:
        st.sidebar.warning(f"No fitted runs under `{SCORES_DIR}`. Run `make run` (or "
                           "patchbank score) first, or set PATCHBANK_SCORES_DIR.")
        return None
    backbone = st.sidebar.selectbox("Backbone", sorted(runs["backbone"].unique()),
                                    key="backbone")
    sub = runs[runs["backbone"] == backbone]
    run = st.sidebar.selectbox("Run", sorted(sub["run"].unique()), key="run")
    sub = sub[sub["run"] == run]
    category = st.sidebar.selectbox("Category", sorted(sub["category"].unique()),
                                    key="category")
    folder = sub[sub["category"] == category]["folder"].iloc[0]
    with st.sidebar.expander("Model options"):
        weights = st.text_input("Weights file (only for banks extracted from a file)",
                                key="weights")
        banks_dir = st.text_input("Banks folder (for the unsupervised pixel threshold)",
                                  key="banks_dir")
    try:
        with st.spinner("Loading the model (backbone and fitted scorer)…"):
            model = _load(folder, _stamp(folder), weights.strip(), banks_dir.strip())
    except PatchbankError as err:
        st.sidebar.error(str(err))
        return None
    summary = logic.metrics_summary(model)
    st.sidebar.markdown(
        f"**{summary['method']}** on **{summary['category']}**, {summary['input']} px  \n"
        + (f"image AUROC {summary['image AUROC']} · pixel AUROC {summary['pixel AUROC']} · "
           f"PRO {summary['PRO']}" if summary["evaluated"] else "not evaluated yet"))
    st.sidebar.caption(f"weights {summary['weights']}")
    return model


def _controls(model, scores=()):
    """Threshold and opacity sliders; returns (image thr, pixel thr or None, opacity)."""
    key = str(model.folder)
    thr, msg = logic.safe_threshold(model, "auto")
    if msg:
        st.warning(msg)
    lo, hi = logic.score_range(model, scores)
    default = thr.value if thr is not None else (lo + hi) / 2
    c1, c2, c3 = st.columns([2, 2, 1])
    image_thr = c1.slider("Image threshold (score ≥ threshold → anomalous)", float(lo),
                          float(hi), float(min(max(default, lo), hi)), key=f"thr::{key}",
                          format="%.6g")
    if thr is not None:
        c1.caption(f"Default: {thr}")
    pixel_thr = None
    if model.pixel_level:
        with st.spinner("Pixel threshold from the held-out train images (once per run)…"):
            pix, pmsg = logic.safe_pixel_threshold(model, "auto")
        if pix is None:
            pix, _ = logic.safe_pixel_threshold(model, "oracle")
            st.info(f"Unsupervised pixel threshold unavailable ({pmsg})"
                    + (f"; default is the oracle one: {pix}" if pix else ""))
        plo, phi = logic.pixel_range(model)
        pdefault = pix.value if pix is not None else (plo + phi) / 2
        phi = max(phi, pdefault)
        pixel_thr = c2.slider("Pixel threshold (defect mask: heatmap ≥ threshold)", float(plo),
                              float(phi), float(min(max(pdefault, plo), phi)),
                              key=f"pthr::{key}", format="%.6g")
        if pix is not None:
            c2.caption(f"Default: {pix}")
    alpha = c3.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="alpha")
    return image_thr, pixel_thr, alpha


def _show_prediction(model, pred) -> None:
    """Result first (metrics, overlay, mask), the sliders that shape it underneath."""
    result = st.container()
    st.divider()
    image_thr, pixel_thr, alpha = _controls(model, [pred.score])
    with result:
        decision = logic.decide(pred.score, image_thr)
        c1, c2, c3 = st.columns(3)
        c1.metric("Anomaly score", logic.format_score(pred.score))
        c2.metric("Decision", decision.upper())
        c3.metric("Time", f"{pred.seconds * 1000:.0f} ms",
                  help="decode, features, scoring and heatmap of this image")
        picture, mask = logic.render(model, pred, alpha, pixel_thr)
        left, right = st.columns(2)
        left.image(picture, caption="heatmap overlay" if pred.heatmap is not None else
                   "image (image-level method: no heatmap)", width="stretch")
        if mask is not None:
            right.image(mask, caption=f"predicted defect mask ({100 * (mask > 0).mean():.2f} %"
                        " of the image)", width="stretch")


def single_page(model) -> None:
    st.header("Score one image")
    source = st.radio("Image", ["Upload", "A test image of this run"], horizontal=True,
                      key="single_source")
    name = data = None
    if source == "Upload":
        f = st.file_uploader("Image (png, jpg, bmp, tif)", type=logic.IMAGE_TYPES,
                             key="single_upload")
        if f is not None:
            name, data = f.name, f.getvalue()
    else:
        tests = logic.test_images(model)
        if tests.empty:
            st.info("The run's test images are not on this machine.")
        else:
            pick = st.selectbox("Test image", tests["name"].tolist(), key="single_test")
            path = tests.loc[tests["name"] == pick, "path"].iloc[0]
            name, data = pick, Path(path).read_bytes()
    if data is None:
        st.info("Upload an image to score it.")
        return
    up = logic.check_image_bytes(name, data)
    for note in up.notes:
        st.info(note)
    if not up.ok:
        st.error(up.error)
        return
    cache = st.session_state.setdefault("single_cache", {})
    key = (str(model.folder), up.digest)
    if key not in cache:
        with st.spinner("Scoring…"):
            cache.clear()
            cache[key] = logic.score_images(model, [up.image])[0]
    _show_prediction(model, cache[key])


def batch_page(model) -> None:
    st.header("Score many images")
    files = st.file_uploader("Images or a zip of images", type=[*logic.IMAGE_TYPES, "zip"],
                             accept_multiple_files=True, key="batch_upload")
    kind = st.radio("Threshold", ["auto (unsupervised)", "f1 (oracle)"], horizontal=True,
                    key="batch_thr")
    if st.button(f"Score {len(files or [])} upload(s)", disabled=not files, key="batch_go"):
        uploads, notes = logic.check_uploads([(f.name, f.getvalue()) for f in files])
        bar = st.progress(0.0, text="scoring…")
        thr, msg = logic.safe_threshold(model, "auto" if kind.startswith("auto") else "f1")
        pix, _ = logic.safe_pixel_threshold(model, "auto")
        table, gallery = logic.batch_results(
            model, uploads, threshold=thr if thr is not None else 0.0, pixel_threshold=pix,
            progress=lambda done, total: bar.progress(done / total, text=f"{done}/{total}"))
        bar.empty()
        st.session_state["batch"] = {
            "model": str(model.folder), "table": table, "gallery": gallery, "notes": notes,
            "errors": [u.error for u in uploads if not u.ok], "msg": msg,
            "converted": [f"{u.name}: {n}" for u in uploads for n in u.notes],
            "threshold": thr}
    result = st.session_state.get("batch")
    if not result or result["model"] != str(model.folder):
        return
    for err in result["errors"]:
        st.error(err)
    if result["msg"]:
        st.warning(result["msg"])
    if result["notes"] or result["converted"]:
        with st.expander(f"{len(result['notes']) + len(result['converted'])} notes"):
            for note in result["notes"] + result["converted"]:
                st.write(note)
    table = result["table"]
    if table.empty:
        st.info("No image could be scored.")
        return
    thr = result["threshold"]
    st.subheader(f"{len(table)} images, {int((table['decision'] == 'anomalous').sum())} "
                 f"anomalous" + (f" (threshold {thr})" if thr else ""))
    st.dataframe(table, width="stretch", hide_index=True)
    st.download_button("Download CSV", logic.table_csv(table), "predictions.csv", "text/csv",
                       key="batch_csv")
    st.subheader("Gallery, highest score first")
    cols = st.columns(4)
    for i, (thumb, caption, _) in enumerate(result["gallery"]):
        cols[i % 4].image(thumb, caption=caption, width="stretch")


def leaderboard_page() -> None:
    st.header("Leaderboard")
    table, text = logic.leaderboard(SCORES_DIR)
    if table is None:
        st.info(f"No leaderboard yet under `{SCORES_DIR}` (scripts/evaluate.py writes it).")
    else:
        st.dataframe(table, width="stretch", hide_index=True)
        if text:
            with st.expander("leaderboard.md"):
                st.markdown(text)
    st.header("Figures")
    figures = logic.run_figures(SCORES_DIR)
    if not figures:
        st.info("No figures yet (scripts/evaluate.py draws them).")
        return
    run = st.selectbox("Run", list(figures), key="fig_run")
    cols = st.columns(2)
    for i, path in enumerate(figures[run]):
        cols[i % 2].image(str(path), caption=path.name, width="stretch")


def quick_page() -> None:
    st.header("Quick model from a few good images")
    st.caption("Fitted in memory on this machine; nothing is written. With 4+ images, 20 % (at "
               "least 2) are held out for the unsupervised thresholds.")
    goods = st.file_uploader("Good images (or a zip)", type=[*logic.IMAGE_TYPES, "zip"],
                             accept_multiple_files=True, key="quick_goods")
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Method", ["patchcore", "padim", "knn", "mahalanobis"],
                          key="quick_method")
    weights = c2.selectbox("Weights", ["hub", "random"], key="quick_weights")
    size = c3.selectbox("Input size", [224, 128, 64], key="quick_size")
    if st.button("Fit", disabled=not goods, key="quick_fit"):
        uploads, notes = logic.check_uploads([(f.name, f.getvalue()) for f in goods])
        for note in notes:
            st.warning(note)
        for u in uploads:
            if not u.ok:
                st.error(u.error)
        with st.status("Fitting…", expanded=True) as status:
            model = logic.quick_model([u.image for u in uploads if u.ok], method=method,
                                      weights=weights, image_size=size, device="cpu",
                                      progress=status.write)
            status.update(label="Fitted", state="complete")
        st.session_state["quick_model"] = model
    model = st.session_state.get("quick_model")
    if model is None:
        return
    held = len(model.train_scores) if model.train_scores is not None else 0
    st.success(f"{model.method} fitted on {len(model.scorer.layers_)} tap(s) of "
               f"{model.backbone}, weights {logic.short_weights(model.extractor_info.weights_id)}"
               f"; {held} images held out for the thresholds")
    f = st.file_uploader("Image to score", type=logic.IMAGE_TYPES, key="quick_test")
    if f is None:
        return
    up = logic.check_image_bytes(f.name, f.getvalue())
    if not up.ok:
        st.error(up.error)
        return
    _show_prediction(model, logic.score_images(model, [up.image])[0])


def main() -> None:
    st.set_page_config(page_title="patchbank", layout="wide")
    st.sidebar.title("patchbank")
    page = st.sidebar.radio("Page", PAGES, key="page")
    try:
        if page == "Leaderboard & figures":
            leaderboard_page()
            return
        if page == "Quick model":
            quick_page()
            return
        model = pick_run()
        if model is None:
            st.info("Pick a fitted run in the sidebar.")
            return
        (single_page if page == "Single image" else batch_page)(model)
    except PatchbankError as err:
        st.error(str(err))
    except Exception as err:  # the page must stay up whatever happens
        st.error(f"Unexpected error: {type(err).__name__}: {err}")
        with st.expander("details"):
            st.code(traceback.format_exc())


main()
