"""The coordinator dashboard in a real headless Chromium (Debian's ``chromium``, driven by
Playwright): live while a real ``biofp simulate --dashboard`` runs, then ``biofp dashboard`` over
a folder of runs, one of them with a corrupt ``metrics.json``.

Sizes: 3 sites x 3 one-minute subjects, a 3k-parameter SiamQuality, 2 local steps, 6 rounds;
one site starts over its ε budget, so it refuses every round. The screenshots in docs/ are
taken here: ``BIOFP_SCREENSHOT_DIR=docs make test`` refreshes them (by default they go to a
temporary folder, so a test run never changes the repository).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fpkit import BIOFP
from playwright.sync_api import Browser, Page, expect, sync_playwright

from biofp_core.privacy.ledger import PrivacyLedger, initialise_site_state

CHROMIUM = "/usr/bin/chromium"
TINY_MODEL = json.dumps(
    {"stem_channels": 8, "stage_channels": [8, 8], "groups": 4, "proj_dim": 16,
     "pred_hidden": 8, "fingerprint_dim": 8}
)  # fmt: skip
SIM_TOML = f"""
sites = 3
synth_sites = 3
synth_subjects_per_site = 3
synth_minutes = 1.0
cache_dir = "cache"
sites_dir = "sites"
out = "runs/live"
report = false
site_privacy = {{ min_train_subjects = 1 }}  # tiny emulated sites loosen the default

[run]
model = "siamquality"
model-options = '{TINY_MODEL}'
num-rounds = 6
local-steps = 2
batch-subjects = 2
bag-size = 2
noise-multiplier = 3.0
wait-timeout-s = 30.0
round-timeout-s = 300.0
"""
ROUNDS = 6
EPSILON = re.compile(r"^\d+(\.\d+)?$")
# what the page shows after each of its renders, recorded in the page (no reload in between)
RECORD_RENDERS = """
window.__renders = [];
new MutationObserver(() => {
  const eps = {};
  for (const row of document.querySelectorAll("#epsilon tbody tr")) {
    eps[row.dataset.site] = row.querySelector("td.eps").textContent;
  }
  window.__renders.push({
    counter: document.querySelector("#round-progress").textContent,
    columns: document.querySelectorAll("#grid thead th").length - 1,
    statuses: [...document.querySelectorAll("#grid tbody td")].map((td) => td.dataset.status),
    eps,
  });
}).observe(document, { attributes: true, subtree: true, attributeFilter: ["data-renders"] });
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw_get(port: int, path: str, host: str | None = None) -> tuple[int, bytes]:
    """GET `path` exactly as written (no client-side normalisation of ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}: {proc.stdout.read()}"  # type: ignore[union-attr]
        try:
            if get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not served within {timeout_s} s")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "install Debian's chromium (apt-get install chromium)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: $BIOFP_SCREENSHOT_DIR (e.g. docs), else a temporary folder."""
    folder = os.environ.get("BIOFP_SCREENSHOT_DIR")
    return Path(folder) if folder else tmp_path_factory.mktemp("shots")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sim.toml, and site_01 already over its ε budget (8) from an earlier study."""
    root = tmp_path_factory.mktemp("dash")
    (root / "sim.toml").write_text(SIM_TOML)
    initialise_site_state(root / "sites" / "site_01" / "state", name="site_01")
    spent = PrivacyLedger.at(root / "sites" / "site_01" / "state")
    spent.charge(run_id="earlier-study", server_round=1, noise_multiplier=0.8, sample_rate=1.0,
                 steps=40, delta=1e-5)  # fmt: skip
    assert spent.epsilon(delta=1e-5) > 8.0
    return root


def grid_columns(page: Page) -> int:
    return page.locator("#grid thead th").count() - 1


def ok_site_epsilon(page: Page) -> tuple[str, float]:
    """(name, ε shown) of the first site whose latest grid cell is ok."""
    for row in page.locator("#epsilon tbody tr").all():
        name = row.get_attribute("data-site") or ""
        last = page.locator(f'#grid tbody tr[data-site="{name}"] td').last
        if last.get_attribute("data-status") == "ok":
            return name, float(row.locator("td.eps").inner_text())
    raise AssertionError("no contributing site on the page")


@pytest.fixture(scope="module")
def live_run(workdir: Path, browser: Browser, shots: Path) -> Path:
    """Watch a real `biofp simulate --dashboard` from its first round to its end, in Chromium."""
    port = free_port()
    # started with SIGINT blocked, as some parents (CI runners) start it: Ctrl-C must still stop it
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        proc = subprocess.Popen(
            [*BIOFP, "simulate", "--config", "sim.toml", "--dashboard", "--dashboard-port",
             str(port)],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/api/runs/live", proc)
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.add_init_script(RECORD_RENDERS)
        page.goto(f"{base}/runs/live")
        page.evaluate("window.__sameDocument = true")
        counter = page.locator("#round-progress")
        expect(counter).to_have_text(re.compile(rf"Round [0-{ROUNDS - 1}] of {ROUNDS}"))
        expect(page.locator("#run-status")).to_have_text("completed", timeout=150_000)
        expect(counter).to_have_text(f"Round {ROUNDS} of {ROUNDS}")
        assert page.evaluate("window.__sameDocument") is True  # updated in place, no reload
        renders = page.evaluate("window.__renders")
        assert grid_columns(page) == ROUNDS
        # the page showed rounds as they finished: the counter, the grid and a site's ε moved on
        shown = [(int(r["counter"].split()[1]), r) for r in renders if r["counter"][0] == "R"]
        rounds = [n for n, _ in shown]
        assert rounds == sorted(rounds) and rounds[-1] == ROUNDS
        middle = [r for n, r in shown if 0 < n < ROUNDS]
        assert middle, f"no round between the first and the last was shown: {rounds}"
        assert all(r["columns"] == int(r["counter"].split()[1]) for r in middle)
        name, eps_end = ok_site_epsilon(page)
        eps_mid = float(middle[0]["eps"][name])
        assert eps_end > eps_mid > 0  # the site's ε grew as its rounds were charged
        assert "refused" in middle[0]["statuses"]
        cells = page.locator("#grid tbody td")
        assert cells.count() == 3 * ROUNDS
        refused = page.locator('#grid td[data-status="refused"]')
        assert refused.count() == ROUNDS  # site_01, every round
        assert "budget" in (refused.first.get_attribute("title") or "")
        refused.first.click()
        expect(page.locator("#cell-detail")).to_contain_text("refused")
        assert page.locator('#grid td[data-status="ok"]').count() == 2 * ROUNDS
        page.locator("#grid").scroll_into_view_if_needed()
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "dashboard-run.png"))
        context.close()
        assert not errors, f"script errors on the page: {errors}"
        assert stop(proc) == 0, proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
    return workdir / "runs"


@pytest.fixture(scope="module")
def dashboard(live_run: Path) -> Iterator[tuple[str, Path]]:
    """`biofp dashboard --runs runs/`: the finished live run and one with a corrupt metrics.json."""
    broken = live_run / "broken"
    broken.mkdir()
    shutil.copy(live_run / "live" / "config.json", broken / "config.json")
    whole = (live_run / "live" / "metrics.json").read_text()
    (broken / "metrics.json").write_text(whole[: len(whole) // 2])  # half-written
    port = free_port()
    proc = subprocess.Popen(
        [*BIOFP, "dashboard", "--runs", str(live_run), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/api/runs", proc, timeout_s=30)
        yield base, live_run
    finally:
        stop(proc)


def test_runs_page_lists_every_run_with_status_and_progress(
    dashboard: tuple[str, Path], page: Page, shots: Path
) -> None:
    base, _ = dashboard
    page.goto(base + "/")
    live = page.locator('#runs tr[data-run="live"]')
    expect(live.locator(".status")).to_have_text("completed")
    expect(live.locator("td.rounds")).to_have_text(f"{ROUNDS} / {ROUNDS}")
    expect(live).to_contain_text("fedavg")
    expect(live).to_contain_text("siamquality")
    expect(page.locator('#runs tr[data-run="broken"] .status')).to_have_text("updating")
    page.screenshot(path=str(shots / "dashboard-runs.png"))
    live.locator("a").click()
    expect(page).to_have_url(base + "/runs/live")
    expect(page.locator("#round-progress")).to_have_text(f"Round {ROUNDS} of {ROUNDS}")


def test_sites_page_counts_refusals_across_runs(
    dashboard: tuple[str, Path], page: Page, shots: Path
) -> None:
    base, _ = dashboard
    page.goto(base + "/sites")
    rows = page.locator("#sites tbody tr")
    expect(rows).to_have_count(3)
    refusals = sorted(int(t) for t in page.locator("#sites td.refusals").all_inner_texts())
    assert refusals == [0, 0, ROUNDS]
    eps = page.locator("#sites td.eps").all_inner_texts()
    assert all(EPSILON.match(e) and float(e) > 0 for e in eps), eps
    page.screenshot(path=str(shots / "dashboard-sites.png"))


def test_a_corrupt_metrics_file_shows_updating_then_recovers(
    dashboard: tuple[str, Path], page: Page
) -> None:
    base, runs = dashboard
    status, body = get(f"{base}/api/runs/broken")
    assert status == 200 and json.loads(body)["status"] == "updating"
    page.goto(base + "/runs/broken")
    expect(page.locator("#run-status")).to_have_text("updating")
    expect(page.locator("#updating")).to_be_visible()
    # the writer finishes the file: the open page shows the run, without reload
    tmp = runs / "broken" / "metrics.json.tmp"
    tmp.write_text((runs / "live" / "metrics.json").read_text())
    os.replace(tmp, runs / "broken" / "metrics.json")
    expect(page.locator("#round-progress")).to_have_text(f"Round {ROUNDS} of {ROUNDS}")
    expect(page.locator("#updating")).to_be_hidden()
    (runs / "broken" / "metrics.json").write_text('{"status": "runn')
    expect(page.locator("#run-status")).to_have_text("updating")


def test_paths_cannot_escape_the_run_folder_nor_other_hosts_reach_it(
    dashboard: tuple[str, Path],
) -> None:
    base, _ = dashboard
    port = int(base.rsplit(":", 1)[1])
    for path in (
        "/runs/../../etc/passwd",
        "/static/../runs.py",
        "/static/%2e%2e/runs.py",
        "/runs/live/figures/..%2fmetrics.json",
        "/api/runs/..%2f..%2fetc",
        "/runs/live/figures/../../sites/site_01/state/ledger.json",
    ):
        status, body = raw_get(port, path)
        assert status == 400, (path, status)
        assert b"run_key" not in body and b"def " not in body
    for path in ("/api/runs/sites", "/runs/live/figures/site.toml", "/runs/nope"):
        assert raw_get(port, path)[0] == 404, path
    assert get(f"{base}/static/vendor/uPlot.iife.min.js")[0] == 200  # served from the package
    assert raw_get(port, "/api/runs")[0] == 200
    # a web page that rebinds its own name to 127.0.0.1 still sends its name: refused
    assert raw_get(port, "/api/runs", host=f"attacker.example:{port}")[0] == 400
    assert raw_get(port, "/api/runs", host=f"localhost:{port}")[0] == 200


def test_a_non_loopback_bind_needs_a_token(tmp_path: Path) -> None:
    refused = subprocess.run(
        [*BIOFP, "dashboard", "--runs", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a token" in lines[0] and "0.0.0.0" in lines[0]
    # with one: every request must carry it
    port = free_port()
    proc = subprocess.Popen(
        [*BIOFP, "dashboard", "--runs", str(tmp_path), "--host", "0.0.0.0", "--port", str(port),
         "--new-token"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"\?token=(\S+)", line)
        assert match, line
        token = match.group(1)
        url = f"http://127.0.0.1:{port}/api/runs"
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _ = get(url)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert status == 401
        assert get(url, {"Authorization": "Bearer wrong"})[0] == 401
        assert get(url, {"Authorization": f"Bearer {token}"})[0] == 200
        assert get(f"{url}?token={token}")[0] == 200
    finally:
        stop(proc)


def test_a_finished_run_shows_its_report_with_figures_and_no_raw_html(
    dashboard: tuple[str, Path], page: Page
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, runs = dashboard
    reported = runs / "reported"
    shutil.copytree(runs / "live", reported, ignore=shutil.ignore_patterns("sites"))
    (reported / "report").mkdir()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3.0, 2.0, 1.5])
    fig.savefig(reported / "report" / "loss.png")
    plt.close(fig)
    (reported / "report.md").write_text(
        "# Research report\n\n| round | loss |\n|---|---|\n| 1 | 3.0 |\n\n"
        "![loss](report/loss.png)\n\n<script>window.__injected = 1</script>\n"
    )
    page.goto(base + "/runs/reported")
    expect(page.locator("#report h1")).to_have_text("Research report")
    expect(page.locator("#report table td").first).to_have_text("1")
    report_img = page.locator('#report img[alt="loss"]')
    expect(report_img).to_have_attribute("src", "/runs/reported/figures/loss.png")
    expect(page.locator("#figures figcaption")).to_have_text("loss.png")
    report_img.scroll_into_view_if_needed()  # the figures gallery's copy loads lazily
    page.wait_for_function("() => document.querySelector('#report img').complete")
    assert report_img.evaluate("(img) => img.naturalWidth") > 0  # served from report/
    assert page.evaluate("window.__injected") is None  # raw HTML shown as text, never run
    expect(page.locator("#report")).to_contain_text("<script>")


def test_statuses_and_a_grown_schema_read_back(dashboard: tuple[str, Path]) -> None:
    base, runs = dashboard
    report = json.loads((runs / "live" / "metrics.json").read_text())
    for rnd in report["rounds"]:  # fields a newer server may add: kept, and used where known
        for i, site in enumerate(rnd["sites"]):
            site["site"] = f"hospital-{i}"
            site["epsilon_budget"] = 9.5
        rnd["new_round_field"] = {"x": 1}
    report["status"] = "failed"
    report["error"] = "round 6: no site contributed an update"
    for name, checkpoints in (("crashed", True), ("dead", False)):
        run = runs / name
        run.mkdir()
        shutil.copy(runs / "live" / "config.json", run / "config.json")
        (run / "metrics.json").write_text(json.dumps(report))
        if checkpoints:
            shutil.copytree(runs / "live" / "checkpoints", run / "checkpoints")
    statuses = {r["id"]: r["status"] for r in json.loads(get(f"{base}/api/runs")[1])["runs"]}
    assert statuses["crashed"] == "resumable" and statuses["dead"] == "failed"
    assert statuses["live"] == "completed"
    detail = json.loads(get(f"{base}/api/runs/crashed")[1])
    assert detail["site_names"] == ["hospital-0", "hospital-1", "hospital-2"]
    assert set(detail["budgets"].values()) == {9.5}
    assert detail["error"] == report["error"]
    assert detail["model_bytes"] > 0


def test_server_start_serves_the_dashboard_of_its_workdir(live_run: Path, tmp_path: Path) -> None:
    from localfed import kill_tree

    server = tmp_path / "server"
    shutil.copytree(
        live_run / "live", server / "runs" / "pretrain", ignore=shutil.ignore_patterns("sites")
    )
    link_port, port = free_port(), free_port()
    (server / "server.toml").write_text(
        f'[superlink]\nhost = "127.0.0.1"\nport = {link_port}\npublic_name = "localhost"\n'
        'state_dir = "state"\nworkdir = "runs"\n'
    )
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.Popen(
        [*BIOFP, "server", "start", "--config", str(server / "server.toml"), "--insecure",
         "--dashboard", "--dashboard-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/api/runs", proc, timeout_s=60)
        runs = json.loads(get(f"http://127.0.0.1:{port}/api/runs")[1])["runs"]
        assert [(r["id"], r["status"], r["rounds_done"]) for r in runs] == [
            ("pretrain", "completed", ROUNDS)
        ]
    finally:
        kill_tree(proc)
