"""Regenerates model.joblib: logistic regression on scikit-learn's bundled iris data.

Run from anywhere: ``python examples/iris/train.py``. Deterministic (lbfgs, no
randomness), so a retrain gives the same predictions.
"""

from __future__ import annotations

from pathlib import Path

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent


def main() -> None:
    iris = load_iris()
    # Train on the class names, so predict() returns "setosa", not 0.
    labels = iris.target_names[iris.target]
    model = LogisticRegression(max_iter=1000)
    model.fit(iris.data, labels)
    joblib.dump(model, HERE / "model.joblib")
    print(f"accuracy on the training data: {model.score(iris.data, labels):.3f}")


if __name__ == "__main__":
    main()
