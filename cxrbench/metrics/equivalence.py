"""Cross-backend checks: do the backends compute the same function, and do they agree after training?

Before training (shared initial weights) every backend, natively and through its ``init.onnx``
in onnxruntime, must give the same logits on the same images within ``run.equivalence_atol``;
a failure names the two models and the difference. After training, backends cannot agree
exactly, so their AUROCs are compared per class with DeLong's test and their scores correlated.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from cxrbench.data.classes import CLASSES


def equivalence_matrix(outputs: dict[str, np.ndarray], atol: float) -> dict[str, Any]:
    """Max and mean absolute logit differences between every pair of models, and the verdict.

    :param outputs: label (``"pytorch"``, ``"pytorch/onnx"``...) -> logits ``(N, C)`` of the same images.
    """
    labels = list(outputs)
    arrays = [np.asarray(outputs[k], dtype=np.float64) for k in labels]
    n = len(labels)
    max_abs, mean_abs = np.zeros((n, n)), np.zeros((n, n))
    failures = []
    for i in range(n):
        for j in range(n):
            if arrays[i].shape != arrays[j].shape:
                max_abs[i, j] = mean_abs[i, j] = np.inf
            else:
                diff = np.abs(arrays[i] - arrays[j])
                max_abs[i, j], mean_abs[i, j] = diff.max(initial=0.0), diff.mean() if diff.size else 0.0
            if j > i and not max_abs[i, j] <= atol:
                failures.append(
                    f"{labels[j]} computes a different function from {labels[i]}: "
                    f"max |logit diff| {max_abs[i, j]:.3g} > {atol:g}"
                )
    return {
        "atol": atol,
        "labels": labels,
        "max_abs": max_abs.tolist(),
        "mean_abs": mean_abs.tolist(),
        "passed": not failures,
        "failures": failures,
    }


def model_passes(matrix: dict[str, Any], label: str) -> bool | None:
    """Whether ``label`` agrees with every other model of the matrix (None when it is absent)."""
    if label not in matrix.get("labels", []):
        return None
    row = matrix["max_abs"][matrix["labels"].index(label)]
    return all(value is not None and value <= matrix["atol"] for value in row)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def agreement(
    name_a: str,
    logits_a: np.ndarray,
    name_b: str,
    logits_b: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    **inference: Any,
) -> dict[str, Any]:
    """Per-class and mean AUROC differences by a paired patient bootstrap with Holm-adjusted p-values
    (image-level DeLong beside them), and the correlation of the two models' scores.

    ``groups``: the patient of each row (None: images count as independent, and the result says so);
    ``inference``: rounds, confidence, seed, min_positives of :func:`cxrbench.metrics.inference.compare_aurocs`.
    """
    from cxrbench.metrics.inference import compare_aurocs

    scores_a, scores_b = _sigmoid(logits_a), _sigmoid(logits_b)
    return {
        "a": name_a,
        "b": name_b,
        **compare_aurocs(labels, scores_a, scores_b, CLASSES, groups=groups, **inference),
        "score_correlation": {
            "pearson": float(stats.pearsonr(scores_a.ravel(), scores_b.ravel())[0]),
            "spearman": float(stats.spearmanr(scores_a.ravel(), scores_b.ravel())[0]),
        },
    }
