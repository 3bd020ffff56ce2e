"""Predictions on new images with a fitted score run (``model.npz`` + ``run.json``).

>>> model = load_run_model("scores/efficientnet_lite0/<run>/bottle")  # doctest: +SKIP
>>> [p.row() for p in predict(model, ["new.png"], maps=True, pixel_threshold="auto")]
... # doctest: +SKIP
"""

from patchbank.inference.model import (
    MANUAL,
    ORACLE_DICE,
    ORACLE_F1,
    UNSUPERVISED,
    RunModel,
    Threshold,
    find_runs,
    load_run_model,
    parse_threshold,
)
from patchbank.inference.predict import (
    Prediction,
    features,
    iter_predict,
    list_images,
    overlay,
    predict,
    prediction_overlay,
)

__all__ = [
    "MANUAL",
    "ORACLE_DICE",
    "ORACLE_F1",
    "UNSUPERVISED",
    "Prediction",
    "RunModel",
    "Threshold",
    "features",
    "find_runs",
    "iter_predict",
    "list_images",
    "load_run_model",
    "overlay",
    "parse_threshold",
    "predict",
    "prediction_overlay",
]
