"""The embedded default cohort: emulated hospitals whose subjects get paired ECG + PPG records.

Layout written by :func:`write_cohort`::

    OUT/cohort.json                  manifest (arguments + every file written); marks OUT as ours
    OUT/labels.csv                   one row per subject, every site
    OUT/site_00/labels.csv           that site's rows (a hospital holds its own labels)
    OUT/site_00/s00_000.hea / .dat   one WFDB record (format 16) per subject

Sites differ the way hospitals do; the pattern repeats every 4 sites (sampling rate every 3):

========  =======  ==================================  ============  ======  =====
site % 4  fs (*)   channels (file order)               artefacts     AF      HTN
========  =======  ==================================  ============  ======  =====
0         125 Hz   RESP, PLETH, II (BIDMC-like)        ICU, flat     20 %    35 %
1         250 Hz   ECG II, / PPG                       noisy ward    30 %    40 %
2         500 Hz   Pleth, ii, Resp                     clean lab     40 %    50 %
3         125 Hz   MLII, PLETH,                        ambulatory    30 %    35 %
========  =======  ==================================  ============  ======  =====

(*) for sites 0-3; site s records at (125, 250, 500)[s % 3] Hz. Over 4 sites the prevalences
average 30 % AF and 40 % hypertension.

Labels: age 30-85 (uniform), sex balanced per site; at each site, round(prevalence x K) subjects
(stochastic rounding) have AF and hypertension, drawn with odds rising with age (AF x1.04 per
year, hypertension x1.05 per year and x1.5 with AF). Every random draw is seeded from
``SeedSequence(seed, spawn_key=(site,))`` (site-level labels) or ``(site, subject)``
(physiology and signals), so equal arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import wfdb
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from biofp_core.errors import ConfigError, DataError, first_error
from biofp_core.synth.physiology import (
    ArtefactProfile,
    Breathing,
    SimulatedSignals,
    SubjectPhysiology,
    simulate_signals,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "cohort.json"
LABELS_NAME = "labels.csv"
LABEL_COLUMNS: tuple[str, ...] = (
    "subject", "site", "record", "af", "hypertension", "age", "sex", "mean_hr_bpm",
    "resp_rate_bpm", "sbp_mmhg",
)  # fmt: skip
_FS_CYCLE_HZ: tuple[float, ...] = (125.0, 250.0, 500.0)
_UNITS = {"ecg": "mV", "ppg": "NU", "resp": "NU"}


@dataclass(frozen=True)
class SiteProfile:
    """How one emulated hospital records: rate, channel layout, ADC, artefacts, prevalences."""

    site: int
    fs_hz: float
    channels: tuple[tuple[str, str], ...]  # (header name, role in ecg/ppg/resp), file order
    adc_gain: dict[str, float]  # per role, ADC units per physical unit
    adc_baseline: int  # ADC value of physical zero, all channels
    artefacts: ArtefactProfile
    af_prevalence: float
    htn_prevalence: float

    @property
    def name(self) -> str:
        return f"site_{self.site:02d}"


# One row per recording setting, columns in ArtefactProfile's field order: white noise (ECG mV,
# PPG NU, resp NU), baseline wander (ECG mV, PPG NU), motion bursts per hour and their duration
# range (s), dropouts per hour, their duration range (s) and kind, mains interference (Hz, mV).
_ICU, _WARD, _LAB, _AMBULATORY = (ArtefactProfile(*row) for row in (
    (0.015, 0.004, 0.02, 0.08, 0.05, 8.0, (2.0, 8.0), 4.0, (1.0, 6.0), "flat", 60.0, 0.02),
    (0.035, 0.012, 0.05, 0.2, 0.12, 30.0, (1.0, 6.0), 10.0, (0.5, 4.0), "nan", 50.0, 0.05),
    (0.008, 0.002, 0.01, 0.04, 0.02, 2.0, (2.0, 5.0), 1.0, (1.0, 3.0), "nan", 0.0, 0.0),
    (0.025, 0.008, 0.03, 0.3, 0.2, 60.0, (0.5, 4.0), 6.0, (0.5, 3.0), "flat", 50.0, 0.01),
))  # fmt: skip
_SITE_TEMPLATES: tuple[dict, ...] = (
    dict(channels=(("RESP", "resp"), ("PLETH", "ppg"), ("II", "ecg")), artefacts=_ICU,
         adc_gain={"ecg": 1000.0, "ppg": 8000.0, "resp": 4000.0}, adc_baseline=0,
         af_prevalence=0.2, htn_prevalence=0.35),
    dict(channels=(("ECG II,", "ecg"), ("PPG", "ppg")), artefacts=_WARD,
         adc_gain={"ecg": 200.0, "ppg": 1000.0}, adc_baseline=0,
         af_prevalence=0.3, htn_prevalence=0.4),
    dict(channels=(("Pleth", "ppg"), ("ii", "ecg"), ("Resp", "resp")), artefacts=_LAB,
         adc_gain={"ecg": 500.0, "ppg": 4000.0, "resp": 2000.0}, adc_baseline=0,
         af_prevalence=0.4, htn_prevalence=0.5),
    dict(channels=(("MLII", "ecg"), ("PLETH,", "ppg")), artefacts=_AMBULATORY,
         adc_gain={"ecg": 400.0, "ppg": 2000.0}, adc_baseline=1024,
         af_prevalence=0.3, htn_prevalence=0.35),
)  # fmt: skip


def site_profile(site: int) -> SiteProfile:
    """The recording profile of site number `site` (templates repeat every 4 sites)."""
    return SiteProfile(
        site=site, fs_hz=_FS_CYCLE_HZ[site % len(_FS_CYCLE_HZ)], **_SITE_TEMPLATES[site % 4]
    )


def record_name(site: int, subject: int) -> str:
    """Record (and file stem) of a subject, e.g. 's00_003'."""
    return f"s{site:02d}_{subject:03d}"


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass(frozen=True)
class Demographics:
    """Site-level draws of one subject: what the hospital knows before any signal."""

    age: int
    sex: str  # "M" / "F"
    af: bool
    hypertension: bool


def _pick_by_odds(rng: np.random.Generator, *, odds: np.ndarray, prevalence: float) -> np.ndarray:
    """Boolean mask of round(prevalence * K) subjects (stochastic rounding), chosen by odds."""
    count = min(int(np.floor(prevalence * len(odds) + rng.uniform())), len(odds))
    chosen = rng.choice(len(odds), size=count, replace=False, p=odds / odds.sum())
    mask = np.zeros(len(odds), dtype=bool)
    mask[chosen] = True
    return mask


def draw_demographics(*, seed: int, site: int, subjects_per_site: int) -> list[Demographics]:
    """Ages, sexes, AF and hypertension of every subject of a site (see module docstring)."""
    profile = site_profile(site)
    rng = _rng(seed, site)
    ages = rng.integers(30, 86, size=subjects_per_site)
    sexes = rng.permutation(np.resize(np.array(["F", "M"])[rng.permutation(2)], subjects_per_site))
    af = _pick_by_odds(rng, odds=np.exp(0.04 * (ages - 57.5)), prevalence=profile.af_prevalence)
    htn_odds = np.exp(0.05 * (ages - 57.5)) * np.where(af, 1.5, 1.0)
    htn = _pick_by_odds(rng, odds=htn_odds, prevalence=profile.htn_prevalence)
    return [
        Demographics(age=int(a), sex=str(s), af=bool(f), hypertension=bool(h))
        for a, s, f, h in zip(ages, sexes, af, htn, strict=True)
    ]


def _draw_sbp_mmhg(demo: Demographics, rng: np.random.Generator) -> float:
    """Mean systolic pressure: hypertensive 141-195 (skewed up), else 95-139; rises with age."""
    age_term = 0.15 * (demo.age - 57.5)
    if demo.hypertension:
        return float(np.clip(141.0 + rng.gamma(2.0, 7.0) + max(age_term, 0.0), 141.0, 195.0))
    return float(np.clip(rng.normal(118.0, 8.0) + age_term, 95.0, 139.0))


def draw_physiology(
    demo: Demographics, rng: np.random.Generator
) -> tuple[SubjectPhysiology, float]:
    """A subject's physiology given demographics; returns it with the subject's SBP (mmHg).

    Pulse arrival time falls 1.5 ms per mmHg of SBP (and 0.4 ms per year of age).
    """
    female = demo.sex == "F"
    age = demo.age - 57.5
    sbp = _draw_sbp_mmhg(demo, rng)
    u = rng.uniform(size=12)  # fixed number of draws keeps the stream layout simple
    if demo.af:  # ventricular rate in AF
        hr = float(np.clip(rng.normal(82.0, 9.0), 60.0, 100.0))
    else:
        hr = float(np.clip(rng.normal(72.0, 8.0) + 3.0 * female - 0.05 * age, 55.0, 95.0))
    r_amp = float(np.clip(rng.normal(1.1, 0.25), 0.5, 2.0)) * (0.85 if female else 1.0)
    breathing = Breathing(
        rate_hz=(10.0 + 10.0 * u[0]) / 60.0, fm_depth=0.05 + 0.1 * u[1],
        fm_rate_hz=1.0 / (30.0 + 60.0 * u[2]), phase0_rad=2 * np.pi * u[3],
    )  # fmt: skip
    sys_centre = 0.11 + 0.04 * u[7]
    rsa = max(0.005, (0.02 + 0.03 * u[5]) * (1 - 0.008 * (demo.age - 30)))  # RSA fades with age
    phys = SubjectPhysiology(
        af=demo.af, mean_rr_s=60.0 / hr, rr_cv=(0.15 + 0.15 * u[4]) * demo.af,
        rsa_frac=0.0 if demo.af else rsa,
        lf_frac=0.0 if demo.af else 0.01 + 0.015 * u[6], lf_hz=0.08 + 0.04 * u[8],
        rr_noise_frac=0.0 if demo.af else 0.012, breathing=breathing,
        r_amp_mv=r_amp, r_width_s=0.009 + 0.003 * u[9], q_amp_mv=-r_amp * rng.uniform(0.05, 0.15),
        s_amp_mv=-r_amp * rng.uniform(0.1, 0.4), t_amp_mv=r_amp * rng.uniform(0.2, 0.35),
        p_amp_mv=0.0 if demo.af else rng.uniform(0.08, 0.18), p_offset_s=rng.uniform(0.14, 0.2),
        qtc_s=rng.uniform(0.38, 0.43) + 0.015 * female,
        fwave_amp_mv=rng.uniform(0.02, 0.07) * demo.af, fwave_hz=rng.uniform(5.0, 7.0),
        qrs_resp_mod=rng.uniform(0.03, 0.1), ecg_resp_baseline_mv=rng.uniform(0.02, 0.08),
        pat_s=0.30 - 0.0015 * (sbp - 120.0) - 0.0004 * age + rng.normal(0.0, 0.006),
        pat_resp_s=0.003, ppg_amp_nu=rng.uniform(0.3, 0.7), ppg_dc_nu=rng.uniform(0.2, 0.6),
        sys_centre_s=sys_centre, sys_width_s=0.045 + 0.015 * u[10],
        dia_centre_s=sys_centre + 0.25 - 0.001 * age - 0.03 * u[11],
        dia_width_s=rng.uniform(0.08, 0.11),
        dicrotic_ratio=float(np.clip(0.5 - 0.005 * age + rng.normal(0, 0.05), 0.1, 0.7)),
        ppg_riav=rng.uniform(0.05, 0.15), ppg_riiv_nu=rng.uniform(0.02, 0.08),
        resp_amp_nu=rng.uniform(0.5, 1.5),
    )  # fmt: skip
    return phys, sbp


@dataclass(frozen=True)
class SubjectLabels:
    """One row of labels.csv."""

    subject: str
    site: str
    record: str
    af: bool
    hypertension: bool
    age: int
    sex: str
    mean_hr_bpm: float
    resp_rate_bpm: float
    sbp_mmhg: float

    def row(self) -> list[str]:
        """CSV cells in `LABEL_COLUMNS` order, with fixed formatting (deterministic bytes)."""
        return [
            self.subject, self.site, self.record, str(int(self.af)), str(int(self.hypertension)),
            str(self.age), self.sex, f"{self.mean_hr_bpm:.1f}", f"{self.resp_rate_bpm:.1f}",
            f"{self.sbp_mmhg:.1f}",
        ]  # fmt: skip


@dataclass(frozen=True)
class SubjectSimulation:
    """A simulated subject: signals in physical units, ground truth and its site's profile."""

    labels: SubjectLabels
    signals: SimulatedSignals
    physiology: SubjectPhysiology
    profile: SiteProfile


def simulate_subject(
    *, seed: int, site: int, subject: int, subjects_per_site: int, minutes: float,
    ectopic_per_min: float = 0.0,
) -> SubjectSimulation:  # fmt: skip
    """Simulate subject `subject` of site `site` exactly as :func:`write_cohort` does.

    Parameters
    ----------
    seed
        Cohort seed.
    site, subject
        Indices of the site and of the subject within it.
    subjects_per_site
        Site size; it sets the site-level label draws (prevalences are per site).
    minutes
        Record length.
    ectopic_per_min
        Cohort mean of premature beats per minute: half the sinus subjects have none, the
        others an exponentially distributed rate around twice it, a random share of them
        ventricular (0: none, every draw as without the option).
    """
    demo = draw_demographics(seed=seed, site=site, subjects_per_site=subjects_per_site)[subject]
    # spawn(3) keeps the first two children of spawn(2): the ectopy stream changes nothing else
    phys_ss, signal_ss, ectopy_ss = np.random.SeedSequence(seed, spawn_key=(site, subject)).spawn(3)
    phys, sbp = draw_physiology(demo, np.random.default_rng(phys_ss))
    ectopy_rng = np.random.default_rng(ectopy_ss)
    if ectopic_per_min > 0 and not demo.af and ectopy_rng.uniform() < 0.5:
        rate = float(ectopy_rng.exponential(2.0 * ectopic_per_min))
        phys = replace(phys, ectopic_per_min=rate, pvc_share=float(ectopy_rng.uniform()))
    profile = site_profile(site)
    signals = simulate_signals(
        phys=phys, profile=profile.artefacts, fs_hz=profile.fs_hz, duration_s=60.0 * minutes,
        rng=np.random.default_rng(signal_ss), ectopy_rng=ectopy_rng,
    )  # fmt: skip
    name = record_name(site, subject)
    labels = SubjectLabels(
        subject=f"subj_{site:02d}_{subject:03d}", site=profile.name, record=name, af=demo.af,
        hypertension=demo.hypertension, age=demo.age, sex=demo.sex,
        mean_hr_bpm=signals.mean_hr_bpm, resp_rate_bpm=float(60.0 * phys.breathing.rate_hz),
        sbp_mmhg=sbp,
    )  # fmt: skip
    return SubjectSimulation(labels=labels, signals=signals, physiology=phys, profile=profile)


def _digitise(x: np.ndarray, *, gain: float, baseline: int) -> np.ndarray:
    """Physical -> format-16 ADC values; out-of-range clips (saturation), NaN -> -32768."""
    d = np.clip(np.rint(x * gain + baseline), -32767, 32767)
    return np.nan_to_num(d, nan=-32768).astype(np.int16)


def write_record(sim: SubjectSimulation, site_dir: Path) -> list[Path]:
    """Write one subject as a format-16 WFDB record; returns the .hea and .dat paths.

    The header is written by wfdb; the .dat is written with numpy (format 16 is interleaved
    little-endian int16), which gives the same bytes as ``wfdb.wrsamp`` much faster.
    """
    profile, sig, name = sim.profile, sim.signals, sim.labels.record
    by_role = {"ecg": sig.ecg_mv, "ppg": sig.ppg_nu, "resp": sig.resp_nu}
    roles = [role for _, role in profile.channels]
    gains = [profile.adc_gain[role] for role in roles]
    columns = [
        _digitise(by_role[r], gain=g, baseline=profile.adc_baseline)
        for r, g in zip(roles, gains, strict=True)
    ]
    d_signal = np.column_stack(columns)  # (T, C) int16
    n_sig = len(roles)
    record = wfdb.Record(
        record_name=name, n_sig=n_sig, fs=profile.fs_hz, sig_len=len(d_signal),
        file_name=[f"{name}.dat"] * n_sig, fmt=["16"] * n_sig, adc_gain=gains,
        baseline=[profile.adc_baseline] * n_sig, units=[_UNITS[r] for r in roles],
        sig_name=[ch for ch, _ in profile.channels], d_signal=d_signal,
        comments=[f"<age>: {sim.labels.age} <sex>: {sim.labels.sex}"],
    )  # fmt: skip
    record.set_d_features()
    record.set_defaults()
    record.wrheader(write_dir=str(site_dir))
    dat_path = site_dir / f"{name}.dat"
    d_signal.astype("<i2").tofile(dat_path)
    return [site_dir / f"{name}.hea", dat_path]


def _write_labels(path: Path, rows: list[SubjectLabels]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LABEL_COLUMNS)
    writer.writerows(r.row() for r in rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


class CohortSpec(BaseModel):
    """Arguments of :func:`write_cohort`, validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sites: int = Field(ge=1, le=100, description="number of emulated hospitals")
    subjects_per_site: int = Field(ge=1, le=1000, description="records (= subjects) per site")
    minutes: float = Field(ge=0.05, le=24 * 60, description="record length")
    seed: int = Field(ge=0, description="cohort seed")
    ectopic_per_min: float = Field(
        0.0, ge=0, le=30, description="mean premature beats per minute of sinus subjects"
    )


class SiteSummary(BaseModel):
    """What was written for one site."""

    site: str
    fs_hz: float
    channels: tuple[str, ...]
    records: int
    af: int
    hypertension: int
    path: Path


class CohortSummary(BaseModel):
    """What :func:`write_cohort` wrote."""

    out_dir: Path
    sites: int
    records: int
    hours: float = Field(description="hours of paired signal, all records")
    paths: list[Path] = Field(description="site directories")
    labels: Path = Field(description="the cohort-wide labels.csv")
    site_summaries: list[SiteSummary]


def _planned_files(spec: CohortSpec) -> list[str]:
    files = [MANIFEST_NAME, LABELS_NAME]
    for site in range(spec.sites):
        prefix = site_profile(site).name
        files.append(f"{prefix}/{LABELS_NAME}")
        for subject in range(spec.subjects_per_site):
            stem = f"{prefix}/{record_name(site, subject)}"
            files += [f"{stem}.hea", f"{stem}.dat"]
    return files


def _prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir`, or clear a previous cohort from it; refuse any other non-empty dir."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a directory")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        out_dir.mkdir(parents=True, exist_ok=True)
        return
    manifest = out_dir / MANIFEST_NAME
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{out_dir} is not empty and holds no synthetic cohort ({MANIFEST_NAME}); "
            "choose an empty or new directory"
        ) from exc
    for rel in previous:
        if isinstance(rel, str) and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
            (out_dir / rel).unlink(missing_ok=True)  # only files inside OUT
    for site_dir in sorted(out_dir.glob("site_*")):
        if site_dir.is_dir() and not any(site_dir.iterdir()):
            shutil.rmtree(site_dir)
    log.info("cleared previous synthetic cohort in %s", out_dir)


def _validate(**kwargs: float) -> CohortSpec:
    try:
        return CohortSpec(**kwargs)
    except ValidationError as exc:
        raise ConfigError(f"synthetic cohort: {first_error(exc)}") from None


def _write_site(
    spec: CohortSpec, site: int, out_dir: Path, on_record: Callable[[str], None] | None
) -> tuple[list[SubjectLabels], SiteSummary]:
    """Simulate and write every record of one site plus its labels.csv."""
    profile = site_profile(site)
    site_dir = out_dir / profile.name
    site_dir.mkdir(exist_ok=True)
    rows = []
    for subject in range(spec.subjects_per_site):
        sim = simulate_subject(
            seed=spec.seed, site=site, subject=subject, subjects_per_site=spec.subjects_per_site,
            minutes=spec.minutes, ectopic_per_min=spec.ectopic_per_min,
        )  # fmt: skip
        write_record(sim, site_dir)
        rows.append(sim.labels)
        if on_record is not None:
            on_record(sim.labels.record)
    _write_labels(site_dir / LABELS_NAME, rows)
    log.info("wrote %s: %d records at %g Hz", profile.name, len(rows), profile.fs_hz)
    summary = SiteSummary(
        site=profile.name, fs_hz=profile.fs_hz, channels=[c for c, _ in profile.channels],
        records=len(rows), af=sum(r.af for r in rows),
        hypertension=sum(r.hypertension for r in rows), path=site_dir,
    )  # fmt: skip
    return rows, summary


def write_cohort(
    out_dir: Path,
    *,
    sites: int,
    subjects_per_site: int,
    minutes: float,
    seed: int,
    ectopic_per_min: float = 0.0,
    on_record: Callable[[str], None] | None = None,
) -> CohortSummary:
    """Simulate and write the default cohort (layout and profiles in the module docstring).

    Parameters
    ----------
    out_dir
        Empty or new directory, or one holding a cohort written earlier (it is replaced).
    sites, subjects_per_site, minutes, seed
        Cohort size, record length and seed; equal arguments give byte-identical files.
    ectopic_per_min
        Premature beats (:func:`simulate_subject`); 0, the default, adds none.
    on_record
        Called with each record name once it is written (progress reporting).
    """
    spec = _validate(sites=sites, subjects_per_site=subjects_per_site, minutes=minutes, seed=seed,
                     ectopic_per_min=ectopic_per_min)  # fmt: skip
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    manifest = {
        "generator": "biofp synth",
        "args": spec.model_dump(exclude_defaults=True),  # without ectopy: the bytes of old
        "files": _planned_files(spec),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    all_rows: list[SubjectLabels] = []
    summaries: list[SiteSummary] = []
    for site in range(spec.sites):
        rows, summary = _write_site(spec, site, out_dir, on_record)
        all_rows += rows
        summaries.append(summary)
    _write_labels(out_dir / LABELS_NAME, all_rows)
    return CohortSummary(
        out_dir=out_dir, sites=spec.sites, records=len(all_rows),
        hours=len(all_rows) * spec.minutes / 60.0, paths=[s.path for s in summaries],
        labels=out_dir / LABELS_NAME, site_summaries=summaries,
    )  # fmt: skip
