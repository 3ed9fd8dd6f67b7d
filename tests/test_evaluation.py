"""Probes on constructed data with known answers, labels by pseudonym, studies, CLI bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fpkit import run_cli, site_config, tiny_artifact, tiny_cohort
from sklearn.metrics import roc_auc_score

from biofp_core.errors import ConfigError, DataError
from biofp_core.evaluation import (
    TaskLabels,
    aggregate_probes,
    attribute_inference,
    auroc,
    check_against,
    join,
    macro_auroc,
    merge_labels,
    modality_ablation,
    probe,
    read_labels,
    site_probe,
    task_labels,
)
from biofp_core.evaluation.probes import cross_validated
from biofp_core.fingerprints.export import export_fingerprints
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.table import FingerprintTable


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def grouped(
    rng: np.random.Generator, n_subjects: int, per_subject: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Subject ids of the rows and random features (N, dim)."""
    groups = np.repeat([f"s{i:03d}" for i in range(n_subjects)], per_subject)
    return groups, rng.normal(size=(len(groups), dim))


def test_auroc_matches_scikit_learn_with_ties(rng: np.random.Generator) -> None:
    y = rng.integers(0, 2, 300)
    score = np.round(rng.normal(size=300), 1)  # many ties
    assert auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    y3, proba = rng.integers(0, 3, 300), rng.dirichlet([1, 1, 1], 300)
    expected = roc_auc_score(y3, proba, multi_class="ovr", average="macro")
    assert macro_auroc(y3, proba) == pytest.approx(expected, abs=1e-12)


def test_separable_classes_give_auroc_one(rng: np.random.Generator) -> None:
    groups, X = grouped(rng, 40, 3, 8)
    y = np.repeat(rng.integers(0, 2, 40), 3)
    X[:, 0] += 10.0 * y
    result = probe(X, y, groups, kind="binary", task="af", n_boot=200)
    assert result.value == 1.0 and result.ci_low == result.ci_high == 1.0
    assert result.subjects == 40 and result.rows == 120 and result.folds == 5


def test_independent_labels_give_chance() -> None:
    values = []  # one probe's AUROC on noise has sd ~0.05 here: average 20 of them
    for seed in range(20):
        rng = np.random.default_rng(seed)
        groups, X = grouped(rng, 150, 2, 8)
        y = np.repeat(rng.integers(0, 2, 150), 2)
        values.append(probe(X, y, groups, kind="binary", repeats=1, n_boot=0).value)
    assert abs(np.mean(values) - 0.5) < 0.035 and max(abs(v - 0.5) for v in values) < 0.2


def test_ridge_on_an_exact_linear_target_has_zero_error(rng: np.random.Generator) -> None:
    groups, X = grouped(rng, 50, 2, 6)
    y = X @ rng.normal(size=6) + 3.0
    result = probe(X, y, groups, kind="regression", n_boot=100)
    assert result.metric == "mae" and result.value < 1e-3 and result.baseline > 0.5


def test_ridge_alpha_is_chosen_by_subject_so_subject_memorising_features_do_not_overfit() -> None:
    """Rows of a subject share 60 features that identify it and its label offset: leave-one-row-
    out picks a small α that memorises subjects (MAE 1.30 × the mean predictor's on these data);
    the inner folds by subject pick a large one, and a real signal still gets a small one."""
    from biofp_core.evaluation.probes import RIDGE_ALPHAS, ridge_alpha

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(24), 40)
    subject = rng.normal(size=(24, 60))[groups] + 0.1 * rng.normal(size=(len(groups), 60))
    signal = rng.normal(size=len(groups))
    X = np.c_[subject, signal + 0.3 * rng.normal(size=len(groups))]
    y = 3 * rng.normal(size=24)[groups] + signal
    assert ridge_alpha(X, y, groups) >= 100
    r = probe(X, y, groups, kind="regression", folds=5, repeats=1, n_boot=0)
    assert r.value / r.baseline < 1.15
    shared = np.c_[signal + 0.05 * rng.normal(size=len(groups)), rng.normal(size=(len(groups), 5))]
    assert ridge_alpha(shared, signal, groups) <= RIDGE_ALPHAS[len(RIDGE_ALPHAS) // 2]


def test_multiclass_macro_auroc(rng: np.random.Generator) -> None:
    groups, X = grouped(rng, 60, 2, 5)
    y = np.repeat(rng.integers(0, 3, 60), 2)
    X[np.arange(len(y)), y] += 6.0
    result = probe(X, y, groups, kind="multiclass", classes=("a", "b", "c"), n_boot=100)
    assert result.metric == "macro_auroc" and result.value > 0.99


def test_folds_never_share_a_subject(rng: np.random.Generator) -> None:
    # Identical rows within a subject and random labels: a linear probe fits any training set in
    # 64 dims, so a row whose subject leaked into training would be predicted perfectly.
    n = 40
    groups = np.repeat([f"s{i}" for i in range(n)], 10)
    X = np.repeat(rng.normal(size=(n, 64)), 10, axis=0)
    y = np.repeat(rng.integers(0, 2, n), 10)
    assert probe(X, y, groups, kind="binary", n_boot=0).value < 0.8


def test_bootstrap_is_seeded_and_brackets_the_value(rng: np.random.Generator) -> None:
    groups, X = grouped(rng, 60, 2, 4)
    y = X[:, 0] * 2 + rng.normal(size=len(X))
    a = probe(X, y, groups, kind="regression", seed=7, n_boot=300)
    b = probe(X, y, groups, kind="regression", seed=7, n_boot=300)
    assert a == b and a.ci_low < a.value < a.ci_high and a.value < a.baseline


def test_single_class_and_too_few_subjects_are_one_line_errors(rng: np.random.Generator) -> None:
    groups, X = grouped(rng, 10, 2, 4)
    with pytest.raises(DataError, match="single class"):
        probe(X, np.zeros(len(X)), groups, kind="binary")
    y = np.zeros(len(X))
    y[:2] = 1  # one subject of class 1
    with pytest.raises(DataError, match="2 subjects per class"):
        probe(X, y, groups, kind="binary")


# ---- labels keyed by pseudonym -------------------------------------------------------------------


def labels_file(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_task_kinds_are_inferred(tmp_path: Path) -> None:
    key = SiteKey.load_or_create(tmp_path)
    rows = [f"p{i},{i % 2},{'MF'[i % 2]},{30 + i},{'abc'[i % 3]}" for i in range(9)]
    path = labels_file(tmp_path / "l.csv", "subject,af,sex,age,ward", rows)
    labels = read_labels(path, key=key)
    kinds = {t: task_labels(labels, t).kind for t in ("af", "sex", "age", "ward")}
    assert kinds == {"af": "binary", "sex": "binary", "age": "regression", "ward": "multiclass"}
    sex = task_labels(labels, "sex")
    assert sex.classes == ("F", "M") and sex.values[key.subject("p0")] == 1.0
    assert labels.key == "subject" and set(labels.rows) == {key.subject(f"p{i}") for i in range(9)}


@pytest.mark.parametrize(
    ("header", "rows", "task", "error", "needle"),
    [
        ("subject,age", ["a,40", "b,old"], "age", DataError, "mixes numbers and text"),
        ("subject,af", ["a,1", "b,1"], "af", DataError, "single class"),
        ("subject,af", ["a,1", "b,0"], "hr", DataError, "no task column 'hr'"),
        ("patient,af", ["a,1", "b,0"], "af", DataError, "missing key column"),
        ("subject,af", ["a,1", "a,0"], "af", DataError, "duplicate subject 'a'"),
        ("subject,af", ["a,1", ",0"], "af", DataError, "empty subject"),
    ],
)
def test_bad_labels_are_one_line_errors(
    tmp_path: Path, header: str, rows: list[str], task: str, error: type, needle: str
) -> None:
    path = labels_file(tmp_path / "l.csv", header, rows)
    with pytest.raises(error, match=needle) as err:
        task_labels(read_labels(path, key=SiteKey.load_or_create(tmp_path)), task)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_regression_kind_rejects_text(tmp_path: Path) -> None:
    path = labels_file(tmp_path / "l.csv", "subject,grade", ["a,low", "b,high"])
    labels = read_labels(path, key=SiteKey.load_or_create(tmp_path))
    with pytest.raises(DataError, match="must be numeric"):
        task_labels(labels, "grade", kind="regression")


def small_table(key: SiteKey, subjects: list[str]) -> FingerprintTable:
    n = len(subjects)
    rng = np.random.default_rng(n)
    return FingerprintTable(
        subject=np.array([key.subject(s) for s in subjects], dtype=object),
        record=np.array([key.record(f"r-{s}") for s in subjects], dtype=object),
        level=np.full(n, "record", dtype=object), modality=np.full(n, "paired", dtype=object),
        quality=np.ones(n, np.float32), n_windows=np.ones(n, np.int32),
        fp=rng.normal(size=(n, 4)).astype(np.float32),
    )  # fmt: skip


def test_labels_must_match_the_fingerprints(tmp_path: Path) -> None:
    key = SiteKey.load_or_create(tmp_path)
    table = small_table(key, ["a", "b"])
    unknown = labels_file(tmp_path / "u.csv", "subject,af", ["a,1", "b,0", "zed,1"])
    with pytest.raises(DataError, match=r"1 subject.*not in the fingerprints.*'zed'"):
        check_against(read_labels(unknown, key=key), table)
    moved = labels_file(tmp_path / "m.csv", "record,subject,af", ["r-a,b,1", "r-b,b,0"])
    with pytest.raises(DataError, match="record 'r-a' has another subject"):
        check_against(read_labels(moved, key=key), table)
    with pytest.raises(ConfigError, match="pseudonymised with its key"):
        read_labels(unknown, key=None)
    by_pseudonym = labels_file(tmp_path / "p.csv", "subject_pseudonym,af",
                               [f"{key.subject('a')},1", f"{key.subject('b')},0"])  # fmt: skip
    labels = read_labels(by_pseudonym)  # needs no key
    check_against(labels, table)
    other = SiteKey.load_or_create(tmp_path / "other")
    merged = merge_labels([read_labels(unknown, key=key), read_labels(unknown, key=other)])
    assert len(merged.rows) == 6  # two sites' pseudonyms never clash


# ---- studies ------------------------------------------------------------------------------------


def test_modality_ablation_and_attribute_inference_on_known_tables(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    key = SiteKey.load_or_create(tmp_path)
    subjects = [f"p{i}" for i in range(60)]
    table = small_table(key, subjects)
    label = rng.integers(0, 2, 60)
    sex = rng.integers(0, 2, 60)
    strong = table.with_fp(np.c_[4.0 * label, 4.0 * sex, rng.normal(size=(60, 2))])
    weak = table.with_fp(
        np.c_[0.5 * label, 4.0 * sex, rng.normal(size=(60, 2))] + rng.normal(size=(60, 4))
    )
    noised = strong.with_fp(strong.fp + 20.0 * rng.normal(size=strong.fp.shape))

    def labels(task: str, values: np.ndarray) -> TaskLabels:
        by_pseudonym = {key.subject(s): float(v) for s, v in zip(subjects, values, strict=True)}
        return TaskLabels(task, "binary", "subject", by_pseudonym, ("0", "1"))

    af, sex_labels = labels("af", label), labels("sex", sex)
    rows = modality_ablation({"paired": strong, "ppg": weak}, af, n_boot=0)
    assert rows[0].relative == 1.0 and rows[1].relative < 0.95
    audit = attribute_inference({"no noise": strong, "released": noised}, utility=af,
                                attributes=[sex_labels], n_boot=0)  # fmt: skip
    by = {(r.fingerprints, r.result.task): r for r in audit}
    assert by[("no noise", "sex")].role == "attack" and by[("no noise", "sex")].result.value > 0.95
    assert by[("released", "sex")].relative < 0.8 and by[("released", "af")].relative < 0.8


# ---- CLI: bad input, one line, exit 1 -----------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    cohort = tiny_cohort(root / "cohort", sites=1, subjects=6)
    model = tiny_artifact(root / "model" / "m2ae")
    site = site_config(root / "site", cohort / "site_00", cache=root / "cache")
    out = root / "fp.parquet"
    export_fingerprints(site, model_path=model, out=out)
    return {"root": root, "fp": out, "labels": cohort / "site_00" / "labels.csv",
            "config": root / "site" / "site.toml", "model": model,
            "other_model": tiny_artifact(root / "model" / "other", seed=1)}  # fmt: skip


def bad_inputs(exported: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """Name -> (evaluate arguments, expected words of the one-line error)."""
    root, fp, labels = exported["root"], str(exported["fp"]), str(exported["labels"])
    lines = exported["labels"].read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]

    def write(name: str, table: list[dict[str, str]], columns: list[str] = header) -> str:
        text = ",".join(columns) + "\n"
        text += "".join(",".join(r[c] for c in header) + "\n" for r in table)
        (root / name).write_text(text)
        return str(root / name)

    stranger = {**rows[0], "subject": "subj_99_999", "record": "s99_999"}
    nokey = [c.replace("subject", "patient").replace("record", "rec") for c in header]
    good = pq.read_table(fp)
    pq.write_table(good.slice(0, 0), root / "empty.parquet")
    (root / "garbage.parquet").write_bytes(b"garbage")
    return {
        "unknown subject": ([fp, write("unknown.csv", [*rows, stranger]), "age"],
                            "not in the fingerprints"),
        "missing key column": ([fp, write("nokey.csv", rows, nokey), "age"], "missing key column"),
        "missing task column": ([fp, labels, "colour"], "no task column 'colour'"),
        "wrong type": ([fp, write("text.csv", [{**r, "age": "old"} if i == 0 else r
                                               for i, r in enumerate(rows)]), "age"],
                       "mixes numbers and text"),
        "single class": ([fp, write("one.csv", [{**r, "af": "1"} for r in rows]), "af"],
                         "single class"),
        "corrupt file": ([str(root / "garbage.parquet"), labels, "age"], "not a readable Parquet"),
        "empty file": ([str(root / "empty.parquet"), labels, "age"], "empty fingerprint file"),
    }  # fmt: skip


def test_cli_evaluate_bad_inputs_are_one_line(exported: dict[str, Path]) -> None:
    base = ["evaluate", "--config", str(exported["config"]), "--folds", "2", "--bootstrap", "0"]
    for name, ((fp, labels, task), needle) in bad_inputs(exported).items():
        code, err = run_cli(*base, "--fingerprints", fp, "--labels", labels, "--task", task)
        assert code == 1 and needle in err and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err
    good = ["--fingerprints", str(exported["fp"]), "--labels", str(exported["labels"]),
            "--task", "age"]  # fmt: skip
    code, err = run_cli(*base, *good, "--model", str(exported["other_model"]))
    assert code == 1 and "another model version" in err and err.count("\n") == 1
    code, err = run_cli(*base, *good, "--model", str(exported["model"]))
    assert code == 0, err
    code, err = run_cli("evaluate", *good)  # raw subject names but no site key
    assert code == 1 and "--config or --site-dir" in err


# ---- federated evaluation ---------------------------------------------------------------------


def test_federated_mae_is_the_mae_of_all_site_predictions_pooled(tmp_path: Path) -> None:
    reports, errors = [], []
    w = np.array([2.0, -1.0, 0.5, 0.0])
    for i, n in enumerate((20, 35, 50)):  # sites of different sizes: weights matter
        key = SiteKey.load_or_create(tmp_path / f"site{i}")
        subjects = [f"p{j}" for j in range(n)]
        table = small_table(key, subjects)
        y = table.fp @ w + np.random.default_rng(i).normal(size=n)
        labels = TaskLabels("hr", "regression", "subject",
                            dict(zip(table.subject, y.tolist(), strict=True)), ())  # fmt: skip
        reports.append(site_probe(table, labels, repeats=1))
        X, yy, groups = join(table, labels)
        pred = cross_validated(X.astype(float), yy, groups, kind="regression", repeats=1)[0]
        errors.append(np.abs(yy - pred))
    combined = aggregate_probes(reports)
    assert combined.value == pytest.approx(np.concatenate(errors).mean(), rel=1e-12)
    assert combined.pooled_equivalent and combined.rows == 105 and combined.sites == 3
    assert combined.value < combined.baseline
    auroc_report = reports[0].model_copy(update={"metric": "auroc", "task": "af"})
    with pytest.raises(ValueError, match="different tasks"):
        aggregate_probes([reports[0], auroc_report])
    assert not aggregate_probes([auroc_report]).pooled_equivalent
