"""Serving script for the ONNX iris classifier: onnxruntime, no scikit-learn at serve time."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort

N_FEATURES = 4


def load(model_dir: str) -> ort.InferenceSession:
    """Opens model.onnx once per worker process."""
    options = ort.SessionOptions()
    # One model copy per worker process: parallelism comes from the workers, so each
    # session uses one thread instead of every core (which N workers would oversubscribe).
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"]
    )


def predict(session: ort.InferenceSession, payload: Any) -> dict[str, Any]:
    """Rows of 4 measurements in; class names and probabilities out."""
    if not isinstance(payload, list) or not payload:
        raise ValueError("expected a list of rows, e.g. [[5.1, 3.5, 1.4, 0.2]]")
    rows = payload if isinstance(payload[0], list) else [payload]
    for row in rows:
        n = len(row) if isinstance(row, list) else 1
        if n != N_FEATURES:
            raise ValueError(f"expected {N_FEATURES} features, got {n}")
    features = np.asarray(rows, dtype=np.float32)
    label, probabilities = session.run(None, {session.get_inputs()[0].name: features})
    return {"label": label.tolist(), "probabilities": probabilities.tolist()}
