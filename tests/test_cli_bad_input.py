"""A user's mistake gets one line naming the file and the problem, exit 1, nothing written and
nothing charged: output paths that are folders or lie under a file, a malformed site.toml or
labels CSV, a lost pseudonym key, the wrong folder for the ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
from fpkit import run_cli, site_config, tiny_artifact, tiny_cohort

from biofp_core.errors import ConfigError, DataError
from biofp_core.evaluation.labels import read_labels
from biofp_core.fingerprints.pseudonyms import KEY_FILENAME, SiteKey
from biofp_core.privacy.ledger import PrivacyLedger
from biofp_core.site import load_site_config


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cohort(tmp_path_factory.mktemp("cohort"), sites=1, subjects=4)


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def blocker(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("keep me\n")
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "synth", "--out", "{blocker}/sub", "--sites", "1", "--subjects-per-site", "1",
         "--minutes", "0.1"],
        ["demo", "--out", "{blocker}", "--sites", "1", "--subjects-per-site", "1"],
        ["certs", "init", "--out", "{blocker}", "--server-name", "localhost"],
        ["certs", "init", "--out", "{blocker}/sub", "--server-name", "localhost"],
        ["server", "app", "--out", "{blocker}"],
        ["pretrain", "--out", "{blocker}", "--steps", "1", "--sites", "1", "--subjects-per-site",
         "1", "--minutes", "0.5", "--model", "siamquality"],
    ],
    ids=["synth-under-file", "demo-file", "certs-file", "certs-under-file", "app-file",
         "pretrain-file"],
)  # fmt: skip
def test_an_output_folder_that_is_a_file_is_one_line(blocker: Path, argv: list[str]) -> None:
    code, err = run_cli(*(a.format(blocker=blocker) for a in argv))
    one_line_error(code, err, str(blocker))
    assert blocker.read_text() == "keep me\n"


@pytest.mark.parametrize("where", ["folder", "under-file"])
def test_site_validate_json_to_a_bad_path_reads_nothing(
    cohort: Path, tmp_path: Path, blocker: Path, where: str
) -> None:
    target = tmp_path if where == "folder" else blocker / "report.json"
    code, err = run_cli("site", "validate", "--data", str(cohort / "site_00"), "--json",
                        str(target))  # fmt: skip
    one_line_error(code, err, str(target))


def test_fingerprint_to_a_folder_charges_nothing(cohort: Path, tmp_path: Path) -> None:
    site = site_config(tmp_path / "site", cohort / "site_00", cache=tmp_path / "cache",
                       release="clip_norm = 1.0\nepsilon = 2.0")  # fmt: skip
    model = tiny_artifact(tmp_path / "model")
    code, err = run_cli("fingerprint", "--model", str(model), "--config",
                        str(tmp_path / "site" / "site.toml"), "--out", str(tmp_path))  # fmt: skip
    one_line_error(code, err, "is a folder")
    assert PrivacyLedger.at(site.resolved_state_dir()).entries == []


def test_a_data_dir_that_is_not_a_path_is_one_line(tmp_path: Path) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text('name = "north"\ndata_dir = ["a"]\n')
    with pytest.raises(ConfigError, match=r"site.toml: data_dir: must be a path") as exc:
        load_site_config(toml)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("row", "found"), [("r1,65,7", 3), ("r1", 1)], ids=["extra", "missing"])
def test_a_labels_row_with_the_wrong_number_of_cells_is_refused(
    tmp_path: Path, row: str, found: int
) -> None:
    (tmp_path / "labels.csv").write_text(f"record_pseudonym,age\nx,60\n{row}\n")
    with pytest.raises(DataError, match=rf"line 3: {found} cells, the header has 2"):
        read_labels(tmp_path / "labels.csv")


def test_a_lost_pseudonym_key_is_not_replaced_silently(cohort: Path, tmp_path: Path) -> None:
    site = site_config(tmp_path / "site", cohort / "site_00", cache=tmp_path / "cache",
                       release='level = "record"')  # fmt: skip
    model = tiny_artifact(tmp_path / "model")
    toml = str(tmp_path / "site" / "site.toml")
    code, err = run_cli("fingerprint", "--model", str(model), "--config", toml,
                        "--out", str(tmp_path / "first.parquet"))  # fmt: skip
    assert code == 0, err
    state = site.resolved_state_dir()
    (state / KEY_FILENAME).unlink()
    code, err = run_cli("fingerprint", "--model", str(model), "--config", toml,
                        "--out", str(tmp_path / "second.parquet"))  # fmt: skip
    one_line_error(code, err, "pseudonym key missing", "--new-pseudonym-key")
    assert not (tmp_path / "second.parquet").exists()
    code, err = run_cli("fingerprint", "--model", str(model), "--config", toml, "--out",
                        str(tmp_path / "second.parquet"), "--new-pseudonym-key")  # fmt: skip
    assert code == 0, err
    assert SiteKey.load(state).path is not None


def test_site_ledger_reads_the_site_folder_and_refuses_a_folder_without_a_ledger(
    cohort: Path, tmp_path: Path
) -> None:
    site = site_config(tmp_path / "site", cohort / "site_00", cache=tmp_path / "cache")
    PrivacyLedger.at(site.resolved_state_dir()).charge(
        run_id="r", server_round=1, noise_multiplier=1.0, sample_rate=0.5, steps=10, delta=1e-5
    )
    from fpkit import run_cli_out

    code, out = run_cli_out("site", "ledger", "--site-dir", str(tmp_path / "site"))
    assert code == 0 and "ε spent: 0.000" not in out and "ε spent:" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli("site", "ledger", "--site-dir", str(empty))
    one_line_error(code, err, "no privacy ledger here")


def test_the_documented_audit_check_passes_on_a_site_that_released(
    cohort: Path, tmp_path: Path
) -> None:
    site = site_config(tmp_path / "site", cohort / "site_00", cache=tmp_path / "cache",
                       release="clip_norm = 1.0\nepsilon = 2.0")  # fmt: skip
    model = tiny_artifact(tmp_path / "model")
    toml = str(tmp_path / "site" / "site.toml")
    code, err = run_cli("fingerprint", "--model", str(model), "--config", toml, "--out",
                        str(tmp_path / "f.parquet"))  # fmt: skip
    assert code == 0, err
    doc = (Path(__file__).resolve().parents[1] / "docs" / "hospital-it.md").read_text()
    assert (
        "biofp site audit --site-dir /var/lib/biofp/north --config /etc/biofp/site.toml --check"
        in doc
    )
    state = str(site.resolved_state_dir())
    code, err = run_cli("site", "audit", "--site-dir", state, "--config", toml, "--check")
    assert code == 0, err


def test_a_federated_simulation_without_ray_is_one_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The site and server images ship without Ray: `biofp simulate` there stops in one line
    naming what to install, and writes nothing."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as without Ray
    out = tmp_path / "run"
    code, err = run_cli("simulate", "--rounds", "1", "--out", str(out))
    one_line_error(code, err, "needs Ray", "pip install 'flwr[simulation]'")
    assert not out.exists()
