"""Pretraining on simulated signals: the federation's starting point that costs no privacy.

The synthetic cohort (:mod:`biofp_core.synth`: ECGSYN-style ECG, pulse-transit PPG, sinus
rhythm and atrial fibrillation, respiration, artefacts; its parameters are drawn from seeds, not
fitted to any patient) is pooled and the run's own architecture trained on it without DP, by the
same :func:`simulations.run.simulate` centralized path as the pooled baseline. The weights are
cached under ``CACHE/pretrained/<digest>/`` (digest of the pretraining settings, the
architecture, the seed and the code version), and the run's ``initial-model`` names them: the
ServerApp sends them as round 1's global model (a real deployment sets ``initial-model`` to a
file the coordinator made the same way, ``docs/coordinator.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import biofp_core
from biofp_core.fsutil import exclusive_lock
from biofp_core.synth.physiology import ECTOPY_MODEL
from simulations.config import RunSummary, SimulationConfig, completed_run

PRETRAINED_DIR = "pretrained"


def pretraining_config(cfg: SimulationConfig) -> SimulationConfig:
    """The centralized, non-DP synthetic run that pretrains ``cfg``'s architecture."""
    pre = cfg.pretrain
    if pre is None:
        raise ValueError("the simulation has no [pretrain] block")
    run = cfg.run.model_copy(
        update={
            "dp": False, "num_rounds": 1, "local_steps": pre.steps, "lr": pre.lr,
            "batch_subjects": pre.batch_subjects, "holdout_fraction": 0.1,
            "initial_model": "", "probe_tasks": "", "collect_fingerprints": False,
        }
    )  # fmt: skip
    settings = {k: v for k, v in pre.model_dump().items() if k != "ectopic_per_min" or v}
    if pre.ectopic_per_min:  # weights trained on another ectopic-beat model are not these
        settings["ectopy_model"] = ECTOPY_MODEL
    key = json.dumps(
        [settings, run.model, run.model_architecture(), run.bag_size, run.seed,
         run.optimizer, biofp_core.__version__],
        sort_keys=True,
    )  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return SimulationConfig(
        dataset="synthetic", synth_sites=pre.sites, synth_subjects_per_site=pre.subjects_per_site,
        synth_minutes=pre.minutes, synth_ectopic_per_min=pre.ectopic_per_min,
        cache_dir=cfg.cache_dir, sites=1, centralized=True,
        epsilon=math.inf, out=cfg.cache_dir / PRETRAINED_DIR / digest, cpus=cfg.cpus, run=run,
    )  # fmt: skip


def pretrained_model(
    cfg: SimulationConfig,
    simulate: Callable[[SimulationConfig], RunSummary],
    on_stage: Callable[[str], None] | None = None,
) -> Path:
    """The model pretrained on synthetic signals for ``cfg`` (trained once, then cached)."""
    sub = pretraining_config(cfg)
    sub.out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(sub.out.with_suffix(".lock")):  # one writer; others wait and reuse it
        cached = completed_run(sub.out)
        if cached is not None and cached.model_path is not None:
            return cached.model_path
        if on_stage is not None:
            on_stage(
                f"pretraining on synthetic signals ({sub.run.local_steps} steps, no patient data)"
            )
        summary = simulate(sub)
    assert summary.model_path is not None  # a centralized run always saves its model
    return summary.model_path
