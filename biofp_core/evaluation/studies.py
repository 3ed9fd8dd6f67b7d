"""Studies built from probes: a task on a fingerprint table, modality ablation, attribute inference.

- `evaluate_table`: join a task's labels to a table's rows at one level and probe.
- `modality_ablation`: the same task on paired, ECG-only and PPG-only fingerprints of ONE model;
  each row's `relative` is its score over the paired score (AUROC), or paired MAE over its MAE,
  so 1.0 means "as good as paired" and 0.9 "lost 10 %".
- `attribute_inference`: how well sensitive attributes (sex, age) are predicted from released
  fingerprints, each variant (e.g. without and with release noise) beside its utility task:
  released fingerprints are measured, not assumed, private (docs/privacy.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from biofp_core.errors import DataError
from biofp_core.evaluation.labels import TaskLabels, join
from biofp_core.evaluation.probes import ProbeResult, probe
from biofp_core.fingerprints.table import FingerprintTable


class StudyRow(BaseModel):
    """One probe within a study."""

    model_config = ConfigDict(frozen=True)

    fingerprints: str  # which table: e.g. "paired", "ppg", "released ε=1"
    role: Literal["utility", "attack"]
    result: ProbeResult
    relative: float | None = None  # vs the reference table; 1.0 = as good as the reference


def evaluate_table(
    table: FingerprintTable, labels: TaskLabels, *, level: str = "record", folds: int = 5,
    repeats: int = 5, seed: int = 0, n_boot: int = 1000,
) -> ProbeResult:  # fmt: skip
    """Probe `labels.task` from the table's rows at `level`, folds by subject pseudonym."""
    X, y, groups = join(table, labels, level=level)
    return probe(
        X, y, groups, kind=labels.kind, task=labels.task, classes=labels.classes, folds=folds,
        repeats=repeats, seed=seed, n_boot=n_boot,
    )  # fmt: skip


def relative_score(result: ProbeResult, reference: ProbeResult) -> float:
    """result / reference for AUROC, reference / result for MAE: 1.0 = as good, < 1 worse."""
    if result.metric != reference.metric:
        raise ValueError(f"cannot compare {result.metric} with {reference.metric}")
    if result.metric == "mae":
        return reference.value / result.value if result.value > 0 else float("inf")
    return result.value / reference.value


def modality_ablation(
    tables: Mapping[str, FingerprintTable], labels: TaskLabels, *, reference: str = "paired",
    **probe_args: int | str,
) -> list[StudyRow]:  # fmt: skip
    """`labels.task` on each modality's table, relative to the `reference` modality's.

    The tables must come from the same model and data (e.g. `window_fingerprints` with
    modality "paired", "ecg" and "ppg"); `probe_args` go to `evaluate_table`.
    """
    if reference not in tables:
        raise DataError(f"modality ablation needs {reference!r} fingerprints as reference")
    results = {name: evaluate_table(t, labels, **probe_args) for name, t in tables.items()}  # type: ignore[arg-type]
    ref = results[reference]
    return [
        StudyRow(fingerprints=name, role="utility", result=r, relative=relative_score(r, ref))
        for name, r in results.items()
    ]


def attribute_inference(
    tables: Mapping[str, FingerprintTable], *, utility: TaskLabels | None,
    attributes: Sequence[TaskLabels], **probe_args: int | str,
) -> list[StudyRow]:  # fmt: skip
    """Utility and attribute-inference probes for each variant of released fingerprints.

    The first table is the reference (typically the release without noise); `relative` compares
    each variant's probe with the reference's for the same task (for an attack, < 1 means the
    attribute is harder to infer: the variant protects it better).
    """
    tasks = ([utility] if utility is not None else []) + list(attributes)
    rows: list[StudyRow] = []
    reference: dict[str, ProbeResult] = {}
    for name, table in tables.items():
        for labels in tasks:
            r = evaluate_table(table, labels, **probe_args)  # type: ignore[arg-type]
            ref = reference.setdefault(labels.task, r)
            role = "utility" if labels is utility else "attack"
            rows.append(StudyRow(fingerprints=name, role=role, result=r,
                                 relative=relative_score(r, ref)))  # fmt: skip
    return rows
