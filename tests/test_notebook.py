"""notebooks/heatmaps.ipynb: committed without outputs, runs top to bottom on the demo dataset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "heatmaps.ipynb"
CATEGORY = "demo_object"
METHODS = ("padim", "patchcore")


def test_notebook_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    first = code[0]
    assert "parameters" in first.metadata.get("tags", [])
    for name in ("DATA_ROOT", "BANKS_DIR", "SCORES_DIR", "BACKBONE", "METHODS", "CATEGORY"):
        assert f"\n{name} = " in f"\n{first.source}"


def private_kernel(folder: Path) -> Path:
    """A ``python3`` kernelspec running this interpreter, found first via JUPYTER_PATH."""
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "patchbank test kernel", "language": "python",
    }))
    return folder


def outputs_of(cell) -> tuple[str, int]:
    """All text of a cell's outputs, and how many PNG images it shows."""
    text, images = [], 0
    for out in cell.outputs:
        if out.output_type == "stream":
            text.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            text.append(str(out.data.get("text/plain", "")) + str(out.data.get("text/html", "")))
            images += "image/png" in out.data
    return "".join(text), images


def test_notebook_executes_on_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from patchbank.data.demo import make_demo_dataset
    from patchbank.features.spec import ExtractSpec
    from patchbank.stages.pipeline import run_pipeline

    data = make_demo_dataset(tmp_path / "demo", size=128, n_train=10, n_test_good=4,
                             n_test_defect=2)
    banks, scores = tmp_path / "featurebanks", tmp_path / "scores"
    spec = ExtractSpec("efficientnet_lite0", weights="random", image_size=64)
    board = run_pipeline(data, CATEGORY, [spec], METHODS, banks_dir=banks, scores_dir=scores,
                         device="cpu", figures=True)
    runs = sorted(p.name for p in (scores / "efficientnet_lite0").iterdir() if p.is_dir())
    assert sorted(board["method"]) == runs and len(runs) == len(METHODS)
    for run in runs:  # the evaluate stage drew this category's figures and wrote its metrics
        assert (scores / "efficientnet_lite0" / run / CATEGORY / "metrics.json").is_file()
        figures = {p.name for p in (scores / "efficientnet_lite0" / run / "figures").iterdir()}
        assert {f"{CATEGORY}_roc_pr.png", f"{CATEGORY}_hist.png"} <= figures
        assert any(name.startswith(f"{CATEGORY}_best_") for name in figures)

    for key, value in {"DATA_ROOT": data, "BANKS_DIR": banks, "SCORES_DIR": scores,
                       "BACKBONE": "efficientnet_lite0", "METHODS": ",".join(METHODS),
                       "CATEGORY": CATEGORY, "N_RANDOM": "1"}.items():
        monkeypatch.setenv(f"PATCHBANK_{key}", str(value))
    monkeypatch.setenv("JUPYTER_PATH", str(private_kernel(tmp_path / "jupyter")))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    # Streamlit (imported by the app tests in this process) sets MPLBACKEND=Agg, which the
    # kernel would inherit: plt.show() would then display nothing.
    monkeypatch.delenv("MPLBACKEND", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    text = {i: outputs_of(c) for i, c in enumerate(code)}
    everything = "".join(t for t, _ in text.values())
    assert str(scores) in everything and f"efficientnet_lite0 / {CATEGORY}" in everything
    metrics_text = next(t for t, _ in text.values() if "image_auroc" in t)
    assert all(r in metrics_text for r in runs)  # method names resolved to their run folders
    # triplets: best + worst (a miss and a false alarm) + 1 random, for each method
    triplet_images = [n for t, n in text.values() if n >= 4]
    assert triplet_images == [4, 4]
    assert outputs_of(code[-1])[1] == 1  # the side-by-side comparison
