"""Plain data types passed between the signal stages (read → preprocess → window store)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy as np

TARGET_FS_HZ = 125.0
WINDOW_S = 10.0
WINDOW_SAMPLES = int(TARGET_FS_HZ * WINDOW_S)  # 1250


class Modality(StrEnum):
    ECG = "ecg"
    PPG = "ppg"


MODALITIES: tuple[Modality, ...] = (Modality.ECG, Modality.PPG)

SiteModality = Literal["both", "ecg", "ppg"]
"""The sensors a site records: both signals, or only ECG or only PPG (a config value)."""


@dataclass(frozen=True)
class Channel:
    """One physical channel at its own sampling rate, in physical units (NaN marks missing)."""

    name: str  # name as written in the header, e.g. "PLETH,"
    fs_hz: float
    samples: np.ndarray  # (T,) float64
    units: str = ""

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.fs_hz


@dataclass(frozen=True)
class RawRecord:
    """A record reduced to the channels BioFP uses: ECG and/or PPG (at least one is present)."""

    record_id: str  # record name relative to the data directory, e.g. "bidmc01" or "041s/041s"
    ecg: Channel | None
    ppg: Channel | None
    comments: tuple[str, ...] = ()
    all_channels: tuple[str, ...] = ()  # every channel name in the header, for reports
    subject_id: str | None = None  # the subject when the format says (else: the site's map)
    window_labels: dict[str, str] = field(default_factory=dict)  # labels of every window cut

    @property
    def duration_s(self) -> float:
        return max(c.duration_s for c in (self.ecg, self.ppg) if c is not None)


@dataclass
class QualityIndex:
    """Per-window, per-modality signal quality (arrays of shape (N,); NaN where modality absent)."""

    flat_frac: np.ndarray  # fraction of samples in flat runs
    clip_frac: np.ndarray  # fraction of samples at the window's extremes (saturation)
    skewness: (
        np.ndarray
    )  # PPG: skewness of the filtered pulse (higher = cleaner); ECG: kurtosis-free skew
    template_corr: np.ndarray  # ECG/PPG: mean correlation of beats with the window's beat template
    score: np.ndarray  # combined SQI in [0, 1]


@dataclass
class Windows:
    """Preprocessed 10 s windows of one record, z-scored per window and modality."""

    record_id: str
    ecg: np.ndarray  # (N, 1250) float32, zeros where the modality is absent
    ppg: np.ndarray  # (N, 1250) float32, zeros where the modality is absent
    mask: np.ndarray  # (N, 2) bool, [has_ecg, has_ppg]
    start_s: np.ndarray  # (N,) float64, window start in seconds from record start
    quality: dict[Modality, QualityIndex]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count of windows dropped
    valid_n: np.ndarray | None = None  # (N,) int32 samples of each window that are signal

    def valid_samples(self) -> np.ndarray:
        """(N,) int32 valid samples per window: a short record's window is padded after them."""
        if self.valid_n is None:
            return np.full(len(self.start_s), self.ecg.shape[1], dtype=np.int32)
        return self.valid_n

    def __len__(self) -> int:
        return len(self.start_s)


@dataclass(frozen=True)
class SubjectWindows:
    """All windows of one subject at a site, as read from the window store."""

    subject_id: str
    ecg: np.ndarray  # (n, 1250) float32, zeros where absent
    ppg: np.ndarray  # (n, 1250) float32, zeros where absent
    mask: np.ndarray  # (n, 2) bool, [has_ecg, has_ppg]
    quality: np.ndarray  # (n, 2) float32 SQI score in [0, 1], NaN where absent
    start_s: np.ndarray  # (n,) float64, window start within its record
    record_index: np.ndarray  # (n,) int, which of the subject's records each window comes from
    valid_n: np.ndarray | None = None  # (n,) int32 signal samples per window; None: all whole

    def valid_samples(self) -> np.ndarray:
        """(n,) int32 signal samples per window; padding (zeros) follows them."""
        if self.valid_n is None:
            return np.full(len(self.start_s), self.ecg.shape[1], dtype=np.int32)
        return np.asarray(self.valid_n, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.start_s)
