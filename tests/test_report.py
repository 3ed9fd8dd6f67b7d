"""The research report of ``biofp simulate``: the downstream study of released fingerprints (no
Flower), then the whole report of a real simulation (Flower's engine, run through the CLI).

Sizes: 4 sites x 6 one-minute subjects (24 subjects, 6 windows each), a tiny M2AE, 2 rounds of 2
local steps. The report's run trains two comparison models (one more Flower simulation); the
``--no-report`` run is one round.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from fpkit import TINY, tiny_artifact

from biofp_cli.commands.simulate import main as simulate_cli
from biofp_core.artifacts import load_model, save_model
from biofp_core.evaluation import evaluate_table, merge_labels, read_labels, task_labels
from biofp_core.fingerprints.parquet import read_fingerprints
from biofp_core.fingerprints.policy import ReleasePolicy, calibrate_noise
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.table import concat
from biofp_core.models import build_model
from biofp_core.privacy.ledger import PrivacyLedger, rdp_epsilon
from biofp_core.protocol import RunConfig
from biofp_core.site import PrivacyBudget
from client.site_data import SimulationSites, SiteData
from server.report import RunReport
from simulations.config import (
    SITES_MANIFEST,
    RunSummary,
    SimulationConfig,
    load_simulation_config,
)
from simulations.downstream import (
    CLEAN,
    NOISY,
    SYNTHETIC_TASKS,
    StudyConfig,
    cross_modal_reconstruction,
    load_study_sites,
    release_all,
    run_study,
)
from simulations.plots import short_node
from simulations.report import (
    REPORT_DIR,
    REPORT_NAME,
    STUDY_NAME,
    ResearchReport,
    comparison_configs,
)
from simulations.run import prepare_sites, report_run

FAST_PROBES = {"repeats": 2, "n_boot": 50}
TINY_RUN = {
    "model-options": json.dumps(TINY), "num-rounds": 2, "local-steps": 2, "batch-subjects": 2,
    "bag-size": 2, "noise-multiplier": 3.0, "wait-timeout-s": 30.0, "round-timeout-s": 300.0,
}  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY_SITE_LIMITS = {"min_train_subjects": 1}  # tiny emulated sites loosen the default


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("report-cache")


def tiny_sim(cache_dir: Path, out: Path, **fields: object) -> SimulationConfig:
    return load_simulation_config(
        None, sites=4, synth_sites=4, synth_subjects_per_site=6, synth_minutes=1.0,
        site_privacy=TINY_SITE_LIMITS,
        cache_dir=cache_dir, out=out, cpus=2, run=TINY_RUN, **fields,
    )  # fmt: skip


def key_of(site: SiteData) -> SiteKey:
    return SiteKey.load(site.state_dir)


# ---- the downstream study, without Flower ------------------------------------------------------


@pytest.fixture(scope="module")
def skewed_sites(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[SiteData]:
    """4 sites, one of them ECG-only (modality skew); site_01's budget too small for a release."""
    root = tmp_path_factory.mktemp("skewed")
    cfg = tiny_sim(cache_dir, root / "run", partition="modality-skew", modality_share=0.25)
    manifest = prepare_sites(cfg)
    assert [s.modality for s in manifest.sites] == ["both", "both", "ecg", "both"]
    toml = manifest.sites[1].site_config
    toml.write_text(toml.read_text().replace("epsilon = 8.0", "epsilon = 0.5"))
    return load_study_sites(manifest, holdout_fraction=0.25)


def test_downstream_study_releases_charges_and_probes(
    skewed_sites: list[SiteData], tmp_path: Path
) -> None:
    artifact = tiny_artifact(tmp_path / "model")
    config = StudyConfig(tasks=SYNTHETIC_TASKS, **FAST_PROBES)
    study = run_study(artifact, skewed_sites, label="tiny", out_dir=tmp_path / "rel", config=config)
    by_site = {s.name: [r for r in study.releases if r.site == s.name] for s in skewed_sites}
    # the ECG-only site embeds only ECG (its "paired" release is its ECG one), once per variant
    assert sorted((r.variant, r.modality) for r in by_site["site_02"]) == [
        (CLEAN, "ecg"), (NOISY, "ecg")]  # fmt: skip
    assert all(len(by_site[n]) == 6 for n in ("site_00", "site_01", "site_03"))
    sigma = calibrate_noise(ReleasePolicy(clip_norm=1.0, epsilon=1.0), vectors_per_subject=1,
                            default_delta=1e-5).sigma  # fmt: skip
    for row in study.releases:
        if row.site == "site_01" and row.variant == NOISY:  # budget 0.5 < one release
            assert row.refused and "budget" in row.refused and row.file is None
            continue
        table, meta = read_fingerprints(Path(row.file))
        assert len(table) == row.rows == 6 and set(table.level) == {"record"}
        assert meta.noise_sigma == (pytest.approx(sigma) if row.variant == NOISY else None)
    assert sum("site_01: noisy" in n and "refused" in n for n in study.notes) == 3
    releases = {s.name: [e for e in PrivacyLedger.at(s.state_dir).entries if e.kind == "release"]
                for s in skewed_sites}  # fmt: skip
    assert {n: len(e) for n, e in releases.items()} == {
        "site_00": 3, "site_01": 0, "site_02": 1, "site_03": 3}  # fmt: skip

    # modality ablation: every task on paired / ECG / PPG; PPG lacks the ECG-only site's 6 rows
    for variant, subjects in ((CLEAN, 24), (NOISY, 18)):
        for task in SYNTHETIC_TASKS:
            rows = {m: study.ablation_row(variant, task, m) for m in ("paired", "ecg", "ppg")}
            assert rows["paired"].relative == 1.0
            assert rows["paired"].result.subjects == subjects
            assert rows["ppg"].result.subjects == subjects - 6
    # the pooled probe is the probe of the files the sites released, joined to their labels
    serving_paired = [Path(r.file) for r in study.releases if r.variant == CLEAN
                      and (r.modality == "paired" or r.site == "site_02")]  # fmt: skip
    paired = concat([read_fingerprints(f)[0] for f in serving_paired])
    labels = merge_labels([read_labels(s.config.labels_csv, key=key_of(s)) for s in skewed_sites])
    expected = evaluate_table(paired, task_labels(labels, "af"), folds=5, seed=0, **FAST_PROBES)
    assert study.ablation_row(CLEAN, "af", "paired").result == expected

    # attribute inference: af (utility), sex and age (attacks), without then with noise
    seen = [(r.fingerprints, r.result.task, r.role) for r in study.attributes]
    assert seen == [(CLEAN, "af", "utility"), (NOISY, "af", "utility"), (CLEAN, "sex", "attack"),
                    (NOISY, "sex", "attack"), (CLEAN, "age", "attack"),
                    (NOISY, "age", "attack")]  # fmt: skip
    assert [r.result.metric for r in study.attributes][-1] == "mae"

    # the same model studied again: the same reproducible releases, charged nothing more
    before = {s.name: PrivacyLedger.at(s.state_dir).epsilon(delta=1e-5) for s in skewed_sites}
    model, card = load_model(artifact)
    release_all(model, card, skewed_sites, tmp_path / "again", config)
    after = {s.name: PrivacyLedger.at(s.state_dir).epsilon(delta=1e-5) for s in skewed_sites}
    assert after == before and before["site_00"] > 0


def test_reconstruction_uses_held_out_subjects(
    skewed_sites: list[SiteData], tmp_path: Path
) -> None:
    windows = cross_modal_reconstruction(tiny_artifact(tmp_path / "m2ae"), skewed_sites)
    assert [w.row.site for w in windows] == ["site_00", "site_01", "site_03"]  # paired sites
    for w in windows:
        site = next(s for s in skewed_sites if s.name == w.row.site)
        held = {key_of(site).subject(s.subject_id): s for s in site.holdout}
        trained = {key_of(site).subject(s.subject_id) for s in site.train}
        assert w.row.subject in held and w.row.subject not in trained
        subject = held[w.row.subject]
        i = int(np.flatnonzero(subject.start_s == w.row.start_s)[0])
        np.testing.assert_array_equal(w.ecg, subject.ecg[i])
        np.testing.assert_array_equal(w.ppg, subject.ppg[i])
        assert w.ecg_from_ppg.shape == (1250,)
        assert w.row.correlation == pytest.approx(np.corrcoef(w.ecg, w.ecg_from_ppg)[0, 1])
    siam = tmp_path / "siam"
    save_model(build_model("siamquality"), siam)
    assert cross_modal_reconstruction(siam, skewed_sites) == []


def test_default_budget_allows_training_and_the_reports_releases() -> None:
    """Default run (16 subjects/site, 25 % held out, 3 x 8 steps, σ 1.5) + 3 noisy releases."""
    run, study = RunConfig(), StudyConfig()
    cfg = SimulationConfig()
    train_subjects = cfg.synth_subjects_per_site - int(run.holdout_fraction * 16)
    training = (run.noise_multiplier, run.batch_subjects / train_subjects,
                run.num_rounds * run.local_steps)  # fmt: skip
    release = calibrate_noise(ReleasePolicy(clip_norm=study.clip_norm,
                                            epsilon=study.release_epsilon),
                              vectors_per_subject=1, default_delta=cfg.delta)  # fmt: skip
    history = [training, *[(release.noise_multiplier, 1.0, 1)] * 3]
    assert rdp_epsilon(history, delta=cfg.delta) < cfg.site_epsilon == PrivacyBudget().epsilon


def test_comparison_runs_share_the_main_sites_budget(tmp_path: Path) -> None:
    cfg = tiny_sim(tmp_path / "cache", tmp_path / "run", report=True)
    configs = comparison_configs(cfg)
    central, off = configs["centralized"], configs["dp-off"]
    assert central.centralized and not central.run.dp and not central.report
    assert central.site_root == cfg.site_root and central.site_epsilon == cfg.site_epsilon == 8.0
    assert not off.run.dp and not off.report
    assert off.site_root == cfg.out / "comparisons" / "dp-off" / "sites"
    assert "dp-off" not in comparison_configs(cfg.model_copy(update={"run": off.run}))


# ---- the whole report of a simulation ------------------------------------------------------------


def sim_toml(path: Path, cache_dir: Path, **run: object) -> Path:
    lines = ["[simulation]", "sites = 4", "synth_sites = 4", "synth_subjects_per_site = 6",
             "synth_minutes = 1.0", f"cache_dir = {json.dumps(str(cache_dir))}", "cpus = 2",
             "", "[run]"]  # fmt: skip
    for key, value in {**TINY_RUN, **run}.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reported(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`biofp simulate --config sim.toml --out OUT`: the report is on by default."""
    root = tmp_path_factory.mktemp("reported")
    simulate_cli(["--config", str(sim_toml(root / "sim.toml", cache_dir)),
                  "--out", str(root / "run")])  # fmt: skip
    return root / "run"


def md_tables(text: str) -> dict[tuple[str, ...], list[list[str]]]:
    """Every markdown table of `text`: header cells -> rows of cells."""
    tables: dict[tuple[str, ...], list[list[str]]] = {}
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables[tuple(block[0])] = block[2:]
            block = []
    return tables


def close(cell: str, value: float | None) -> bool:
    """A report cell (4 significant digits) against the number it was written from."""
    if value is None:
        return cell == "–"
    return math.isclose(float(cell), value, rel_tol=1e-3, abs_tol=1e-12)


def study_of(out: Path) -> ResearchReport:
    return ResearchReport.model_validate_json((out / REPORT_DIR / STUDY_NAME).read_bytes())


def test_report_numbers_are_those_of_metrics_json(reported: Path) -> None:
    text = (reported / REPORT_NAME).read_text()
    tables = md_tables(text)
    metrics = RunReport.read(reported)
    assert metrics is not None and len(metrics.rounds) == 2
    rounds = next(rows for header, rows in tables.items() if "bytes received" in header)
    assert len(rounds) == len(metrics.rounds)
    for row, rnd in zip(rounds, metrics.rounds, strict=True):
        assert int(row[0]) == rnd.server_round and row[6] == str(rnd.bytes_received)
        assert close(row[4], rnd.train_loss) and close(row[5], rnd.eval_loss)
        assert close(row[7], rnd.max_epsilon)
    per_site = {(r[0], r[1]): r for r in tables[("round", "site", "status", "train loss", "ε",
                                                 "bytes")]}  # fmt: skip
    assert len(per_site) == 8
    for rnd in metrics.rounds:
        for site in rnd.sites:
            row = per_site[(str(rnd.server_round), short_node(site.node_id))]
            assert row[2] == site.status and row[5] == str(site.payload_bytes)
            assert close(row[3], site.train_loss) and close(row[4], site.epsilon)


def test_report_numbers_are_those_of_the_downstream_json(reported: Path) -> None:
    tables = md_tables((reported / REPORT_NAME).read_text())
    report = study_of(reported)
    assert report.failures == []
    assert [(r.label, r.status) for r in report.runs] == [
        ("federated DP", "completed"), ("centralized non-DP", "completed"),
        ("federated DP-off", "completed")]  # fmt: skip
    assert [s.model for s in report.studies] == [r.label for r in report.runs]
    tasks = tables[("model", "task", "metric", "paired", "ECG only", "PPG only", "baseline")]
    assert len(tasks) == 6
    for row in tasks:
        study = next(s for s in report.studies if s.model == row[0])
        for cell, modality in zip(row[3:6], ("paired", "ecg", "ppg"), strict=True):
            r = study.ablation_row(CLEAN, row[1], modality).result
            assert cell == f"{r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"
    attacks = next(rows for h, rows in tables.items() if h[:4] == ("model", "release", "task",
                                                                   "role"))  # fmt: skip
    expected = [(s.model, r.fingerprints, r.result.task, f"{r.result.value:.3f}")
                for s in report.studies for r in s.attributes]  # fmt: skip
    assert [(r[0], r[1], r[2], r[5].split()[0]) for r in attacks] == expected
    assert len(expected) == 6 + 3 + 3  # main model with and without noise, the others without
    sites = tables[("site", "sensors", "train/held-out subjects", "windows", "ε after training",
                    "ε after the report's releases", "budget")]  # fmt: skip
    for row in sites:
        ledger = PrivacyLedger.at(reported / "sites" / row[0] / "state")
        assert close(row[5], report.site_epsilon[row[0]])
        assert report.site_epsilon[row[0]] == pytest.approx(ledger.epsilon(delta=1e-5))
        kinds = [e.kind for e in ledger.entries]
        assert kinds == ["train", "evaluate"] * 2 + ["release"] * 3
        assert float(row[5]) > float(row[4]) and row[6] == "8"
    recon = tables[("site", "subject (pseudonym)", "start (s)", "r")]
    assert [(r[1], float(r[3])) for r in recon] == [
        (w.subject, pytest.approx(w.correlation, rel=1e-3)) for w in report.reconstruction
    ]
    assert len(recon) == 4


def test_every_linked_png_is_a_valid_figure(reported: Path) -> None:
    text = (reported / REPORT_NAME).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(Path(link).stem for link in links) == sorted(
        ["loss", "epsilon", "bytes", "downstream", "ablation", "attributes", "reconstruction"]
    )
    for link in links:
        data = (reported / link).read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and len(data) > 5000
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 300 and height >= 200


def test_report_models_and_held_out_reconstruction(reported: Path) -> None:
    report = study_of(reported)
    summary = RunSummary.model_validate_json((reported / "summary.json").read_bytes())
    assert summary.report_path == reported / REPORT_NAME
    central, off = (Path(r.out_dir) for r in report.runs[1:])
    assert central == reported / "comparisons" / "centralized"
    assert off == reported / "comparisons" / "dp-off"
    off_metrics = RunReport.read(off)
    assert off_metrics is not None and all(
        s.epsilon is None for r in off_metrics.rounds for s in r.sites
    )
    for d in (off / "sites").glob("site_*"):  # unlimited budgets: unprotected, but on record
        entries = PrivacyLedger.at(d / "state").entries
        assert entries and all(e.noise_multiplier == 0 for e in entries)
    manifest = SimulationSites.read(reported / SITES_MANIFEST)
    sites = {s.name: s for s in load_study_sites(manifest, holdout_fraction=0.25)}
    for row in report.reconstruction:
        site = sites[row.site]
        assert row.subject in {key_of(site).subject(s.subject_id) for s in site.holdout}
        assert row.subject not in {key_of(site).subject(s.subject_id) for s in site.train}


def test_a_failed_comparison_is_one_line_and_keeps_the_rest(reported: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(reported, out, ignore=shutil.ignore_patterns("comparisons", REPORT_DIR,
                                                                 REPORT_NAME))  # fmt: skip
    (out / "comparisons").mkdir()
    for name in ("centralized", "dp-off"):
        (out / "comparisons" / name).write_text("not a directory")
    cfg = SimulationConfig.model_validate_json((reported / "simulation.json").read_bytes())
    cfg = cfg.model_copy(update={"out": out, "sites_dir": reported / "sites"})
    summary = RunSummary.model_validate_json((reported / "summary.json").read_bytes())
    summary = summary.model_copy(update={"out_dir": out, "model_path": out / "model.safetensors"})
    before = (out / "metrics.json").read_bytes()
    study = StudyConfig(tasks=("af",), attributes=("sex",), repeats=1, n_boot=20)
    text = report_run(cfg, summary, study=study).read_text()
    failed = text.split("## What failed\n\n")[1].split("\n\n")[0].splitlines()
    assert len(failed) == 2 and all(" run failed: " in line for line in failed)
    report = study_of(out)
    assert [s.model for s in report.studies] == ["federated DP"]
    assert (out / "metrics.json").read_bytes() == before and (out / "report/loss.png").exists()


def test_no_report_writes_none(reported: Path, cache_dir: Path, tmp_path: Path) -> None:
    """The flag sets ``report`` (no flag: on); a federated run with it off (the report's DP-off
    run, same switch) and a ``--no-report`` run write no report, plot or comparison."""
    on = SimulationConfig.model_validate_json((reported / "simulation.json").read_bytes())
    assert on.report
    off = reported / "comparisons" / "dp-off"
    out = tmp_path / "run"
    toml = sim_toml(tmp_path / "sim.toml", cache_dir)
    simulate_cli(
        ["--config", str(toml), "--out", str(out), "--centralized", "--no-dp", "--no-report"]
    )
    assert not SimulationConfig.model_validate_json((out / "simulation.json").read_bytes()).report
    for run in (off, out):
        assert (run / "model.safetensors").exists() and (run / "summary.json").exists()
        assert not (run / REPORT_NAME).exists() and not (run / REPORT_DIR).exists()
        assert not (run / "comparisons").exists() and not list(run.rglob("*.png"))
        summary = RunSummary.model_validate_json((run / "summary.json").read_bytes())
        assert summary.report_path is None and summary.status == "completed"


def test_the_utility_vs_epsilon_curve_draws_one_panel_per_site(tmp_path: Path) -> None:
    from PIL import Image

    from simulations.plots import utility_vs_epsilon

    curves = {
        "cinc2017": [(8.0, 0.88, 0.8, 0.95), (2.0, 0.84, 0.7, 0.9), (math.inf, 0.9, 0.85, 0.95)],
        "bidmc": [(8.0, 1.1, 0.9, 1.3)],
        "empty": [],
    }
    path = utility_vs_epsilon(curves, tmp_path / "eps.png", references={"bidmc": {"x": 1.0}})
    assert path == tmp_path / "eps.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 280)  # 2 panels of 3 x 2.8 in
    assert utility_vs_epsilon({"empty": []}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
