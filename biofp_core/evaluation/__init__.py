"""Evaluation of released fingerprints: labels keyed by pseudonym, linear probes, studies.

`labels` reads and pseudonymises a site's labels CSV and infers each task's kind; `probes` fits
subject-disjoint cross-validated linear probes with bootstrap CIs; `studies` runs a task on a
fingerprint table, the modality ablation and the attribute-inference audit; `federated` probes at
each site and combines the sites' scalar reports.
"""

from biofp_core.evaluation.federated import (
    FederatedProbe,
    SiteProbe,
    aggregate_probes,
    site_probe,
)
from biofp_core.evaluation.labels import (
    LabelRows,
    TaskKind,
    TaskLabels,
    check_against,
    declared_task_labels,
    join,
    merge_labels,
    read_labels,
    task_labels,
)
from biofp_core.evaluation.probes import ProbeResult, auroc, macro_auroc, probe
from biofp_core.evaluation.studies import (
    StudyRow,
    attribute_inference,
    evaluate_table,
    modality_ablation,
    relative_score,
)

__all__ = [
    "FederatedProbe",
    "LabelRows",
    "ProbeResult",
    "SiteProbe",
    "StudyRow",
    "TaskKind",
    "TaskLabels",
    "aggregate_probes",
    "attribute_inference",
    "auroc",
    "check_against",
    "declared_task_labels",
    "evaluate_table",
    "join",
    "macro_auroc",
    "merge_labels",
    "modality_ablation",
    "probe",
    "read_labels",
    "relative_score",
    "site_probe",
    "task_labels",
]
