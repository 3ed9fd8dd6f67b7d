"""Fingerprint figures (issue 5): what released fingerprints are good for, and what they leak.

.venv/bin/python bench/fingerprints.py [--steps 300] [--smoke] [--no-bidmc]

1. Synthetic default cohort (4 sites x 16 subjects x 5 min, seed 0): ``biofp simulate`` as the
   README runs it, with its report: the federated DP model, the centralized non-DP and federated
   DP-off comparisons, every site releasing record fingerprints from paired, ECG-only and PPG-only
   input, linear probes of AF and hypertension (folds by subject), sex/age inference with and
   without release noise. Two ablations on the same sites: the untrained initial model and a
   federated DP model without the rhythm token. Issue figures: PPG-only AF AUROC of the
   federated DP model >= 0.95 and >= 0.97 x the centralized non-DP model's; ECG-only and
   PPG-only >= 0.90 x paired.
2. BIDMC split into 4 hospitals by patient: a model trained on the pooled hospitals; HR and
   respiratory-rate MAE from released fingerprints vs the mean predictor; sex AUROC (attribute
   inference) from releases without noise and with clipping + Gaussian noise per vector.

Everything goes through the real path: site configs, window stores, ``release_store`` (ledger,
audit, Parquet file), ``read_fingerprints``, labels pseudonymised with each site's key.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import report, shared_data

from biofp_core.artifacts import ModelCard, PrivacySummary, SitePrivacy, load_model, save_model
from biofp_core.datasets import write_bidmc_labels
from biofp_core.evaluation import (
    LabelRows,
    StudyRow,
    aggregate_probes,
    attribute_inference,
    check_against,
    evaluate_table,
    merge_labels,
    read_labels,
    site_probe,
    task_labels,
)
from biofp_core.fingerprints.export import release_store
from biofp_core.fingerprints.parquet import read_fingerprints
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.fingerprints.pseudonyms import KEY_FILENAME, SiteKey
from biofp_core.fingerprints.table import FingerprintTable, concat
from biofp_core.models.m2ae import M2AE, M2AEConfig
from biofp_core.privacy import DPConfig
from biofp_core.protocol import RunConfig
from biofp_core.site import SiteConfig, load_site_config
from biofp_core.store import WindowStore
from biofp_core.training import TrainConfig, train_local
from biofp_core.validate import open_site_store

MODEL = {"width": 64, "heads": 4, "decoder_width": 32, "modality_depth": 1, "fusion_depth": 1}
SMOKE_MODEL = {**MODEL, "width": 32, "heads": 2, "decoder_width": 16}
SYNTH_TASKS = ("af", "hypertension")
MAIN = "federated DP"  # the report's label of the simulation's own model
MODELS = (MAIN, "centralized non-DP", "federated DP-off", "untrained",
          "federated DP, no rhythm token")  # fmt: skip
BUDGET = 1000.0  # the bench's sites may release many times; real sites set their own
CLIP_NORM = 1.0  # C of the noisy release (fingerprint norms are reported beside it)


@dataclass(frozen=True)
class Site:
    """One hospital of the bench: its config, window store and labels file."""

    config: SiteConfig
    store: WindowStore
    labels: Path


def make_site(root: Path, data_dir: Path, labels: Path, cache: Path) -> Site:
    """A site folder with a site.toml (labels map records to subjects) and its window store."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.toml").write_text(
        f'name = "{root.name}"\ndata_dir = "{data_dir}"\ncache_dir = "{cache}"\n'
        f'state_dir = "{root / "state"}"\nlabels_csv = "{labels}"\n'
        f"[privacy]\nepsilon = {BUDGET}\n"
    )
    config = load_site_config(root / "site.toml")
    _fixed_key(config.resolved_state_dir(), root.name)
    return Site(config, open_site_store(config), labels)


def _fixed_key(state_dir: Path, name: str) -> None:
    """A key derived from the site's name, so pseudonyms, hence CV folds, repeat across runs.

    Bench only: a real site's key is random (`SiteKey.load_or_create`).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    key = state_dir / KEY_FILENAME
    key.write_text(hashlib.sha256(f"bench-{name}".encode()).hexdigest() + "\n")
    key.chmod(0o600)


def with_release(site: Site, policy: ReleasePolicy) -> Site:
    """The same site (same key, ledger and store) under another release policy."""
    return Site(site.config.model_copy(update={"release": policy}), site.store, site.labels)


def bidmc_sites(root: Path, bidmc: Path, *, hospitals: int = 4, seed: int = 0) -> list[Site]:
    """BIDMC records split by patient (MIMIC id) into hospitals of linked files + labels."""
    labels = write_bidmc_labels(bidmc, root / "bidmc-labels.csv")
    with open(labels) as fh:
        rows = list(csv.DictReader(fh))
    patients = sorted({r["subject"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    hospital_of = {patients[i]: rank % hospitals for rank, i in enumerate(order)}
    sites = []
    for h in range(hospitals):
        data = root / "bidmc" / f"hospital_{h}"
        data.mkdir(parents=True)
        mine = [r for r in rows if hospital_of[r["subject"]] == h]
        for r in mine:
            for suffix in (".hea", ".dat"):
                (data / f"{r['record']}{suffix}").symlink_to(bidmc / f"{r['record']}{suffix}")
        with open(data / "labels.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(mine)
        sites.append(
            make_site(root / "sites" / data.name, data, data / "labels.csv", root / "cache")
        )
    return sites


def train(sites: list[Site], out: Path, *, dp: bool, steps: int, arch: dict) -> tuple[Path, dict]:
    """A model trained on the pooled sites with ``train_local``; the artifact and a summary."""
    torch.manual_seed(0)
    model = M2AE(M2AEConfig(**arch))
    subjects = [s for site in sites for s in site.store.subjects()]
    cfg = TrainConfig(steps=steps, batch_subjects=8, bag_size=16, lr=1e-3, seed=0)
    dp_cfg = DPConfig(noise_multiplier=1.5, max_grad_norm=1.0, seed=0) if dp else None
    result = train_local(model, subjects, cfg, dp=dp_cfg)
    eps = result.privacy.epsilon if result.privacy is not None else None
    privacy = (
        PrivacySummary(sites={"pooled": SitePrivacy(epsilon=eps, delta=1e-5)}) if eps else None
    )
    path = save_model(model, out, ModelCard(privacy=privacy))
    return path, {"steps": steps, "train_s": result.wall_s, "final_loss": result.final_loss,
                  "epsilon": eps, "subjects": len(subjects)}  # fmt: skip


@dataclass(frozen=True)
class Released:
    """What every site released (read back from its file) and its labels, per site."""

    tables: list[FingerprintTable]
    labels: list[LabelRows]
    stats: dict

    @property
    def table(self) -> FingerprintTable:
        return concat(self.tables)

    @property
    def pooled_labels(self) -> LabelRows:
        return merge_labels(self.labels)


def release_all(
    sites: list[Site], model_path: Path, out_dir: Path, *, modality: str = "paired"
) -> Released:
    """Each site releases a real file, which is read back with its labels (site key)."""
    model, card = load_model(model_path)
    tables, labels = [], []
    stats: dict = {"bytes": 0, "rows": 0, "s": 0.0, "noise_sigma": None}
    for index, site in enumerate(sites):
        out = out_dir / f"{site.config.name}-{modality}.parquet"
        t0 = time.perf_counter()
        report_, _ = release_store(  # seed=index: each site draws its own noise
            site.store, model, card, site=site.config, out=out, modality=modality, seed=index
        )
        stats["s"] += time.perf_counter() - t0
        stats["bytes"] += report_.bytes
        stats["rows"] += report_.rows
        table, meta = read_fingerprints(out)
        stats["noise_sigma"] = meta.noise_sigma
        rows = read_labels(site.labels, key=SiteKey.load(site.config.resolved_state_dir()))
        check_against(rows, table)
        tables.append(table)
        labels.append(rows)
    return Released(tables, labels, stats)


def probe_args(smoke: bool) -> dict:
    """5 folds redrawn 20 times: with 32 subjects one fold draw moves AUROC by ~0.1."""
    return {"folds": 5, "repeats": 20, "seed": 0, "n_boot": 200 if smoke else 1000}


def synthetic_figures(root: Path, args: argparse.Namespace, step: Callable[[str], None]) -> dict:
    """`biofp simulate` as the README runs it, report on, plus two ablations on the same sites.

    The report trains the federated DP model (the issue's model), the centralized non-DP and the
    federated DP-off comparisons, and studies all three (``OUT/report/downstream.json``). The
    ablations say where the AF figure comes from: the untrained initial model (what pretraining
    adds) and a federated DP model without the rhythm token (what the learned path gives alone).
    """
    from simulations.downstream import StudyConfig, load_study_sites, run_study
    from simulations.report import REPORT_DIR, STUDY_NAME, ResearchReport
    from simulations.run import SITES_MANIFEST, SimulationConfig, SimulationSites, simulate

    smoke = {"synth_minutes": 1.0} if args.smoke else {}
    run = RunConfig(model_options=json.dumps(SMOKE_MODEL)) if args.smoke else RunConfig()
    cfg = SimulationConfig(out=root / "sim", cache_dir=root / "cache", report=True, run=run,
                           **smoke)  # fmt: skip
    step("synthetic: biofp simulate (federated DP) + report (centralized, DP-off, studies)")
    t0 = time.perf_counter()
    summary = simulate(cfg, on_stage=lambda text: step(f"  {text}"))
    report_s = time.perf_counter() - t0
    report = ResearchReport.model_validate_json((cfg.out / REPORT_DIR / STUDY_NAME).read_text())
    manifest = SimulationSites.model_validate_json((cfg.out / SITES_MANIFEST).read_bytes())
    sites = load_study_sites(manifest, holdout_fraction=cfg.run.holdout_fraction)
    study = StudyConfig(tasks=SYNTH_TASKS, noisy=False)
    studies = {s.model: s for s in report.studies}
    step("synthetic: ablation, the untrained initial model")
    untrained = save_model(cfg.run.build_model(), root / "untrained" / "model", ModelCard())
    out = root / "releases"
    studies["untrained"] = run_study(
        untrained, sites, label="untrained", out_dir=out / "untrained", config=study
    )
    step("synthetic: ablation, federated DP without the rhythm token")
    options = {**json.loads(cfg.run.model_options), "rhythm_token": False}
    plain = cfg.model_copy(update={
        "out": root / "sim-no-rhythm", "report": False, "sites_dir": None,
        "run": cfg.run.model_copy(update={"model_options": json.dumps(options)}),
    })  # fmt: skip
    plain_summary = simulate(plain)
    studies["federated DP, no rhythm token"] = run_study(
        Path(plain_summary.model_path), sites, label="federated DP, no rhythm token",  # type: ignore[arg-type]
        out_dir=root / "releases" / "no-rhythm", config=study,
    )  # fmt: skip
    stores = [Site(s.config, s.store, s.config.labels_csv) for s in sites]  # type: ignore[arg-type]
    return {
        "sites": len(sites), "subjects": sum(len(s.train) + len(s.holdout) for s in sites),
        "simulate_with_report_s": report_s, "max_epsilon": summary.max_epsilon,
        "runs": [r.model_dump() for r in report.runs], "failures": report.failures,
        "reconstruction": [r.model_dump() for r in report.reconstruction],
        "rhythm_oracle_af_auroc": rhythm_oracle(stores),
        "studies": {name: _study_rows(s) for name, s in studies.items()},
        "attributes": [_audit_row(r) for r in studies[MAIN].attributes],
    }  # fmt: skip


def _study_rows(study) -> dict:
    """task -> modality -> probe result with its ratio to paired (releases without noise)."""
    from simulations.downstream import CLEAN

    out: dict = {}
    for r in study.ablation.get(CLEAN, []):
        out.setdefault(r.result.task, {})[r.fingerprints] = {
            **r.result.model_dump(),
            "relative": r.relative,
        }
    return out


def rhythm_oracle(sites: list[Site]) -> dict[str, float]:
    """AF AUROC of one hand-made rhythm feature, the ceiling a fingerprint should approach.

    Per subject: the median over windows of RMSSD / mean of the beat intervals between peaks of
    the z-scored ECG or PPG (scipy ``find_peaks``). Computed at the sites, on raw signals.
    """
    from scipy.signal import find_peaks

    from biofp_core.evaluation import auroc

    def irregularity(windows: np.ndarray) -> float:
        values = []
        for w in windows:
            peaks, _ = find_peaks(w, distance=40, prominence=1.0)  # >= 0.32 s apart at 125 Hz
            if len(peaks) > 4:
                rr = np.diff(peaks)
                values.append(np.sqrt(np.mean(np.diff(rr) ** 2)) / rr.mean())
        return float(np.median(values)) if values else 0.0

    out = {}
    for modality in ("ecg", "ppg"):
        y, score = [], []
        for site in sites:
            with open(site.labels) as fh:
                af = {r["subject"]: int(r["af"]) for r in csv.DictReader(fh)}
            for subject in site.store.subjects():
                present = subject.mask[:, 0 if modality == "ecg" else 1]
                y.append(af[subject.subject_id])
                score.append(irregularity(getattr(subject, modality)[present]))
        out[modality] = auroc(np.array(y), np.array(score))
    return out


def bidmc_figures(root: Path, args: argparse.Namespace, step: Callable[[str], None]) -> dict:
    arch = SMOKE_MODEL if args.smoke else MODEL
    sites = bidmc_sites(root, shared_data() / "bidmc")
    step(f"BIDMC: training ({args.steps} steps)")
    path, info = train(sites, root / "models" / "bidmc", dp=False, steps=args.steps, arch=arch)
    step("BIDMC: releases without and with noise")
    released = release_all(sites, path, root / "releases" / "bidmc")
    clean = released.table
    policy = ReleasePolicy(clip_norm=CLIP_NORM, epsilon=args.release_epsilon)
    noisy_sites = [with_release(s, policy) for s in sites]
    noisy = release_all(noisy_sites, path, root / "releases" / "bidmc-noisy")
    step("BIDMC: probes")
    labels = released.pooled_labels
    tasks = {t: task_labels(labels, t) for t in ("hr_bpm", "resp_rate_bpm", "sex", "age")}
    audit = attribute_inference(
        {"no noise": clean, f"noise ε={policy.epsilon:g}/vector": noisy.table},
        utility=tasks["hr_bpm"], attributes=[tasks["sex"], tasks["age"]],
        **probe_args(args.smoke),
    )  # fmt: skip
    probes = {t: evaluate_table(clean, tasks[t], **probe_args(args.smoke)).model_dump()
              for t in ("hr_bpm", "resp_rate_bpm")}  # fmt: skip
    cv = {k: v for k, v in probe_args(args.smoke).items() if k != "n_boot"}
    per_site = list(zip(released.tables, released.labels, strict=True))
    federated = {t: aggregate_probes([site_probe(table, task_labels(rows, t), **cv)
                                      for table, rows in per_site]).model_dump()
                 for t in ("hr_bpm", "resp_rate_bpm")}  # fmt: skip
    norms = np.linalg.norm(clean.at_level("record").fp, axis=1)
    return {
        "model": info,
        "records": len(clean.at_level("record")),
        "subjects": len(set(clean.subject)),
        "fingerprint_norm_median": float(np.median(norms)),
        "noisy_release": {**policy.model_dump(), "sigma": noisy.stats["noise_sigma"]},
        "probes": probes,
        "federated_probes": federated,
        "audit": [_audit_row(r) for r in audit],
        "release": released.stats,
    }


def _audit_row(row: StudyRow) -> dict:
    return {"fingerprints": row.fingerprints, "role": row.role, "relative": row.relative,
            **row.result.model_dump()}  # fmt: skip


def _with_ci(r: dict) -> str:
    return f"{r['value']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def rows_of(synth: dict, bidmc: dict | None) -> list[tuple[str, str, str]]:
    """The printed table: (figure, value, target)."""
    oracle = synth["rhythm_oracle_af_auroc"]
    rows = [(f"synth AF AUROC rhythm feature (ceiling) {m}", f"{oracle[m]:.3f}", "reference")
            for m in ("ecg", "ppg")]  # fmt: skip
    studies = synth["studies"]
    for name in (n for n in MODELS if n in studies):
        af = studies[name]["af"]
        for m in ("paired", "ecg", "ppg"):
            target = ">= 0.95" if (name, m) == (MAIN, "ppg") else ""
            rows.append((f"synth AF AUROC {name} {m}", _with_ci(af[m]), target))
        if name in (MAIN, "centralized non-DP"):
            for m in ("ecg", "ppg"):
                rows.append((f"synth AF AUROC {name} {m}/paired", f"{af[m]['relative']:.3f}",
                             ">= 0.90"))  # fmt: skip
        htn = studies[name].get("hypertension", {}).get("ppg")
        if htn:
            rows.append((f"synth hypertension AUROC {name} ppg", _with_ci(htn), ""))
    if MAIN in studies and "centralized non-DP" in studies:
        ratio = (
            studies[MAIN]["af"]["ppg"]["value"]
            / studies["centralized non-DP"]["af"]["ppg"]["value"]
        )
        rows.append(("synth AF AUROC ppg federated DP / centralized non-DP", f"{ratio:.3f}",
                     ">= 0.97"))  # fmt: skip
    for r in synth["attributes"]:
        rows.append((f"synth {r['task']} ({r['role']}), {r['fingerprints']}", _with_ci(r), ""))
    rec = [r["correlation"] for r in synth["reconstruction"] if r.get("correlation") is not None]
    if rec:
        rows.append(
            ("synth ECG-from-PPG correlation, median held-out", f"{np.median(rec):.3f}", "")
        )
    if bidmc is not None:
        for task, unit in (("hr_bpm", "bpm"), ("resp_rate_bpm", "/min")):
            r = bidmc["probes"][task]
            value = f"{r['value']:.2f} / {r['baseline']:.2f}"
            rows.append((f"BIDMC {task} MAE ({unit}) / mean predictor", value, "< mean predictor"))
            f = bidmc["federated_probes"][task]
            value = f"{f['value']:.2f} / {f['baseline']:.2f}"
            rows.append((f"BIDMC {task} MAE federated (site probes)", value, "< mean predictor"))
        for r in (r for r in bidmc["audit"] if r["task"] == "sex"):
            rows.append((f"BIDMC sex AUROC, {r['fingerprints']}", _with_ci(r), "attack: low"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="BIDMC training steps (non-DP)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1-minute records")
    parser.add_argument("--no-bidmc", action="store_true", help="skip the BIDMC section")
    parser.add_argument("--release-epsilon", type=float, default=8.0, help="ε per noisy vector")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="biofp-bench-fp-"))

    def step(what: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {what}", flush=True)

    try:
        synth = synthetic_figures(tmp / "synth", args, step)
        bidmc = None if args.no_bidmc else bidmc_figures(tmp / "bidmc", args, step)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - started
    payload = {"synthetic": synth, "bidmc": bidmc, "wall_s": wall,
               "settings": {"bidmc_steps": args.steps, "smoke": args.smoke, "threads": 2,
                            "model": SMOKE_MODEL if args.smoke else MODEL,
                            "probe": probe_args(args.smoke)}}  # fmt: skip
    rows = [*rows_of(synth, bidmc), ("wall time (s)", f"{wall:.0f}", "<= 300")]
    report("fingerprints-smoke" if args.smoke else "fingerprints", rows, payload)


if __name__ == "__main__":
    main()
