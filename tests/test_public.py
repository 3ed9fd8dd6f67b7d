"""The public federation (`biofp simulate --cohort public --quick`) on a Ray head started here.

One real run: every reader (WFDB+.dat, WFDB+.mat, MATLAB segments, text segments + .xlsx) and
every site, through the CLI, with ``--ray-address`` pointing at a local Ray head that this test
starts (``ray start --head --block`` on 127.0.0.1, in its own session and temp folder) and stops
by its process group id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import shared_data_dir
from fpkit import run_cli

from biofp_core.signals.formats import open_source
from biofp_core.site import load_site_config
from simulations.config import load_simulation_config
from simulations.public import cohort_config

FOLDERS = ("bidmc", "public/cinc2017", "public/liu2022-ppg-arrhythmia", "public/ppg-bp")
HEAD_CPUS = 3  # not this machine's count: the run must report the head's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A Ray head on 127.0.0.1 in a private temp folder; stopped by its process group."""
    ray = Path(sys.executable).parent / "ray"
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are limited
    port = _free_port()
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--num-cpus={HEAD_CPUS}", "--include-dashboard=false",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(0.5)
        time.sleep(2)  # the raylet registers after the GCS port opens
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's own group, by id
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_shipped_configs_parse_with_one_site_per_cohort() -> None:
    for quick in (False, True):
        cfg = load_simulation_config(cohort_config("public", quick=quick))
        assert cfg.dataset == "public" and cfg.sites == 4 and cfg.site_epsilon == 8.0
        assert [s.folder for s in cfg.public_sites] == list(FOLDERS)
        assert [s.modality for s in cfg.public_sites] == ["both", "ecg", "ppg", "ppg"]
        assert (cfg.public_sites[0].max_subjects is None) is not quick


def test_coordinator_docs_pretrain_with_the_public_recipe() -> None:
    """docs/coordinator.md's recipe is public.toml's: the same model-options and premature beats,
    and the quick config differs only in the model's size."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "coordinator.md").read_text()
    stats = docs.split("STATS='", 1)[1].split("'", 1)[0]
    full, quick = (load_simulation_config(cohort_config("public", quick=q)) for q in (False, True))
    assert json.loads(stats) == json.loads(full.run.model_options)
    assert f"--ectopic-per-min {full.pretrain.ectopic_per_min:g}" in docs
    size = {"width", "heads", "decoder_width", "modality_depth", "fusion_depth"}
    small = {k: v for k, v in json.loads(quick.run.model_options).items() if k not in size}
    assert small == json.loads(full.run.model_options)


def test_public_quick_federation_on_a_local_ray_head(
    tmp_path: Path, ray_head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_root = shared_data_dir()
    for folder in FOLDERS:
        if not (data_root / folder).is_dir():
            pytest.skip(f"public cohort folder {data_root / folder} is absent")
    monkeypatch.setenv("BIOFP_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code, err = run_cli(
        "simulate", "--cohort", "public", "--quick", "--out", str(out),
        "--data-root", str(data_root), "--ray-address", ray_head,
        "--compare", "pooled", "--curve-epsilons", "4,0.05",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert [s["name"] for s in summary["sites"]] == ["bidmc", "cinc2017", "liu2022", "ppg-bp"]
    for site in summary["sites"]:
        assert 0 < site["ledger"]["epsilon"] <= 8.0
        assert site["subjects_train"] >= 1 and site["subjects_holdout"] >= 1
    assert (out / "model.safetensors").is_file() and (out / "model.card.json").is_file()
    card = json.loads((out / "model.card.json").read_text())
    pretrained = next((tmp_path / "cache" / "pretrained").glob("*/model.card.json"))
    assert (
        card["training"]["initialised_from"] == json.loads(pretrained.read_text())["weights_sha256"]
    )  # [pretrain]: round 1 started from the synthetic weights
    assert (
        f"joined the Ray cluster at {ray_head} ({HEAD_CPUS} CPUs)" in (out / "run.log").read_text()
    )
    formats = []
    for name in ("bidmc", "cinc2017", "liu2022", "ppg-bp"):
        site = load_site_config(out / "sites" / name / "site.toml")
        formats.append(open_source(site.data_dir, site.reader).format)
        assert site.labels_csv is not None and site.labels_csv.is_file()
    assert formats == ["wfdb", "wfdb", "matseg", "textseg"]
    liu_labels = (out / "sites" / "liu2022" / "labels.csv").read_text().splitlines()
    assert liu_labels[0] == "record,subject,start_s,rhythm"
    tasks = json.loads((out / "federated_eval.json").read_text())["tasks"]
    rhythm = [s for s in tasks["rhythm"]["sites"].values() if s["status"] == "ok"]
    assert len(rhythm) == 2  # CinC per record, Liu per window (folds by subject)
    assert sorted(s["probe"]["rows"] > s["probe"]["subjects"] for s in rhythm) == [False, True]
    for task in ("hypertension", "sex"):
        assert [s["status"] for s in tasks[task]["sites"].values()].count("ok") >= 1
    _assert_public_report(out)


def _assert_public_report(out: Path) -> None:
    """The run's report: every site's tasks for every model, the comparisons it was asked to
    train, the ε curve and the reconstruction drawn, the verdicts."""
    study = json.loads((out / "report" / "public_study.json").read_text())
    models = study["models"]
    assert {"untrained", "synthetic-pretrained", "federated DP", "pooled non-DP",
            "federated DP ε=4"} <= set(models)  # fmt: skip
    assert all(models[m]["model"] for m in ("untrained", "pooled non-DP", "federated DP ε=4"))
    assert models["pooled non-DP"]["epsilon"] == dict.fromkeys(
        models["pooled non-DP"]["epsilon"], 0.0
    )
    assert 0 < max(models["federated DP ε=4"]["epsilon"].values()) <= 4.0
    assert models["federated DP ε=0.05"]["model"] is None  # the planner cannot serve it
    assert "0.05" in models["federated DP ε=0.05"]["error"]
    results = study["results"]
    for label in ("untrained", "hand-crafted", "synthetic-pretrained", "federated DP",
                  "pooled non-DP"):  # fmt: skip
        assert set(results[label]) == {"bidmc", "cinc2017", "liu2022", "ppg-bp"}, label
    cinc = results["federated DP"]["cinc2017"]["AF vs rest"]
    assert cinc["main"] and 0.0 <= cinc["value"] <= 1.0 and cinc["subjects"] >= 10
    hr = results["hand-crafted"]["bidmc"]["heart rate"]  # monitor numerics read from the record
    assert hr["metric"] == "MAE / mean predictor's" and hr["mae"] > 0 and hr["rows"] > 14
    for label in ("hand-crafted", "federated DP"):  # the wearable's view: PPG windows alone
        alone = results[label]["bidmc"]["heart rate, PPG alone"]
        paired = results[label]["bidmc"]["heart rate"]
        assert alone["error"] is None and 0 < alone["rows"] <= paired["rows"], label
        assert alone["mae"] != paired["mae"], label  # other features: not the paired probe again
    assert (out / study["figures"]["epsilon curve"]).stat().st_size > 10_000
    recon = study["reconstruction"]["federated DP"]
    assert recon["windows"] >= 1 and -1 <= recon["median_r"] <= 1
    assert (out / study["figures"]["reconstruction federated DP"]).is_file()
    text = (out / "report.md").read_text()
    headings = ("## Goals (federated DP model)", "## Does joining help?", "### cinc2017",
                "### bidmc", "## Utility against ε", "## Cross-modal reconstruction")  # fmt: skip
    for heading in headings:
        assert heading in text, heading
    assert "| federated DP within 0.03 AUROC / 10 % MAE of pooled non-DP |" in text
