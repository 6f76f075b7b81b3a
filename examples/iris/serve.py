"""Serving script for the iris classifier (the Shipyard model folder contract).

``load`` runs once per worker process; ``predict`` runs for every request.
"""

from __future__ import annotations

import os
from typing import Any

import joblib
import numpy as np

N_FEATURES = 4  # sepal length, sepal width, petal length, petal width (cm)


def load(model_dir: str) -> Any:
    """Loads the fitted LogisticRegression written by train.py."""
    return joblib.load(os.path.join(model_dir, "model.joblib"))


def _rows(payload: Any) -> list[list[float]]:
    if not isinstance(payload, list) or not payload:
        raise ValueError("expected a list of rows, e.g. [[5.1, 3.5, 1.4, 0.2]]")
    if not isinstance(payload[0], list):
        payload = [payload]  # one row sent on its own: [5.1, 3.5, 1.4, 0.2]
    for row in payload:
        n = len(row) if isinstance(row, list) else 1
        if n != N_FEATURES:
            raise ValueError(f"expected {N_FEATURES} features, got {n}")
    return payload


def predict(model: Any, payload: Any) -> list[str]:
    """Rows of 4 measurements in, one class name per row out."""
    features = np.asarray(_rows(payload), dtype=np.float64)
    return model.predict(features).tolist()


def predict_batch(model: Any, payloads: list[Any]) -> list[list[str]]:
    """Several requests in one model call (for the runtime's adaptive batching)."""
    batches = [_rows(payload) for payload in payloads]
    features = np.asarray([row for rows in batches for row in rows], dtype=np.float64)
    names = model.predict(features).tolist()
    results, start = [], 0
    for rows in batches:
        results.append(names[start : start + len(rows)])
        start += len(rows)
    return results
