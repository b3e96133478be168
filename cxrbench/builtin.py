"""The core's own plugin, registered like any other: the two data sets and AUROC evaluation."""

from __future__ import annotations

from pathlib import Path

from cxrbench.hookspecs import hookimpl


@hookimpl
def cxrbench_dataset(settings):
    from cxrbench.data import nih, phantom

    data = settings.data
    if data.source == "phantom":
        root = (
            Path(data.path)
            if data.path
            else phantom.ensure_default(data.phantom_images, data.phantom_size, settings.run.seed)
        )
    elif data.source == "chestxray14":
        root = Path(data.path) if data.path else None
        if root is None:
            from cxrbench.errors import SuiteError

            raise SuiteError(f"suite {settings.name!r}: data.source = 'chestxray14' needs data.path (or --data DIR)")
    else:
        return None
    return nih.read_index(
        root,
        split=data.split,
        val_fraction=data.val_fraction,
        seed=settings.run.seed,
        exclude=Path(data.exclude) if data.exclude else None,
        source=data.source,
    )


@hookimpl
def cxrbench_evaluate(labels, scores, classes, groups, settings):
    from cxrbench.metrics.auroc import auroc_report

    return {
        "auroc": auroc_report(
            labels,
            scores,
            classes,
            groups=groups,
            min_positives=settings.eval.min_positives,
            rounds=settings.eval.bootstrap_rounds,
            confidence=settings.eval.confidence,
            seed=settings.run.seed,
        )
    }
