"""Site config (site.toml), labels and subject maps, and the `biofp site validate` command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import copy_records
from fpkit import BIOFP

from biofp_core.errors import ConfigError, DataError
from biofp_core.site import check_label_ids, load_site_config
from biofp_core.validate import validate_site


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_site_toml_resolves_paths_and_aliases(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "site.toml",
        'name = "north"\ndata_dir = "data"\ncache_dir = "cache"\n'
        '[aliases]\necg = ["Lead-2"]\n[privacy]\nepsilon = 3.0\n[preprocess]\nhop_s = 5.0\n',
    )
    site = load_site_config(cfg)
    assert site.data_dir == (tmp_path / "data").resolve()
    assert site.cache_dir == (tmp_path / "cache").resolve()
    pre = site.preprocess_config()
    assert pre.aliases.ecg[0] == "lead2" and "ii" in pre.aliases.ecg
    assert pre.hop_s == 5.0 and site.privacy.epsilon == 3.0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('data_dir = "d"\nbogus = 1\n', "bogus"),
        ('data_dir = "d"\n[privacy]\nepsilon = -1\n', "privacy.epsilon"),
        ('data_dir = "d"\n[preprocess]\nhop_s = "fast"\n', "hop_s"),
        ("data_dir = \n", "invalid TOML"),
        ('name = "x"\n', "data_dir is not set"),
    ],
)
def test_bad_site_config_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    cfg = write(tmp_path / "site.toml", text)
    with pytest.raises(ConfigError) as exc:
        load_site_config(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and str(cfg) in msg and needle in msg


def test_labels_need_a_key_column_and_known_subjects(tmp_path: Path) -> None:
    good = write(tmp_path / "labels.csv", "subject,af\na,1\nb,0\n")
    key, rows = check_label_ids(good, subjects={"a", "b"})
    assert key == "subject" and len(rows) == 2
    with pytest.raises(DataError, match=r"labels.csv: 1 unknown subject\(s\).*'zz'"):
        check_label_ids(write(tmp_path / "labels.csv", "subject,af\na,1\nzz,0\n"), subjects={"a"})
    with pytest.raises(DataError, match="missing key column"):
        check_label_ids(write(tmp_path / "labels.csv", "patient,af\na,1\n"), subjects={"a"})


def test_validate_reports_each_record(tmp_path: Path, bidmc_dir: Path) -> None:
    data = copy_records(bidmc_dir, tmp_path / "data", ["bidmc01", "bidmc02", "bidmc01n"])
    write(tmp_path / "data" / "subjects.csv", "record,subject\nbidmc01,p1\nbidmc02,p1\n")
    cfg = write(
        tmp_path / "site.toml",
        f'data_dir = "{data}"\ncache_dir = "cache"\nsubject_map_csv = "data/subjects.csv"\n',
    )
    report = validate_site(load_site_config(cfg))
    assert report.usable_records == 2 and report.failed_records == 1 and report.subjects == 1
    bad = next(r for r in report.records if r.record_id == "bidmc01n")
    assert not bad.usable and "no ECG or PPG" in bad.problem
    good = next(r for r in report.records if r.record_id == "bidmc01")
    assert good.windows_kept >= 44 and good.fs_hz["ppg"] == 125.0


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BIOFP, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_validate_writes_json_and_exits_zero(tmp_path: Path, bidmc_dir: Path) -> None:
    data = copy_records(bidmc_dir, tmp_path / "data", ["bidmc01", "bidmc01n"])
    out = tmp_path / "report.json"
    res = run_cli("site", "validate", "--data", str(data), "--json", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "bidmc01" in res.stdout and "1 usable, 1 failed" in res.stdout
    report = json.loads(out.read_text())
    assert report["usable_records"] == 1 and report["windows"] >= 44


@pytest.mark.parametrize("case", ["empty", "only-bad", "bad-labels", "missing-dir"])
def test_cli_validate_bad_input_is_one_line(tmp_path: Path, bidmc_dir: Path, case: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    args = ["site", "validate", "--data", str(data)]
    if case == "only-bad":
        copy_records(bidmc_dir, data, ["bidmc01n"])
    if case == "bad-labels":
        copy_records(bidmc_dir, data, ["bidmc01"])
        write(tmp_path / "labels.csv", "subject,af\nghost,1\n")
        cfg = write(tmp_path / "site.toml", f'data_dir = "{data}"\nlabels_csv = "labels.csv"\n')
        args += ["--config", str(cfg)]
    if case == "missing-dir":
        args[3] = str(tmp_path / "nope")
    old_report = write(tmp_path / "report.json", "{}")
    res = run_cli(*args, "--json", str(old_report), cwd=tmp_path)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert old_report.read_text() == "{}"  # nothing already written is lost


def test_tasks_declare_each_probe_kind_and_bad_ones_are_one_line_errors(tmp_path: Path) -> None:
    """A probe's kind and classes are the site's settings (they leave the site), never read off
    the labels."""
    head = f'data_dir = "{tmp_path}"\n[tasks]\n'
    rhythm = 'rhythm = { kind = "multiclass", classes = ["sr", "af", "flutter"] }\n'
    cfg = write(tmp_path / "site.toml", head + 'af = "binary"\nage = "regression"\n' + rhythm)
    tasks = load_site_config(cfg).tasks
    assert {k: (t.kind, t.classes) for k, t in tasks.items()} == {
        "af": ("binary", ("0", "1")), "age": ("regression", ()),
        "rhythm": ("multiclass", ("sr", "af", "flutter")),
    }  # fmt: skip
    bad = [
        ('af = "binry"', "tasks.af"),
        ('af = { kind = "binary", classes = ["a", "b", "c"] }', "exactly 2"),
        ('age = { kind = "regression", classes = ["x"] }', "no classes"),
    ]
    for body, needle in bad:
        write(cfg, head + body + "\n")
        with pytest.raises(ConfigError, match=needle) as exc:
            load_site_config(cfg)
        assert str(exc.value).startswith(str(cfg)) and "\n" not in str(exc.value)
