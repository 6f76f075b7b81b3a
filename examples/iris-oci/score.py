"""OCI-style scoring script (as OCI Data Science model deployments use) for the iris forest.

Shipyard calls ``load_model()`` once per worker process, with the model folder as the
working directory and ``$SHIPYARD_MODEL_DIR`` set, then ``predict(data, model)`` for every
request.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

MODEL_FILE = "model.pkl"
N_FEATURES = 4


def load_model(model_file_name: str = MODEL_FILE) -> Any:
    """Unpickles the fitted RandomForestClassifier written by train.py."""
    model_dir = os.environ.get("SHIPYARD_MODEL_DIR", os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(model_dir, model_file_name), "rb") as f:
        return pickle.load(f)  # noqa: S301 - our own model file, shipped in this folder


def predict(data: Any, model: Any = None) -> dict[str, Any]:
    """Rows of 4 measurements in; class names and class probabilities out."""
    if model is None:
        model = load_model()
    if not isinstance(data, list) or not data:
        raise ValueError("expected a list of rows, e.g. [[5.1, 3.5, 1.4, 0.2]]")
    rows = data if isinstance(data[0], list) else [data]
    for row in rows:
        n = len(row) if isinstance(row, list) else 1
        if n != N_FEATURES:
            raise ValueError(f"expected {N_FEATURES} features, got {n}")
    return {
        "prediction": model.predict(rows).tolist(),
        "probabilities": model.predict_proba(rows).tolist(),
    }
