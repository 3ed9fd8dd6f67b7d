"""Physiological signal models: RR series, ECG, PPG and respiration, plus recording artefacts.

Rendering is vectorised over beats: every wave (P, Q, R, S, T; PPG systolic and dicrotic) is a
Gaussian per beat (the morphology of ECGSYN, McSharry et al. 2003, written in time rather than
phase), evaluated on a window of sample indices around its centre by broadcasting and summed into
the signal with one ``np.bincount``. There is no Python loop per beat or per sample.

Physiology encoded (what the labels can be recovered from):

- sinus rhythm: RR = mean RR x (1 - respiratory sinus arrhythmia - 0.1 Hz Mayer wave + AR(1)
  noise); atrial fibrillation: independent log-normal RR draws (CV 0.15-0.30), no P wave,
  fibrillatory f-waves at 5-7 Hz.
- PPG pulse (systolic + dicrotic Gaussian) starts a pulse arrival time after each R peak; that
  time shortens as systolic blood pressure rises (set by the caller, see ``cohort``).
- respiration: RSA, QRS amplitude and PPG amplitude modulation, baseline wander in both signals,
  pulse arrival time modulation, and an impedance-like RESP waveform.
- ectopic beats (sinus subjects with ``ectopic_per_min`` > 0; none by default): premature
  atrial beats (early, a lower P wave, the rhythm reset) and premature ventricular beats (early,
  wide QRS, no P, a discordant T, a compensatory pause, a weak or missing pulse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.signal import lfilter

RR_MIN_S = 0.3  # refractory limit of any RR interval
RR_MAX_S = 2.0
PAD_BEFORE_S = 5.0  # beats are generated from this long before the record starts ...
PAD_AFTER_S = 3.0  # ... to this long after it ends, so every sample has neighbouring beats
_PULSE_REF_RR_S = 0.85  # cycle length at which the PPG pulse has its nominal timing

ArrayOrFloat = np.ndarray | float
NORMAL, PAC, PVC = 0, 1, 2  # beat kinds
ECTOPY_MODEL = 2  # bump when the ectopic-beat model changes: caches made with another are stale
_WAVE_HALF_WIDTHS = 4.5  # Gaussians are cut at +-4.5 widths (4e-5 of their peak)


@dataclass(frozen=True)
class Breathing:
    """Respiration with a slowly varying rate: f(t) = rate_hz * (1 + depth * cos(2 pi fm t))."""

    rate_hz: float  # mean respiratory rate
    fm_depth: float  # relative rate modulation
    fm_rate_hz: float  # how fast the rate drifts
    phase0_rad: float


@dataclass(frozen=True)
class SubjectPhysiology:
    """Per-subject parameters of the signal models (drawn by ``cohort``)."""

    af: bool
    mean_rr_s: float  # target mean RR interval
    rr_cv: float  # AF: log-normal sigma of the independent RR draws (~ CV)
    rsa_frac: float  # sinus: respiratory sinus arrhythmia, fraction of mean RR
    lf_frac: float  # sinus: Mayer wave amplitude, fraction of mean RR
    lf_hz: float  # Mayer wave frequency (~0.1 Hz)
    rr_noise_frac: float  # sinus: AR(1) RR noise, fraction of mean RR
    breathing: Breathing
    # ECG morphology, Gaussian waves relative to the R peak
    r_amp_mv: float
    r_width_s: float
    q_amp_mv: float  # negative
    s_amp_mv: float  # negative
    t_amp_mv: float
    p_amp_mv: float  # 0 in AF
    p_offset_s: float  # P-wave centre before R
    qtc_s: float  # Bazett-corrected QT; QT = qtc * sqrt(preceding RR)
    fwave_amp_mv: float  # AF fibrillatory waves, 0 in sinus rhythm
    fwave_hz: float
    qrs_resp_mod: float  # relative QRS amplitude modulation by respiration
    ecg_resp_baseline_mv: float
    # PPG
    pat_s: float  # R peak -> PPG pulse foot (pulse arrival time)
    pat_resp_s: float  # respiratory modulation of the pulse arrival time
    ppg_amp_nu: float
    ppg_dc_nu: float
    sys_centre_s: float  # systolic peak after the pulse foot, at the reference cycle length
    sys_width_s: float
    dia_centre_s: float  # dicrotic (reflected) wave after the pulse foot
    dia_width_s: float
    dicrotic_ratio: float
    ppg_riav: float  # respiratory-induced amplitude variation
    ppg_riiv_nu: float  # respiratory-induced intensity (baseline) variation
    resp_amp_nu: float
    # ectopy (sinus rhythm only; drawn from their own stream so a cohort without it is unchanged)
    ectopic_per_min: float = 0.0  # premature beats per minute
    pvc_share: float = 0.0  # of them, the ventricular ones (the rest atrial)


@dataclass(frozen=True)
class ArtefactProfile:
    """Recording artefacts of one site; rates are per hour of recording."""

    ecg_noise_mv: float  # white measurement noise
    ppg_noise_nu: float
    resp_noise_nu: float
    ecg_wander_mv: float  # non-respiratory baseline wander
    ppg_wander_nu: float
    motion_per_h: float  # motion bursts: EMG + baseline jumps in ECG, large PPG distortion
    motion_s: tuple[float, float]  # burst duration range
    dropout_per_h: float  # per channel: lead-off / probe-off stretches
    dropout_s: tuple[float, float]
    dropout_kind: Literal["nan", "flat"]  # NaN (written as the WFDB invalid sample) or held value
    mains_hz: float  # 0: no mains interference
    mains_mv: float


@dataclass(frozen=True)
class SimulatedSignals:
    """One subject's record in physical units, all channels at ``fs_hz``."""

    fs_hz: float
    ecg_mv: np.ndarray  # (T,) float64, NaN in dropouts
    ppg_nu: np.ndarray  # (T,) float64, NaN in dropouts
    resp_nu: np.ndarray  # (T,) float64
    r_peaks_s: np.ndarray  # (B,) R-peak times inside the record
    pulse_onsets_s: np.ndarray  # (B,) matching PPG pulse feet
    mean_hr_bpm: float  # realised mean heart rate, 60 / mean RR inside the record


def resp_phase_rad(t_s: np.ndarray, breathing: Breathing) -> np.ndarray:
    """Respiratory phase at times `t_s` (integral of the time-varying rate)."""
    b = breathing
    fm = b.rate_hz * b.fm_depth / b.fm_rate_hz
    return 2 * np.pi * b.rate_hz * t_s + fm * np.sin(2 * np.pi * b.fm_rate_hz * t_s) + b.phase0_rad


def resp_wave(phase_rad: np.ndarray) -> np.ndarray:
    """Breathing waveform in about [-1, 1]: a sine with a slightly faster inspiration."""
    return (np.sin(phase_rad) + 0.25 * np.sin(2 * phase_rad + 0.8)) / 1.1


def _sinus_rr_s(
    *, phys: SubjectPhysiology, start_s: float, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Sinus RR series: RSA at the respiratory phase of each beat, Mayer wave, AR(1) noise."""
    white = rng.standard_normal(n)
    lf_phase = rng.uniform(0, 2 * np.pi)
    noise = lfilter([np.sqrt(1 - 0.7**2)], [1.0, -0.7], white) * phys.rr_noise_frac
    t_s = start_s + np.arange(n) * phys.mean_rr_s  # first guess of beat times, refined twice
    for _ in range(2):
        rsa = phys.rsa_frac * resp_wave(resp_phase_rad(t_s, phys.breathing))
        lf = phys.lf_frac * np.sin(2 * np.pi * phys.lf_hz * t_s + lf_phase)
        rr_s = phys.mean_rr_s * (1.0 - rsa + lf + noise)  # inspiration shortens RR
        t_s = start_s + np.concatenate(([0.0], np.cumsum(rr_s[:-1])))
    return np.clip(rr_s, RR_MIN_S, RR_MAX_S)


def _af_rr_s(*, phys: SubjectPhysiology, n: int, rng: np.random.Generator) -> np.ndarray:
    """AF RR series: independent log-normal draws with mean `mean_rr_s` and CV ~ `rr_cv`."""
    sigma = phys.rr_cv
    rr_s = phys.mean_rr_s * np.exp(sigma * rng.standard_normal(n) - sigma**2 / 2)
    return np.clip(rr_s, RR_MIN_S, RR_MAX_S)


def beat_times_s(
    *, phys: SubjectPhysiology, duration_s: float, rng: np.random.Generator
) -> np.ndarray:
    """R-peak times covering [-PAD_BEFORE_S, duration_s + PAD_AFTER_S], ascending."""
    end_s = duration_s + PAD_AFTER_S
    start_s = -PAD_BEFORE_S + rng.uniform(0, 1) * phys.mean_rr_s
    n = int(np.ceil(1.6 * (end_s - start_s) / phys.mean_rr_s)) + 8
    if phys.af:
        rr_s = _af_rr_s(phys=phys, n=n, rng=rng)
    else:
        rr_s = _sinus_rr_s(phys=phys, start_s=start_s, n=n, rng=rng)
    r_s = start_s + np.concatenate(([0.0], np.cumsum(rr_s)))
    if r_s[-1] < end_s:  # practically never: extend with mean RR so coverage is guaranteed
        extra = np.ceil((end_s - r_s[-1]) / phys.mean_rr_s) + 1
        r_s = np.concatenate((r_s, r_s[-1] + phys.mean_rr_s * np.arange(1, extra + 1)))
    return r_s[: np.searchsorted(r_s, end_s) + 1]


def place_ectopic_beats(
    r_s: np.ndarray, *, phys: SubjectPhysiology, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Make some sinus beats premature: (R times, kind per beat: NORMAL, PAC or PVC).

    Each beat is ectopic with probability ``ectopic_per_min`` x its RR / 60 (never two in a
    row), coupled at 55-75 % of the preceding RR. A PVC leaves the sinus rhythm alone (the next
    beat keeps its time: a compensatory pause); a PAC resets it (every later beat moves earlier
    by 80 % of the prematurity; sinus beats are added so the beats still reach the last one's
    time).
    """
    kinds = np.zeros(len(r_s), dtype=np.int8)
    if phys.af or phys.ectopic_per_min <= 0 or len(r_s) < 3:
        return r_s, kinds
    end_s = r_s[-1]
    r_s = r_s.copy()
    rr_s = np.diff(r_s)
    chosen = rng.uniform(size=len(r_s)) < phys.ectopic_per_min * np.append(rr_s, rr_s[-1]) / 60
    coupling = rng.uniform(0.55, 0.75, size=len(r_s))
    ventricular = rng.uniform(size=len(r_s)) < phys.pvc_share
    for i in np.flatnonzero(chosen[1:-1]) + 1:
        if kinds[i - 1]:
            continue
        early = (1.0 - coupling[i]) * (r_s[i] - r_s[i - 1])
        r_s[i] -= early
        if ventricular[i]:
            kinds[i] = PVC
        else:
            kinds[i] = PAC
            r_s[i + 1 :] -= 0.8 * early
    if r_s[-1] < end_s:  # the resets moved the last beats earlier: sinus beats fill the end
        extra = r_s[-1] + phys.mean_rr_s * np.arange(1, int((end_s - r_s[-1]) / phys.mean_rr_s) + 2)
        r_s = np.concatenate((r_s, extra))
        kinds = np.concatenate((kinds, np.zeros(len(extra), dtype=np.int8)))
    return r_s, kinds


def _add_waves(
    out: np.ndarray, *, fs_hz: float, waves: list[tuple[np.ndarray, ArrayOrFloat, ArrayOrFloat]]
) -> None:
    """Add Gaussian waves to `out` in place, one per beat for each (centre_s, width_s, amp).

    Each wave is evaluated only within +-4.5 widths of its centre: a (beats, window) index grid
    built by broadcasting, summed into `out` with one ``np.bincount`` (windows may overlap).
    """
    n = len(out)
    idx_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    for centre_s, width_s, amp in waves:
        width = np.broadcast_to(width_s, centre_s.shape)  # (B,)
        half = int(np.ceil(_WAVE_HALF_WIDTHS * float(width.max()) * fs_hz))
        offsets = np.arange(-half, half + 1)  # (L,)
        centre = centre_s * fs_hz  # in samples
        base = np.rint(centre)
        frac = (centre - base).astype(np.float32)  # small numbers: float32 is exact enough
        inv_width = (1.0 / (width * fs_hz)).astype(np.float32)
        z = (offsets.astype(np.float32)[None, :] - frac[:, None]) * inv_width[:, None]  # (B, L)
        amp32 = np.broadcast_to(np.asarray(amp, dtype=np.float32), centre_s.shape)
        val_parts.append((amp32[:, None] * np.exp(-0.5 * z * z)).ravel())
        idx_parts.append((base.astype(np.int64)[:, None] + offsets).ravel())
    idx = np.concatenate(idx_parts)
    lead = max(0, -int(idx.min()))  # beats before the record: shift, sum, then cut away
    size = max(n, int(idx.max()) + 1) + lead
    total = np.bincount(idx + lead, np.concatenate(val_parts), minlength=size)
    out += total[lead : lead + n]


def render_ecg_mv(
    *, t_s: np.ndarray, fs_hz: float, r_s: np.ndarray, phys: SubjectPhysiology,
    kinds: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Clean ECG at sample times `t_s`: P (sinus) or f-waves (AF), QRS and T for every beat;
    `kinds` (:func:`place_ectopic_beats`) widens PVCs (no P, a discordant T) and lowers PACs' P."""
    rr_prev_s = np.clip(np.diff(r_s, prepend=r_s[0] - phys.mean_rr_s), RR_MIN_S, RR_MAX_S)
    qt_s = phys.qtc_s * np.sqrt(rr_prev_s)  # (B,) QT shortens at fast rates (Bazett)
    gain = 1.0 + phys.qrs_resp_mod * resp_wave(resp_phase_rad(r_s, phys.breathing))  # (B,)
    pvc = np.zeros(len(r_s), bool) if kinds is None else kinds == PVC
    pac = np.zeros(len(r_s), bool) if kinds is None else kinds == PAC
    w = phys.r_width_s * np.where(pvc, 2.2, 1.0)  # (B,) a PVC's QRS about 0.12-0.2 s
    gain = gain * np.where(pvc, 1.4, 1.0)
    waves = [
        (r_s - 2.6 * w, 0.8 * w, gain * phys.q_amp_mv),
        (r_s, w, gain * phys.r_amp_mv),
        (r_s + 2.8 * w, 0.9 * w, gain * phys.s_amp_mv),
        (r_s + 0.7 * qt_s, 0.12 * qt_s, phys.t_amp_mv * np.where(pvc, -1.8, 1.0)),
    ]
    if not phys.af:
        p_amp = phys.p_amp_mv * np.where(pvc, 0.0, np.where(pac, 0.4, 1.0))
        waves.append((r_s - phys.p_offset_s, 0.025, p_amp))
    ecg = np.zeros(len(t_s))
    _add_waves(ecg, fs_hz=fs_hz, waves=waves)
    if phys.af:
        fm = 0.15 * phys.fwave_hz / 0.2  # f-wave rate drifts by +-15 % at 0.2 Hz
        phase = 2 * np.pi * phys.fwave_hz * t_s + fm * np.sin(2 * np.pi * 0.2 * t_s)
        ecg += phys.fwave_amp_mv * (np.sin(phase) + 0.3 * np.sin(2 * phase + 1.0))
    return ecg


def render_ppg_nu(
    *, n: int, fs_hz: float, r_s: np.ndarray, phys: SubjectPhysiology, rng: np.random.Generator,
    kinds: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Clean PPG (`n` samples) and its pulse-foot times: a systolic + dicrotic pulse per beat.

    Each pulse starts `pat_s` (modulated by respiration, +-2 ms jitter) after its R peak; its
    timing stretches with the cycle length and its amplitude follows the preceding RR (a short
    filling time gives a weak beat, visible in AF); ectopic `kinds` weaken it further.
    """
    resp_b = resp_wave(resp_phase_rad(r_s, phys.breathing))  # (B,)
    onset_s = r_s + phys.pat_s + phys.pat_resp_s * resp_b + 0.002 * rng.standard_normal(len(r_s))
    rr_next_s = np.clip(np.diff(r_s, append=r_s[-1] + phys.mean_rr_s), RR_MIN_S, RR_MAX_S)
    rr_prev_s = np.clip(np.diff(r_s, prepend=r_s[0] - phys.mean_rr_s), RR_MIN_S, RR_MAX_S)
    scale = np.clip(np.sqrt(rr_next_s / _PULSE_REF_RR_S), 0.8, 1.15)  # (B,)
    filling = np.clip(rr_prev_s / phys.mean_rr_s, 0.6, 1.3) ** 0.5
    amp = phys.ppg_amp_nu * (1.0 + phys.ppg_riav * resp_b) * filling  # (B,)
    if kinds is not None:  # a premature ventricular beat ejects little: a weak or missing pulse
        amp = amp * np.where(kinds == PVC, 0.35, np.where(kinds == PAC, 0.8, 1.0))
    ppg = np.full(n, phys.ppg_dc_nu)
    waves = [
        (onset_s + phys.sys_centre_s * scale, phys.sys_width_s * scale, amp),
        (onset_s + phys.dia_centre_s * scale, phys.dia_width_s * scale, amp * phys.dicrotic_ratio),
    ]
    _add_waves(ppg, fs_hz=fs_hz, waves=waves)
    return ppg, onset_s


def _smooth_noise(
    idx: np.ndarray, *, n: int, fs_hz: float, knot_hz: float, rng: np.random.Generator
) -> np.ndarray:
    """Band-limited unit noise at sample indices `idx`: Gaussian knots, smoothstep-interpolated."""
    knots = rng.standard_normal(int(n * knot_hz / fs_hz) + 2)
    pos = idx * (knot_hz / fs_hz)
    i = pos.astype(np.int64)
    f = (pos - i).astype(np.float32)
    w = f * f * (3.0 - 2.0 * f)  # smoothstep: continuous slope at the knots
    return knots[i] + (knots[i + 1] - knots[i]) * w


def _event_mask(
    *,
    n: int,
    fs_hz: float,
    rate_per_h: float,
    dur_s: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Poisson events of random duration: (mask (n,) bool, start index of each event)."""
    count = rng.poisson(rate_per_h * n / fs_hz / 3600.0)
    starts = np.sort(rng.integers(0, n, size=count))
    lengths = np.maximum(np.round(rng.uniform(*dur_s, size=count) * fs_hz).astype(np.int64), 1)
    ends = np.minimum(starts + lengths, n)
    edges = np.bincount(starts, minlength=n + 1) - np.bincount(ends, minlength=n + 1)
    return np.cumsum(edges[:n]) > 0, starts


def _apply_dropouts(
    x: np.ndarray, *, fs_hz: float, profile: ArtefactProfile, rng: np.random.Generator
) -> None:
    """Blank stretches of `x` in place: NaN, or the value held from the stretch's start."""
    n = len(x)
    mask, starts = _event_mask(
        n=n, fs_hz=fs_hz, rate_per_h=profile.dropout_per_h, dur_s=profile.dropout_s, rng=rng
    )
    if profile.dropout_kind == "nan":
        x[mask] = np.nan
        return
    marker = np.zeros(n, dtype=np.int64)
    marker[starts] = starts
    hold = np.maximum.accumulate(marker)  # index of the latest event start at or before each i
    x[mask] = x[hold[mask]]


def add_artefacts(
    *,
    ecg_mv: np.ndarray,
    ppg_nu: np.ndarray,
    resp_nu: np.ndarray,
    fs_hz: float,
    phys: SubjectPhysiology,
    profile: ArtefactProfile,
    rng: np.random.Generator,
) -> None:
    """Add wander, noise, mains, motion bursts and dropouts to the signals, in place."""
    n = len(ecg_mv)
    all_idx = np.arange(n)
    ecg_mv += profile.ecg_wander_mv * _smooth_noise(all_idx, n=n, fs_hz=fs_hz, knot_hz=0.3, rng=rng)
    ppg_nu += profile.ppg_wander_nu * _smooth_noise(all_idx, n=n, fs_hz=fs_hz, knot_hz=0.2, rng=rng)
    ecg_mv += profile.ecg_noise_mv * rng.standard_normal(n, dtype=np.float32)
    ppg_nu += profile.ppg_noise_nu * rng.standard_normal(n, dtype=np.float32)
    resp_nu += profile.resp_noise_nu * rng.standard_normal(n, dtype=np.float32)
    if profile.mains_hz > 0:
        ecg_mv += profile.mains_mv * np.sin(2 * np.pi * profile.mains_hz / fs_hz * all_idx)
    motion, _ = _event_mask(
        n=n, fs_hz=fs_hz, rate_per_h=profile.motion_per_h, dur_s=profile.motion_s, rng=rng
    )
    idx = np.flatnonzero(motion)
    ecg_mv[idx] += 0.05 * rng.standard_normal(len(idx), dtype=np.float32)  # EMG
    ecg_mv[idx] += 0.3 * _smooth_noise(idx, n=n, fs_hz=fs_hz, knot_hz=2.0, rng=rng)
    ppg_nu[idx] += (
        1.5 * phys.ppg_amp_nu * _smooth_noise(idx, n=n, fs_hz=fs_hz, knot_hz=3.0, rng=rng)
    )
    resp_nu[idx] += phys.resp_amp_nu * _smooth_noise(idx, n=n, fs_hz=fs_hz, knot_hz=1.0, rng=rng)
    for x in (ecg_mv, ppg_nu):
        _apply_dropouts(x, fs_hz=fs_hz, profile=profile, rng=rng)


def simulate_signals(
    *,
    phys: SubjectPhysiology,
    profile: ArtefactProfile,
    fs_hz: float,
    duration_s: float,
    rng: np.random.Generator,
    ectopy_rng: np.random.Generator | None = None,
) -> SimulatedSignals:
    """Simulate one subject's paired ECG + PPG (+ RESP) record with the site's artefacts.

    Parameters
    ----------
    phys
        The subject's physiology.
    profile
        The site's artefact rates.
    fs_hz
        Sampling rate of every channel.
    duration_s
        Record length; the record has ``round(duration_s * fs_hz)`` samples.
    rng
        Source of every random draw (seeded by the caller for determinism).
    ectopy_rng
        Where ectopic beats are drawn (default `rng`); a separate stream leaves every other
        draw of the record as it is without ectopy.
    """
    n = round(duration_s * fs_hz)
    t_s = np.arange(n) / fs_hz
    r_s = beat_times_s(phys=phys, duration_s=duration_s, rng=rng)
    kinds = None
    if phys.ectopic_per_min > 0:
        r_s, kinds = place_ectopic_beats(r_s, phys=phys, rng=ectopy_rng or rng)
    ecg_mv = render_ecg_mv(t_s=t_s, fs_hz=fs_hz, r_s=r_s, phys=phys, kinds=kinds)
    ppg_nu, onset_s = render_ppg_nu(n=n, fs_hz=fs_hz, r_s=r_s, phys=phys, rng=rng, kinds=kinds)
    resp = resp_wave(resp_phase_rad(t_s, phys.breathing).astype(np.float32))  # (T,)
    ecg_mv += phys.ecg_resp_baseline_mv * resp
    ppg_nu += phys.ppg_riiv_nu * resp
    resp_nu = (phys.resp_amp_nu * resp).astype(np.float64)
    add_artefacts(
        ecg_mv=ecg_mv, ppg_nu=ppg_nu, resp_nu=resp_nu, fs_hz=fs_hz, phys=phys, profile=profile,
        rng=rng,
    )  # fmt: skip
    inside = (r_s >= 0) & (r_s < n / fs_hz)
    rr_inside_s = np.diff(r_s[inside])
    mean_hr = 60.0 / float(rr_inside_s.mean()) if len(rr_inside_s) else 60.0 / phys.mean_rr_s
    return SimulatedSignals(
        fs_hz=fs_hz, ecg_mv=ecg_mv, ppg_nu=ppg_nu, resp_nu=resp_nu, r_peaks_s=r_s[inside],
        pulse_onsets_s=onset_s[inside], mean_hr_bpm=mean_hr,
    )  # fmt: skip
