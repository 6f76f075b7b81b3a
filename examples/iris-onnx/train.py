"""Regenerates model.onnx: the iris logistic regression converted with skl2onnx.

Training needs scikit-learn and skl2onnx (``pip install scikit-learn skl2onnx``); serving
needs only onnxruntime and numpy (requirements.txt).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent


def main() -> None:
    iris = load_iris()
    labels = iris.target_names[iris.target]
    features = iris.data.astype(np.float32)
    model = LogisticRegression(max_iter=1000)
    model.fit(features, labels)
    # zipmap=False: probabilities come out as a plain [n, 3] tensor, not a list of dicts.
    onnx_model = to_onnx(
        model,
        features[:1],
        options={id(model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    (HERE / "model.onnx").write_bytes(onnx_model.SerializeToString())
    print(f"accuracy on the training data: {model.score(features, labels):.3f}")


if __name__ == "__main__":
    main()
