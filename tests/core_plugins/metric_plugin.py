"""A non-backend plugin that contributes a metric; it must stay registered in every worker."""

import numpy as np

from cxrbench.hookspecs import hookimpl


@hookimpl
def cxrbench_evaluate(labels, scores, classes, settings):
    return {"positives_fraction": float(np.mean(labels))}
