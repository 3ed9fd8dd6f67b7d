"""The layers point one way: a walk over every module's imports (module level and inside
functions) and a ClientApp process that answers a real message without loading a strategy."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> its layer: an import may point to its own layer's allowed packages or any lower layer
LAYER = {"biofp_core": 0, "client": 1, "server": 1, "strategies": 1, "simulations": 2,
         "biofp_cli": 3}  # fmt: skip
SAME_LAYER_ALLOWED = {("server", "strategies")}  # the server chooses the strategy, nothing else
NEVER = {"biofp_core": {"flwr"}}  # the core never imports Flower


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the file, at any depth."""
    found = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, base[0]))
            elif node.module:
                found.append((node.lineno, node.module.split(".")[0]))
    return found


def edge_violation(source: str, target: str) -> str | None:
    """Why `source` may not import `target`, or None."""
    if target in NEVER.get(source, set()):
        return f"{source} never imports {target}"
    if target not in LAYER or target == source:
        return None
    if LAYER[target] > LAYER[source]:
        return f"{source} (layer {LAYER[source]}) imports {target} (layer {LAYER[target]}): up"
    if LAYER[target] == LAYER[source] and (source, target) not in SAME_LAYER_ALLOWED:
        return f"{source} imports {target}: same layer, not allowed"
    return None


def violations() -> list[str]:
    found = []
    for package in LAYER:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, target in imported_packages(path):
                why = edge_violation(package, target)
                if why:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {why}")
    return found


def test_no_import_points_up_the_layers_or_across_client_server() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [("biofp_core", "simulations", False), ("biofp_core", "flwr", False),
     ("client", "server", False), ("client", "strategies", False),
     ("strategies", "server", False), ("server", "strategies", True),
     ("simulations", "client", True), ("biofp_cli", "simulations", True),
     ("simulations", "biofp_cli", False), ("client", "biofp_core", True)],
)  # fmt: skip
def test_the_rule_itself(source: str, target: str, allowed: bool) -> None:
    assert (edge_violation(source, target) is None) is allowed


def test_an_import_inside_a_function_is_seen(tmp_path: Path) -> None:
    module = ROOT / "biofp_core" / "_layers_probe_tmp.py"
    module.write_text("def f():\n    from simulations.run import simulate\n    return simulate\n")
    try:
        assert any("_layers_probe_tmp.py:2" in v for v in violations())
    finally:
        module.unlink()


CLIENT_PROCESS = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from fpkit import TINY, site_config, tiny_cohort
from flowerkit import instruction, site_context
from biofp_core.protocol import METRICS_KEY, RUN_KEY, SERVER_ROUND, TRAIN_LOSS, RunConfig
from client.app import app

root = Path({tmp!r})
cohort = tiny_cohort(root / "cohort", sites=1, subjects=4)
data = next(p for p in cohort.iterdir() if p.is_dir())
site_config(root / "site", data, cache=root / "cache")
run = RunConfig.from_run_config({{"model-options": json.dumps(TINY), "local-steps": 1,
                                 "bag-size": 2, "batch-subjects": 2, "noise-multiplier": 1.0}})
reply = app(instruction(run, "train", **{{SERVER_ROUND: 1, RUN_KEY: "layers"}}),
            site_context(run, root / "site" / "site.toml"))
assert not reply.has_error(), reply.error
print(json.dumps({{"train-loss": TRAIN_LOSS in reply.content[METRICS_KEY],
                  "loaded": sorted(m for m in sys.modules
                                   if m.startswith(("flwr.serverapp", "strategies", "server")))}}))
"""


def loaded_by_bare_flower() -> list[str]:
    """What ``import flwr`` alone loads of the server side (Flower 1.41 imports its ServerApp
    package, strategies included, from ``flwr/__init__``: every Flower process has those)."""
    code = "import json, sys, flwr; print(json.dumps(sorted(m for m in sys.modules "
    code += "if m.startswith('flwr.serverapp'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_client_app_process_trains_without_loading_any_strategy(tmp_path: Path) -> None:
    code = CLIENT_PROCESS.format(tests=str(ROOT / "tests"), tmp=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["train-loss"] is True  # it really trained and answered
    biofp_server_side = [m for m in result["loaded"] if m.split(".")[0] in {"server", "strategies"}]
    assert biofp_server_side == []  # no BioFP strategy, registry or server module
    flower_server_side = [m for m in result["loaded"] if m.startswith("flwr.serverapp")]
    assert flower_server_side == loaded_by_bare_flower()  # nothing beyond what flwr itself loads
