"""The downstream study of a simulation's model: what its released fingerprints are good for, and
what they leak.

For one model artifact and the simulation's emulated sites (loaded the way their ClientApps load
them, :mod:`client.site_data`), every site releases record-level fingerprints of its window store,
embedded from both signals ("paired"), from ECG alone and from PPG alone, through the real release
path (:func:`biofp_core.fingerprints.export.release_windows`: ledger charge, Parquet file, audit
line):

- ``"no noise"``: record means, nothing clipped, nothing charged;
- ``"noisy"`` (when ``StudyConfig.noisy``): the site's own release policy when it adds noise,
  else clipping to ``clip_norm`` plus Gaussian noise of ``release_epsilon`` per vector. The noise
  is charged to the site's ledger; a site whose budget cannot take it refuses, and the study says
  so and goes on without that site.

A single-sensor site (modality skew) releases only what its sensor records (its "paired" release
is its ECG or PPG one). The files are read back, labels pseudonymised with each site's key and
pooled, then probed with subject-disjoint CV (:mod:`biofp_core.evaluation`): every task on
paired / ECG / PPG fingerprints (modality ablation) and sex / age inference beside the first task,
without and with release noise.

With reproducible noise (a site seed), a release is keyed in the ledger by the model's weights,
the site's window store, the policy, the seed and the modality: studying the same model on the same
data again releases the same vectors and is not charged twice.

:func:`cross_modal_reconstruction` decodes ECG from PPG alone for a few windows of held-out
subjects (M2AE only), for the report's figure.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits

from biofp_core.artifacts import ModelCard, load_model
from biofp_core.errors import DataError, PrivacyBudgetError
from biofp_core.evaluation import (
    LabelRows,
    StudyRow,
    TaskLabels,
    attribute_inference,
    merge_labels,
    modality_ablation,
    read_labels,
    task_labels,
)
from biofp_core.evaluation.labels import ID_COLUMNS
from biofp_core.fingerprints.compute import window_fingerprints
from biofp_core.fingerprints.export import release_windows
from biofp_core.fingerprints.parquet import read_fingerprints
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.table import MODALITY_CHOICES, FingerprintTable, concat
from biofp_core.models.base import BioFPModel, SubjectWindows
from biofp_core.site import SiteConfig
from client.site_data import SimulationSites, SiteData

log = logging.getLogger(__name__)

SYNTHETIC_TASKS = ("af", "hypertension")  # the synthetic cohort's clinical labels
ATTRIBUTES = ("sex", "age")  # what attribute inference tries to recover
CLEAN, NOISY = "no noise", "noisy"  # the two release variants


def load_study_sites(manifest: SimulationSites, *, holdout_fraction: float) -> list[SiteData]:
    """The simulation's sites, loaded as their ClientApps load them (same holdout split).

    Raises
    ------
    DataError
        A site without a labels file (nothing to probe).
    """
    sites = manifest.load(holdout_fraction=holdout_fraction)
    for ref, site in zip(manifest.sites, sites, strict=True):
        if site.config.labels_csv is None:
            raise DataError(f"{ref.site_config}: site {site.name} has no labels_csv")
    return sites


class StudyConfig(BaseModel):
    """What the study releases and probes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: tuple[str, ...] | None = Field(
        None, description="label columns to probe; None: every numeric or 0/1 column"
    )
    attributes: tuple[str, ...] = Field(ATTRIBUTES, description="attributes to infer (audit)")
    noisy: bool = Field(True, description="also release under noise (charged to the ledgers)")
    release_epsilon: float = Field(1.0, gt=0, description="ε per vector, sites without noise")
    clip_norm: float = Field(1.0, gt=0, description="C of that noisy policy")
    folds: int = Field(5, ge=2, description="CV folds, disjoint by subject")
    repeats: int = Field(5, ge=1, description="fold draws averaged")
    n_boot: int = Field(200, ge=0, description="bootstrap resamples of subjects for the CI")
    seed: int = Field(0, description="seeds folds and bootstrap")

    def probe_args(self) -> dict[str, int]:
        return {"folds": self.folds, "repeats": self.repeats, "seed": self.seed,
                "n_boot": self.n_boot}  # fmt: skip

    def noisy_policy(self, site: SiteConfig) -> ReleasePolicy:
        """The site's own policy when it adds noise, else clipping + noise at release_epsilon."""
        if site.release.noisy:
            return site.release
        return ReleasePolicy(clip_norm=self.clip_norm, epsilon=self.release_epsilon)


class SiteRelease(BaseModel):
    """One file a site released for the study (or the one it refused)."""

    site: str
    variant: str
    modality: str  # as embedded: a single-sensor site's "paired" release is its own sensor's
    file: str | None = None
    rows: int = 0
    bytes: int = 0
    noise_sigma: float | None = None
    epsilon_per_vector: float | None = None
    site_epsilon: float | None = Field(None, description="the site's ledger ε afterwards")
    refused: str | None = Field(None, description="one line: why the site refused")


class DownstreamStudy(BaseModel):
    """Probes of one model's released fingerprints."""

    model: str  # a label, e.g. "federated DP"
    model_path: str
    weights_sha256: str
    tasks: list[str]
    releases: list[SiteRelease]
    ablation: dict[str, list[StudyRow]] = Field(
        default_factory=dict, description="variant -> each task on paired, ECG and PPG"
    )
    attributes: list[StudyRow] = Field(default_factory=list, description="utility and attacks")
    notes: list[str] = Field(default_factory=list, description="one line per thing skipped")

    def ablation_row(self, variant: str, task: str, modality: str) -> StudyRow | None:
        """The probe of `task` on `modality` fingerprints of `variant`, if it was run."""
        rows = self.ablation.get(variant, [])
        return next((r for r in rows if r.result.task == task and r.fingerprints == modality), None)


# ---- releases -------------------------------------------------------------------------------


def site_modalities(site: SiteData) -> dict[str, str]:
    """Requested modality -> what the site embeds for it (a single sensor serves both its slots)."""
    if site.modality == "both":
        return {m: m for m in MODALITY_CHOICES}
    return {"paired": site.modality, site.modality: site.modality}


def _run_id(
    site: SiteData, card: ModelCard, policy: ReleasePolicy, modality: str, seed: int | None
) -> str | None:
    """Ledger key of a reproducible release: the same model, windows, policy and noise seed give
    the same vectors, released (and charged) once. None (a fresh key) without a seed."""
    if seed is None:
        return None
    what = f"{site.store.manifest.key}|{policy.model_dump_json()}|{seed}"
    digest = hashlib.sha256(what.encode()).hexdigest()[:12]
    return f"study-{card.weights_sha256[:12]}-{digest}-{modality}"


def _release(
    site: SiteData, windows: FingerprintTable, card: ModelCard, *, policy: ReleasePolicy,
    variant: str, modality: str, out_dir: Path,
) -> tuple[SiteRelease, FingerprintTable | None]:  # fmt: skip
    """Release one table under `policy` to a file and read the file back (None if refused)."""
    seed = None if site.dp_seed is None else site.dp_seed * 8 + MODALITY_CHOICES.index(modality)
    path = out_dir / f"{site.name}-{variant.replace(' ', '-')}-{modality}.parquet"
    row = SiteRelease(site=site.name, variant=variant, modality=modality)
    try:
        report, _ = release_windows(
            windows, card, site=site.config, out=path, policy=policy, modality=modality,
            run_id=_run_id(site, card, policy, modality, seed), seed=seed,
        )  # fmt: skip
    except PrivacyBudgetError as exc:
        return row.model_copy(update={"refused": str(exc)}), None
    table, _ = read_fingerprints(path)
    return row.model_copy(
        update={"file": str(path), "rows": report.rows, "bytes": report.bytes,
                "noise_sigma": report.noise_sigma, "epsilon_per_vector": report.epsilon_per_vector,
                "site_epsilon": report.site_epsilon}
    ), table  # fmt: skip


Released = dict[str, dict[str, list[FingerprintTable]]]  # variant -> modality -> site tables


def release_all(
    model: BioFPModel, card: ModelCard, sites: list[SiteData], out_dir: Path, config: StudyConfig
) -> tuple[Released, list[SiteRelease]]:
    """Every site's releases (each variant, each modality it has), read back from the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    released: Released = {}
    rows: list[SiteRelease] = []
    for site in sites:
        policies = {CLEAN: ReleasePolicy()}
        if config.noisy:
            policies[NOISY] = config.noisy_policy(site.config)
        slots = site_modalities(site)
        for embedded in dict.fromkeys(slots.values()):
            windows = window_fingerprints(site.store, model, modality=embedded)
            for variant, policy in policies.items():
                row, table = _release(site, windows, card, policy=policy, variant=variant,
                                      modality=embedded, out_dir=out_dir)  # fmt: skip
                rows.append(row)
                if table is None:
                    continue
                for requested in (m for m, e in slots.items() if e == embedded):
                    released.setdefault(variant, {}).setdefault(requested, []).append(table)
    return released, rows


# ---- probes ---------------------------------------------------------------------------------


def _numeric(labels: LabelRows, column: str) -> bool:
    cells = [row.get(column, "") for row in labels.rows.values()]
    try:
        return all(np.isfinite(float(c)) for c in cells if c != "") and any(cells)
    except ValueError:
        return False


def study_tasks(labels: LabelRows, config: StudyConfig, notes: list[str]) -> list[TaskLabels]:
    """The tasks to probe: the configured columns, or every numeric / 0-1 label column."""
    if config.tasks is not None:
        names = list(config.tasks)
    else:
        skip = ID_COLUMNS | set(config.attributes)
        names = [c for c in labels.columns if c not in skip and _numeric(labels, c)]
    tasks = []
    for name in names:
        try:
            tasks.append(task_labels(labels, name))
        except DataError as exc:
            notes.append(f"task {name}: {exc}")
    return tasks


def _attributes(labels: LabelRows, config: StudyConfig, notes: list[str]) -> list[TaskLabels]:
    found = []
    for name in config.attributes:
        if name not in labels.columns:
            notes.append(f"attribute {name}: not in the labels")
            continue
        try:
            found.append(task_labels(labels, name))
        except DataError as exc:
            notes.append(f"attribute {name}: {exc}")
    return found


def _ablations(
    released: Released, tasks: list[TaskLabels], config: StudyConfig, notes: list[str]
) -> dict[str, list[StudyRow]]:
    out: dict[str, list[StudyRow]] = {}
    for variant, by_modality in released.items():
        tables = {m: concat(by_modality[m]) for m in MODALITY_CHOICES if m in by_modality}
        for task in tasks:
            try:
                rows = modality_ablation(tables, task, **config.probe_args())
            except DataError as exc:
                notes.append(f"{variant} {task.task}: {exc}")
                continue
            out.setdefault(variant, []).extend(rows)
    return out


def _attribute_study(
    released: Released, utility: TaskLabels | None, attributes: list[TaskLabels],
    config: StudyConfig, notes: list[str],
) -> list[StudyRow]:  # fmt: skip
    """Utility and each attack on the paired releases, without noise first (the reference)."""
    tables = {v: concat(released[v]["paired"]) for v in (CLEAN, NOISY)
              if "paired" in released.get(v, {})}  # fmt: skip
    rows: list[StudyRow] = []
    if not tables:
        return rows
    for task in [t for t in (utility,) if t is not None] + attributes:
        is_utility = task is utility
        try:
            rows += attribute_inference(
                tables, utility=task if is_utility else None,
                attributes=[] if is_utility else [task], **config.probe_args(),
            )  # fmt: skip
        except DataError as exc:
            notes.append(f"attribute inference {task.task}: {exc}")
    return rows


def run_study(
    model_path: Path, sites: list[SiteData], *, label: str, out_dir: Path,
    config: StudyConfig | None = None,
) -> DownstreamStudy:  # fmt: skip
    """Release every site's fingerprints of `model_path` into `out_dir` and probe them.

    Raises
    ------
    DataError
        No site could release anything, or no label column can be probed.
    """
    config = config or StudyConfig()
    model, card = load_model(model_path)
    released, releases = release_all(model, card, sites, Path(out_dir), config)
    notes = [f"{r.site}: {r.variant} {r.modality} release refused: {r.refused}"
             for r in releases if r.refused]  # fmt: skip
    if not released.get(CLEAN):
        raise DataError(f"{model_path}: no site released fingerprints")
    keys = [SiteKey.load(s.state_dir) for s in sites]
    labels = merge_labels([read_labels(s.config.labels_csv, key=k)  # type: ignore[arg-type]
                           for s, k in zip(sites, keys, strict=True)])  # fmt: skip
    tasks = study_tasks(labels, config, notes)
    if not tasks:
        raise DataError(f"{labels.source}: no label column to probe")
    attributes = _attributes(labels, config, notes)
    log.info("downstream study of %s: %d tasks, %d attributes", label, len(tasks), len(attributes))
    with threadpool_limits(limits=1, user_api="blas"):  # tiny fits: threads only contend
        ablation = _ablations(released, tasks, config, notes)
        attack = _attribute_study(released, tasks[0], attributes, config, notes)
    return DownstreamStudy(
        model=label, model_path=str(model_path), weights_sha256=card.weights_sha256,
        tasks=[t.task for t in tasks], releases=releases, ablation=ablation, attributes=attack,
        notes=notes,
    )  # fmt: skip


# ---- cross-modal reconstruction ---------------------------------------------------------------


class ReconstructionRow(BaseModel):
    """One held-out window of the cross-modal figure."""

    site: str
    subject: str = Field(description="the subject's pseudonym at its site")
    start_s: float
    correlation: float = Field(description="Pearson r of real ECG and ECG decoded from PPG alone")


@dataclass(frozen=True)
class ReconstructedWindow:
    """A held-out window: its real signals and the ECG decoded from its PPG alone."""

    row: ReconstructionRow
    ecg: np.ndarray  # (L,) z-scored, as in the window store
    ppg: np.ndarray  # (L,)
    ecg_from_ppg: np.ndarray  # (L,)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _best_paired_window(subject: SubjectWindows) -> int | None:
    """Index of the subject's paired window whose weaker signal has the best quality."""
    paired = np.flatnonzero(subject.mask[:, 0] & subject.mask[:, 1])
    if len(paired) == 0:
        return None
    quality = np.nan_to_num(subject.quality[paired].min(axis=1), nan=-1.0)
    return int(paired[np.argmax(quality)])


def cross_modal_reconstruction(
    model_path: Path, sites: list[SiteData], *, windows: int = 4
) -> list[ReconstructedWindow]:
    """ECG decoded from PPG alone for up to `windows` held-out subjects' windows, one per subject,
    taken from the sites in turn; [] for a model without a cross-modal decoder."""
    model, _ = load_model(model_path)
    reconstruct = getattr(model, "reconstruct", None)
    if not callable(reconstruct):
        return []
    queues = [[(site, s) for s in site.holdout] for site in sites if site.modality == "both"]
    chosen: list[tuple[SiteData, SubjectWindows, int]] = []
    while len(chosen) < windows and any(queues):
        for queue in queues:
            if queue and len(chosen) < windows:
                site, subject = queue.pop(0)
                index = _best_paired_window(subject)
                if index is not None:
                    chosen.append((site, subject, index))
    if not chosen:
        return []
    ppg = np.stack([s.ppg[i] for _, s, i in chosen]).astype(np.float32)  # (n, L)
    model.eval()
    with torch.inference_mode():
        decoded = reconstruct("ecg", ppg=torch.from_numpy(ppg)).float().numpy()  # (n, L)
    out = []
    for (site, subject, i), ppg_i, rec in zip(chosen, ppg, decoded, strict=True):
        ecg = np.asarray(subject.ecg[i], dtype=np.float32)
        row = ReconstructionRow(
            site=site.name, subject=SiteKey.load_or_create(site.state_dir).subject(
                subject.subject_id), start_s=float(subject.start_s[i]),
            correlation=_pearson(ecg, rec),
        )  # fmt: skip
        out.append(ReconstructedWindow(row=row, ecg=ecg, ppg=ppg_i, ecg_from_ppg=rec))
    return out
