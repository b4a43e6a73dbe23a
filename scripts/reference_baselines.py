"""Standard classifiers on the embedded datasets, for the README's reference numbers.

    python scripts/reference_baselines.py

Each classifier is fit on all training rows of equimodal's split (train and validation
together: nothing is selected, so no hold-out is needed) with the features standardised on
those rows, and scored once on the same test rows as equimodal's runs: mfeat on the TMC
split (1600 / 400), HTAD on seeds 0-4 (stratified 80/20). Prints Markdown tables.
"""

from __future__ import annotations

import statistics
import warnings

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from equimodal.data.registry import load_dataset

CLASSIFIERS = {
    "logistic regression": lambda seed: LogisticRegression(max_iter=5000),
    "RBF-SVM (C=10)": lambda seed: SVC(C=10.0),
    "gradient boosting": lambda seed: GradientBoostingClassifier(random_state=seed),
    "MLP (256)": lambda seed: MLPClassifier((256,), max_iter=1000, random_state=seed),
}


def arrays(data, views):
    """Training (train + validation) and test arrays of the named views, concatenated."""

    def stack(split):
        return np.concatenate([split.features[m].numpy() for m in views], axis=1)

    x_train = np.concatenate([stack(data.train), stack(data.val)])
    y_train = np.concatenate([data.train.labels.numpy(), data.val.labels.numpy()])
    return x_train, y_train, stack(data.test), data.test.labels.numpy()


def score(name, seed, data, views):
    """Test accuracy (%) of classifier ``name`` on ``views``."""
    x_train, y_train, x_test, y_test = arrays(data, views)
    model = make_pipeline(StandardScaler(), CLASSIFIERS[name](seed))
    model.fit(x_train, y_train)
    return 100.0 * float((model.predict(x_test) == y_test).mean())


def main() -> None:
    warnings.simplefilter("ignore", ConvergenceWarning)
    mfeat = load_dataset("mfeat", seed=0, split="tmc")
    print("mfeat, TMC split (1600 train / 400 test), test accuracy %\n")
    print("| views | logistic regression | RBF-SVM (C=10) |\n|---|---|---|")
    for views in [[m] for m in mfeat.modalities] + [list(mfeat.modalities)]:
        label = "all (concatenated)" if len(views) > 1 else views[0]
        lr = score("logistic regression", 0, mfeat, views)
        svm = score("RBF-SVM (C=10)", 0, mfeat, views)
        print(f"| {label} | {lr:.2f} | {svm:.2f} |")
    print("\nHTAD, seeds 0-4 (stratified 80/20), test accuracy % (mean ± std)\n")
    print("| views | " + " | ".join(CLASSIFIERS) + " |\n|---|" + "---|" * len(CLASSIFIERS))
    splits = [load_dataset("htad", seed=s) for s in range(5)]
    modalities = list(splits[0].modalities)
    for views in [[m] for m in modalities] + [modalities]:
        label = "both (concatenated)" if len(views) > 1 else views[0]
        cells = []
        for name in CLASSIFIERS:
            accs = [score(name, s, data, views) for s, data in enumerate(splits)]
            cells.append(f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
