"""Regenerates model.pkl: a random forest on scikit-learn's bundled iris data.

Run from anywhere: ``python examples/iris-oci/train.py``. ``random_state`` is fixed, so a
retrain gives the same forest.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier

HERE = Path(__file__).resolve().parent


def main() -> None:
    iris = load_iris()
    labels = iris.target_names[iris.target]
    # Few shallow trees: the pickle stays small enough to check in.
    model = RandomForestClassifier(n_estimators=20, max_depth=4, random_state=0)
    model.fit(iris.data, labels)
    with open(HERE / "model.pkl", "wb") as f:
        pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)
    print(f"accuracy on the training data: {model.score(iris.data, labels):.3f}")


if __name__ == "__main__":
    main()
