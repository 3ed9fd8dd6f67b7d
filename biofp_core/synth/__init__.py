"""The embedded default cohort: simulated hospitals with paired ECG + PPG WFDB records.

`physiology` models the signals (RR series, ECG, PPG, respiration, artefacts); `cohort` draws
subjects and site profiles and writes WFDB records plus labels.csv.
"""

from biofp_core.synth.cohort import (
    LABEL_COLUMNS,
    CohortSummary,
    SiteProfile,
    SiteSummary,
    SubjectLabels,
    SubjectSimulation,
    simulate_subject,
    site_profile,
    write_cohort,
)
from biofp_core.synth.physiology import SimulatedSignals, SubjectPhysiology

__all__ = [
    "LABEL_COLUMNS",
    "CohortSummary",
    "SimulatedSignals",
    "SiteProfile",
    "SiteSummary",
    "SubjectLabels",
    "SubjectPhysiology",
    "SubjectSimulation",
    "simulate_subject",
    "site_profile",
    "write_cohort",
]
