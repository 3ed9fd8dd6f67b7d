"""Helpers shared by the tests: the CLI (as a command and in this process), a tiny model, a tiny
cohort, sites."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from biofp_core.artifacts import save_model
from biofp_core.models.base import BioFPModel
from biofp_core.models.m2ae import M2AE, M2AEConfig
from biofp_core.privacy import DPConfig, PrivateTraining
from biofp_core.privacy.ledger import initialise_site_state
from biofp_core.site import SiteConfig, load_site_config
from biofp_core.synth import write_cohort

BIOFP = [sys.executable, "-m", "biofp_cli"]  # the `biofp` command of this interpreter
TINY = {"width": 32, "heads": 2, "decoder_width": 16, "modality_depth": 1, "fusion_depth": 1,
        "fingerprint_dim": 16}  # fmt: skip


def assert_per_sample_grads_are_per_subject(model: BioFPModel, data: list[dict]) -> PrivateTraining:
    """Under DP-SGD (one step over the bags `data`, one per subject), Opacus' per-sample gradient
    of subject b equals the gradient of subject b's loss alone, computed on an untouched copy.
    Returns the (open) private training after its backward pass."""
    import copy

    from biofp_core.training import collate_bags

    reference = copy.deepcopy(model)
    private = PrivateTraining(
        model, torch.optim.SGD(model.parameters(), lr=0.1), data, dp=DPConfig(seed=0),
        sample_rate=1.0, steps=1, collate_fn=collate_bags,
    )  # fmt: skip
    batch = collate_bags(data)
    torch.manual_seed(5)
    private.backward(model.loss(batch)[0])
    torch.manual_seed(5)
    loss, _ = reference.loss(batch)
    params = dict(reference.named_parameters())
    for b in range(len(data)):
        grads = torch.autograd.grad(loss[b], list(params.values()), retain_graph=True)
        for (name, p), g in zip(model.named_parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad_sample[b], g, atol=1e-5, rtol=1e-4, msg=name)
    return private


def tiny_artifact(path: Path, seed: int = 0) -> Path:
    """An untrained tiny M2AE saved as an artifact; returns the weights path."""
    torch.manual_seed(seed)
    return save_model(M2AE(M2AEConfig(**TINY)), path)


def tiny_cohort(out: Path, *, sites: int = 2, subjects: int = 4, seed: int = 3) -> Path:
    """`sites` hospitals x `subjects` subjects x 1 minute (6 windows each)."""
    write_cohort(out, sites=sites, subjects_per_site=subjects, minutes=1.0, seed=seed)
    return out


# tiny cohorts need looser site limits than the safe defaults (explicitly loosened, as a site would)
TINY_LIMITS = "min_train_subjects = 1\n"


# the synthetic cohort's label columns, declared as a site declares the tasks it lets be probed
SYNTH_TASKS = (
    'af = "binary"\nhypertension = "binary"\nage = "regression"\nsbp_mmhg = "regression"\n'
    'mean_hr_bpm = "regression"\nresp_rate_bpm = "regression"\n'
    'sex = { kind = "binary", classes = ["F", "M"] }\n'
)


def site_config(
    root: Path, data_dir: Path, *, name: str = "north", cache: Path, budget: float = 8.0,
    release: str = "", privacy: str = TINY_LIMITS, init: bool = True, tasks: str = SYNTH_TASKS,
) -> SiteConfig:  # fmt: skip
    """A site.toml under `root` for the records in `data_dir` (its labels.csv maps subjects),
    its state folder initialised (unless `init` is False)."""
    root.mkdir(parents=True, exist_ok=True)
    text = (
        f'name = "{name}"\ndata_dir = "{data_dir}"\ncache_dir = "{cache}"\n'
        f'state_dir = "{root / "state"}"\nlabels_csv = "{data_dir / "labels.csv"}"\n'
        f"[privacy]\nepsilon = {budget}\n{privacy}[tasks]\n{tasks}[release]\n{release}\n"
    )
    (root / "site.toml").write_text(text)
    site = load_site_config(root / "site.toml")
    if init:
        initialise_site_state(site.resolved_state_dir(), name=name)
    return site


def run_biofp(*args: str) -> tuple[int, str, str]:
    """Run `biofp ARGS` in this process like the console script; (exit code, stdout, stderr)."""
    import contextlib
    import io
    import sys

    from biofp_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["biofp", *args]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def run_cli(*args: str) -> tuple[int, str]:
    """Run `biofp ARGS` in this process like the console script; (exit code, stderr text)."""
    code, _, err = run_biofp(*args)
    return code, err


def run_cli_out(*args: str) -> tuple[int, str]:
    """Run `biofp ARGS` in this process; (exit code, stdout text)."""
    code, out, _ = run_biofp(*args)
    return code, out
