"""Linear probes on frozen fingerprints, cross-validated by subject, with bootstrap CIs.

- classes: standardised features -> logistic regression (L2, C=1); AUROC for two classes, macro
  one-vs-rest AUROC for more (the mean over classes of class-vs-rest AUROC, as scikit-learn's
  ``roc_auc_score(multi_class="ovr", average="macro")``);
- values: standardised features -> ridge with its α (1e-4 ... 1e4) chosen by an inner
  cross-validation BY SUBJECT on the training fold (3 folds, MAE): rows of one subject are
  alike, and leave-one-row-out would pick the α that memorises subjects; MAE, beside the MAE of
  the mean predictor (each fold's training mean);
- k folds disjoint by subject (StratifiedGroupKFold for classes, GroupKFold for values), so no
  subject is ever in training and test; the folds are redrawn `repeats` times and each row's
  out-of-fold predictions averaged (small cohorts: one fold draw alone moves AUROC by ~0.1);
- 95 % CI: percentile bootstrap over SUBJECTS (all rows of a drawn subject come along), seeded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy.stats import rankdata

from biofp_core.errors import DataError
from biofp_core.evaluation.labels import TaskKind

METRIC_OF: dict[str, str] = {"binary": "auroc", "multiclass": "macro_auroc", "regression": "mae"}
RIDGE_ALPHAS = np.logspace(-4, 4, 17)


class ProbeResult(BaseModel):
    """One probe: the out-of-fold metric with its bootstrap CI and a baseline."""

    model_config = ConfigDict(frozen=True)

    task: str
    kind: TaskKind
    metric: str  # "auroc" | "macro_auroc" | "mae"
    value: float
    ci_low: float
    ci_high: float
    baseline: float  # chance (0.5) for AUROC; the mean predictor's MAE for regression
    subjects: int
    rows: int
    folds: int
    repeats: int = 1
    classes: list[str] = []


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of binary `y` (0/1) by `score` (Mann-Whitney, ties count 1/2)."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both classes")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean over classes of class-vs-rest AUROC; y holds class indices, proba is (N, C)."""
    return float(np.mean([auroc((y == c).astype(int), proba[:, c]) for c in range(proba.shape[1])]))


def score(kind: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The task's metric of out-of-fold predictions (probabilities of classes, or values)."""
    if kind == "regression":
        return float(np.mean(np.abs(y - pred)))
    if kind == "binary":
        return auroc(y, pred[:, 1])
    return macro_auroc(y, pred)


def _folds(
    y: np.ndarray, groups: np.ndarray, kind: str, folds: int, seed: int, task: str
) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """The fold count and the (train, test) index splits, disjoint by subject."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if kind == "regression":
        k = min(folds, n_groups)
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        per_class = [len(np.unique(groups[y == c])) for c in np.unique(y)]
        if len(per_class) < 2:
            raise DataError(f"task {task!r}: a single class among the labelled rows")
        k = min(folds, min(per_class))
        splitter = StratifiedGroupKFold(n_splits=max(k, 2), shuffle=True, random_state=seed)
        y = y.astype(int)
    if k < 2:
        raise DataError(
            f"task {task!r}: cross-validation by subject needs 2 subjects per class or value "
            f"set, got {n_groups if kind == 'regression' else min(per_class)}"
        )
    return k, splitter.split(np.zeros(len(y)), y, groups)


def ridge_alpha(X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, folds: int = 3) -> float:
    """The ridge α of :data:`RIDGE_ALPHAS` with the lowest MAE over `folds` inner folds by
    subject (standardised on each inner training part); the largest α when too few subjects."""
    from sklearn.model_selection import GroupKFold

    k = min(folds, len(np.unique(groups)))
    if k < 2:
        return float(RIDGE_ALPHAS[-1])
    errors = np.zeros(len(RIDGE_ALPHAS))
    for train, test in GroupKFold(n_splits=k).split(X, y, groups):
        mean, std = X[train].mean(0), X[train].std(0) + 1e-12
        A, B = (X[train] - mean) / std, (X[test] - mean) / std
        yc = y[train] - y[train].mean()
        u, sv, vt = np.linalg.svd(A, full_matrices=False)  # one SVD serves every α
        uy = u.T @ yc
        for i, alpha in enumerate(RIDGE_ALPHAS):
            coef = vt.T @ (sv / (sv**2 + alpha) * uy)
            errors[i] += np.abs(B @ coef + y[train].mean() - y[test]).sum()
    return float(RIDGE_ALPHAS[int(np.argmin(errors))])


def _fit_predict(
    kind: str, X: np.ndarray, y: np.ndarray, X_test: np.ndarray, n_classes: int,
    groups: np.ndarray,
) -> np.ndarray:  # fmt: skip
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "regression":
        model = make_pipeline(StandardScaler(), Ridge(alpha=ridge_alpha(X, y, groups)))
        return model.fit(X, y).predict(X_test)
    proba = np.zeros((len(X_test), n_classes))
    present = np.unique(y).astype(int)
    if len(present) == 1:  # a training fold with one class: predict it
        proba[:, present[0]] = 1.0
        return proba
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    model.fit(X, y.astype(int))
    proba[:, model.classes_] = model.predict_proba(X_test)
    return proba


def cross_validated(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, kind: str, n_classes: int = 0,
    folds: int = 5, repeats: int = 1, seed: int = 0, task: str = "",
) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """Out-of-fold predictions, the baseline's (fold mean / class prior) and the fold count.

    With `repeats` > 1 the folds are redrawn (seeds seed, seed + 1, ...) and each row's
    out-of-fold predictions are averaged: still out of sample, less dependent on one fold draw.
    """
    shape = (len(y),) if kind == "regression" else (len(y), n_classes)
    pred, base = np.zeros(shape), np.zeros(shape)
    for repeat in range(repeats):
        k, splits = _folds(y, groups, kind, folds, seed + repeat, task)
        for train, test in splits:
            fitted = _fit_predict(kind, X[train], y[train], X[test], n_classes, groups[train])
            pred[test] += fitted / repeats
            if kind == "regression":
                base[test] += y[train].mean() / repeats
            else:
                prior = np.bincount(y[train].astype(int), minlength=n_classes) / len(train)
                base[test] += prior / repeats
    return pred, base, k


def bootstrap_ci(
    kind: str, y: np.ndarray, pred: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:  # fmt: skip
    """Percentile CI of the metric over subject resamples; NaN when too few resamples are valid."""
    subjects, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(subjects))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(subjects), len(subjects))])
        try:
            values.append(score(kind, y[rows], pred[rows]))
        except ValueError:  # a resample without one of the classes
            continue
    if len(values) < max(10, n_boot // 10):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def probe(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, kind: TaskKind, task: str = "",
    classes: tuple[str, ...] = (), folds: int = 5, repeats: int = 5, seed: int = 0,
    n_boot: int = 1000,
) -> ProbeResult:  # fmt: skip
    """Cross-validate a linear probe of `y` from fingerprints `X`, subject-disjoint by `groups`.

    Parameters
    ----------
    X
        (N, D) fingerprints.
    y
        (N,) class indices 0..C-1 (classes) or values (regression).
    groups
        (N,) subject of each row: folds and bootstrap resamples are by subject.
    kind
        "binary", "multiclass" or "regression".
    classes
        Class names, index order (reported only).
    folds, repeats
        k of the k-fold CV, redrawn `repeats` times (see `cross_validated`).
    n_boot
        Bootstrap resamples of subjects for the 95 % CI (0: no CI). The CI reflects which
        subjects were tested, not the refitting of the probe.

    Raises
    ------
    DataError
        A single class, or fewer than 2 subjects per class for cross-validation.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n_classes = 0
    if kind != "regression":
        n_classes = max(len(classes), int(y.max()) + 1)
        if len(np.unique(y)) < 2:
            raise DataError(f"task {task!r}: a single class among the labelled rows")
    pred, base, k = cross_validated(
        X, y, groups, kind=kind, n_classes=n_classes, folds=folds, repeats=repeats, seed=seed,
        task=task,
    )  # fmt: skip
    low, high = bootstrap_ci(kind, y, pred, groups, n_boot=n_boot, seed=seed)
    return ProbeResult(
        task=task,
        kind=kind,
        metric=METRIC_OF[kind],
        value=score(kind, y, pred),
        ci_low=low,
        ci_high=high,
        baseline=score(kind, y, base) if kind == "regression" else 0.5,
        subjects=len(np.unique(groups)),
        rows=len(y),
        folds=k,
        repeats=repeats,
        classes=list(classes),
    )
