"""Federated evaluation without moving fingerprints: each site probes its own, the server averages.

A site fits and cross-validates the probe on its own released fingerprints (`site_probe`) and
reports scalars only (`SiteProbe`); `aggregate_probes` combines the sites' reports weighted by
their labelled rows. For MAE this is exact: the weighted mean of site MAEs is the MAE of all the
sites' out-of-fold predictions pooled (sum of absolute errors over rows). For AUROC it is the
weighted mean of site AUROCs, which is NOT the AUROC of pooled predictions (ranks do not add up
across sites), and is reported as such.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from biofp_core.errors import DataError
from biofp_core.evaluation.labels import TaskKind, TaskLabels, join
from biofp_core.evaluation.probes import METRIC_OF, cross_validated, score
from biofp_core.fingerprints.table import FingerprintTable


class SiteProbe(BaseModel):
    """One site's probe of one task: scalars only, safe to send."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str
    kind: TaskKind
    metric: str
    value: float = Field(description="the site's out-of-fold metric")
    baseline: float = Field(
        description="chance AUROC, or the mean predictor's MAE (private probes: 0.5 or 1)"
    )
    rows: int = Field(
        ge=0, description="the weight: labelled rows (local probe); every record row (private)"
    )
    subjects: int = Field(ge=0)


class FederatedProbe(BaseModel):
    """The sites' probes of one task combined."""

    model_config = ConfigDict(frozen=True)

    task: str
    metric: str
    value: float  # row-weighted mean of the sites' metric
    baseline: float
    rows: int
    subjects: int
    sites: int
    pooled_equivalent: bool  # True when `value` equals the metric of the pooled predictions


def site_probe(
    table: FingerprintTable, labels: TaskLabels, *, level: str = "record", folds: int = 5,
    repeats: int = 5, seed: int = 0,
) -> SiteProbe:  # fmt: skip
    """Cross-validate the task's probe on one site's fingerprints (see `probes.probe`); a
    window-level task is probed per window, folds disjoint by subject."""
    X, y, groups = join(table, labels, level=level)
    n_classes = len(labels.classes)
    if labels.kind != "regression" and len(np.unique(y)) < 2:
        raise DataError(f"task {labels.task!r}: a single class at this site")
    pred, base, _ = cross_validated(
        X.astype(np.float64), y, groups, kind=labels.kind, n_classes=n_classes, folds=folds,
        repeats=repeats, seed=seed, task=labels.task,
    )  # fmt: skip
    regression = labels.kind == "regression"
    return SiteProbe(
        task=labels.task,
        kind=labels.kind,
        metric=METRIC_OF[labels.kind],
        value=score(labels.kind, y, pred),
        baseline=score(labels.kind, y, base) if regression else 0.5,
        rows=len(y),
        subjects=len(np.unique(groups)),
    )


def aggregate_probes(reports: Sequence[SiteProbe]) -> FederatedProbe:
    """Row-weighted mean of the sites' metrics for one task.

    Raises
    ------
    ValueError
        No report, or reports of different tasks or metrics (a server-side bug).
    """
    if not reports:
        raise ValueError("aggregate_probes needs at least one site report")
    if len({(r.task, r.metric) for r in reports}) > 1:
        raise ValueError("site reports of different tasks or metrics cannot be combined")
    weights = np.array([r.rows for r in reports], dtype=np.float64)
    if not weights.sum():  # no site had a labelled row: every report counts the same
        weights = np.ones_like(weights)
    first = reports[0]
    return FederatedProbe(
        task=first.task,
        metric=first.metric,
        value=float(np.average([r.value for r in reports], weights=weights)),
        baseline=float(np.average([r.baseline for r in reports], weights=weights)),
        rows=int(weights.sum()),
        subjects=sum(r.subjects for r in reports),
        sites=len(reports),
        pooled_equivalent=first.metric == "mae",
    )


# ---- a probe that may leave a site: subsample-and-aggregate plus Gaussian noise ---------------

PRIVATE_METRIC_OF = {"binary": "auroc", "multiclass": "macro_auroc", "regression": "relative_mae"}
_RANGE_OF = {"binary": 1.0, "multiclass": 1.0, "regression": 2.0}  # each group's clipped metric
_BASELINE_OF = {"binary": 0.5, "multiclass": 0.5, "regression": 1.0}  # public constants


def _group_metric(table: FingerprintTable, labels: TaskLabels, seed: int) -> float:
    """One group's metric, clipped to its public range; the baseline when it cannot probe."""
    try:
        probe = site_probe(table, labels, seed=seed)
    except (DataError, ValueError):
        return _BASELINE_OF[labels.kind]
    value = probe.value / probe.baseline if labels.kind == "regression" else probe.value
    return float(np.clip(value, 0.0, _RANGE_OF[labels.kind]))


def probe_group(subject: str, groups: int) -> int:
    """The group of a subject's pseudonym among `groups`: a hash of the pseudonym alone (itself
    an HMAC under the site key), so a subject's group never depends on the other subjects."""
    digest = hashlib.sha256(f"biofp-probe-group:{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % groups


def private_site_probe(
    table: FingerprintTable, labels: TaskLabels, *, groups: int, noise_multiplier: float,
    rng: np.random.Generator, seed: int = 0,
) -> SiteProbe:  # fmt: skip
    """A site's probe of one task as a DP release (subsample-and-aggregate).

    Subjects are split into `groups` = m disjoint groups (m fixed by the site's policy, never
    by its data) by a hash of their pseudonym (:func:`probe_group`); each group is probed on its
    own and its metric clipped to a public range R (AUROC in [0, 1]; regression as MAE over the
    mean predictor's MAE, in [0, 2]); a group that cannot probe (empty, one class, too few
    subjects) counts as the public baseline. Adding or removing one subject changes one group,
    so the mean over groups moves by at most R/m; it gets N(0, (σR/m)²) noise, then is clipped
    back to [0, R] (post-processing). The baseline is the public constant of the kind (chance,
    or 1 for the mean predictor). `rows` and `subjects` count the site's record rows and
    subjects, labelled or not: no label decides them. Charge it as one Gaussian with noise
    multiplier σ.
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    group_of = np.array([probe_group(str(s), groups) for s in table.subject], dtype=np.int64)
    values = []
    for g in range(groups):
        values.append(_group_metric(table.take(np.flatnonzero(group_of == g)), labels, seed))
    bound = _RANGE_OF[labels.kind]
    noisy = float(np.mean(values)) + rng.normal(0.0, noise_multiplier * bound / groups)
    return SiteProbe(
        task=labels.task, kind=labels.kind, metric=PRIVATE_METRIC_OF[labels.kind],
        value=float(np.clip(noisy, 0.0, bound)), baseline=_BASELINE_OF[labels.kind],
        rows=len(table.at_level("record")), subjects=len(set(table.subject.astype(str))),
    )  # fmt: skip
