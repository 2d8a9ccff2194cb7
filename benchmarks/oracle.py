"""The closed-form reference of a transfer benchmark: logistic regression on the frozen features.

    features = backbone without its classifier (timm reset_classifier(0)), eval mode, no augmentation
    C        = the best of C_GRID on the validation split (ties: the smaller C, more regularised)
    oracle   = multinomial logistic regression (scikit-learn, lbfgs) with that C, refitted on the
               training split it stands for, scored on the test split

No training loop, schedule, initialisation or learning rate is involved, so a trained linear
probe that ends well under it points at the loop, not at the method (``probe_gap``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utune_fx.specs import load_model

C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
ORACLE = "oracle: logistic regression"  # the oracle row's method name in every results file
PROBE_GAP_POINTS = 2.0  # the bound: a trained linear probe this far under the oracle is suspect


@torch.no_grad()
def frozen_features(spec: str, dataset: Dataset, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of ``dataset`` through the spec's model with its classifier removed."""
    model = load_model(spec).model
    model.reset_classifier(0)
    features, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size):
        features.append(model(images).double().numpy())
        labels.append(targets.numpy())
    return np.concatenate(features), np.concatenate(labels)


def _fit(c: float, features: np.ndarray, labels: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000).fit(features, labels)


def logistic_oracle(search_train, search_val, final_train, test) -> dict:
    """Each argument is (features, labels). C is chosen by training on ``search_train`` and scoring on
    ``search_val``; the chosen C is refitted on ``final_train`` and scored on ``test``."""
    scores = {c: float(_fit(c, *search_train).score(*search_val)) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (scores[c], -c))
    return {
        "method": ORACLE,
        "C": best,
        "val_accuracy": scores[best],
        "val_accuracy_per_C": {f"{c:g}": s for c, s in scores.items()},
        "test_accuracy": float(_fit(best, *final_train).score(*test)),
        "train_images": len(final_train[1]),
        "feature_width": int(final_train[0].shape[1]),
    }


def probe_gap(probe_accuracy: float, oracle_accuracy: float) -> str | None:
    """A loud line when the trained linear probe ends more than PROBE_GAP_POINTS under the oracle."""
    gap = 100 * (oracle_accuracy - probe_accuracy)
    if gap <= PROBE_GAP_POINTS:
        return None
    return (
        f"WARNING: the trained linear probe ({probe_accuracy:.1%}) ends {gap:.1f} points under the closed-form "
        f"oracle ({oracle_accuracy:.1%}), more than {PROBE_GAP_POINTS:g}: the training loop (head init, "
        "schedule, learning rate), not the method, is in question for every row"
    )
