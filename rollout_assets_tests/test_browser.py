"""What people look at, in a real browser: the Dagster UI over a demo home, and the dashboard page.

One small home is built the way a user would: `rollout simulate` two hours of A-2 traffic with a
restore-success breach, `rollout flags promote` to A-2, `rollout run` over the range (the window
job renders the dashboard; the breach sensor's rollback job re-renders it). Then:

1. `rollout ui --port <free>` (dagster dev on 127.0.0.1 over the home's instance): the asset
   graph lists the pipeline assets, and the `slo_scores` checks page shows passed and failed
   evaluations. It is stopped like a user does (Ctrl-C = SIGINT to its process group) and must
   leave no process behind.
2. `reports/dashboard/index.html` from disk: four panels with drawn charts, threshold lines,
   breach and rollback markers, no console error and no network request.

Debian's chromium (`/usr/bin/chromium`, installed by .ci/run) is driven by playwright; no
browser is downloaded. Screenshots go to rollout_assets_tests/.artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from rollout_assets.home import RolloutHome
from rollout_assets.warehouse import connect

CHROMIUM = Path(os.environ.get("ROLLOUT_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).parent / ".artifacts"
ROLLOUT = Path(sys.executable).with_name("rollout")
START, END = "2025-01-18T09:00Z", "2025-01-18T11:00Z"
PIPELINE = ("canary_events", "window_metrics", "slo_scores", "window_verdicts", "alert_reports",
            "dashboard")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _need_browser():
    """Locally a missing chromium skips; in CI (.ci/run installs it) it is a failure."""
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} not installed (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "ROLLOUT_"))}
    env.update(ROLLOUT_HOME=str(home), DAGSTER_HOME=str(home / ".dagster"))
    return env


def _rollout(home: Path, *args: str, timeout: float = 240) -> str:
    proc = subprocess.run([str(ROLLOUT), "--home", str(home), *args], env=_env(home),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"rollout {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("browser") / "home"
    home.mkdir()
    _rollout(home, "simulate", "--start", START, "--hours", "2", "--phase", "A-2",
             "--simulate-breach", "restore_success_rate", "--breach-phase", "A-2",
             "--rate", "40", "--seed", "7")
    for phase in ("A-1", "A-2"):
        _rollout(home, "flags", "promote", "--phase", phase, "--force",
                 "--reason", "browser test: A-2 traffic")
    out = _rollout(home, "run", "--from", START, "--to", END)
    assert "breaches: 0" not in out, out
    return home


@pytest.fixture(scope="module")
def browser() -> Iterator:
    _need_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    profile = ARTIFACTS / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)  # a fresh user-data-dir every session
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield ctx
        finally:
            ctx.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def ui(demo_home: Path, browser) -> Iterator[str]:
    """`rollout ui` on a free port; stopped by SIGINT to its process alone (`kill -INT`; a
    terminal's Ctrl-C reaches the whole group), never leaked: `dagster dev` must stop the
    webserver and daemon it started itself."""
    port = _free_port()
    log = open(ARTIFACTS / "rollout-ui.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(ROLLOUT), "--home", str(demo_home), "ui", "--port", str(port)],
        env=_env(demo_home), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: dagster dev, webserver, daemon, gRPC
        # as from a terminal: a shell starts background jobs (`cmd &`, how CI may run this
        # suite) with SIGINT ignored, and the ignored disposition would pass on to dagster dev
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, (ARTIFACTS / "rollout-ui.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "dagster dev did not answer in 150 s"
            time.sleep(0.5)
        yield base
    finally:
        os.kill(proc.pid, signal.SIGINT)
        clean = True
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            clean = False
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.3)
        if _group_alive(proc.pid):
            clean = False
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        assert clean, "rollout ui left processes behind after SIGINT; killed its group"


def _dismiss_dialogs(page, wait_ms: int = 0) -> None:
    """Dagster's first-visit "join the community" dialog opens over the page a moment after it
    loads (once per browser profile); wait for it up to `wait_ms` and skip it."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.first.wait_for(state="visible", timeout=max(wait_ms, 1))
    except Exception:
        return
    skip.first.click()
    skip.first.wait_for(state="hidden", timeout=10_000)


def _click(page, locator, timeout: float = 60.0) -> None:
    """Click, dismissing the dialog Dagster may open over the page a moment after it loads."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            locator.click(timeout=3000)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            _dismiss_dialogs(page)


def _warehouse_counts(home: Path) -> dict:
    con = connect(RolloutHome(home).db_path, read_only=True)
    try:
        return dict(zip(("breaches", "required", "rollbacks", "runs", "restore_failed",
                         "breach_windows"),
                        con.execute(
            "select (select count(*) from window_verdicts where breach), "
            "(select count(*) from window_verdicts where rollback_required), "
            "(select count(*) from rollbacks), "
            "(select count(*) from rollbacks where status <> 'skipped'), "
            "(select count(*) from slo_scores where metric = 'restore_success_rate' "
            " and passed = false and not shadow), "
            "(select count(distinct window_start) from window_verdicts where breach)"
        ).fetchone(), strict=True))
    finally:
        con.close()


def test_dashboard_materialized_by_window_run_and_rollback_job(demo_home: Path):
    """The window job renders the page; each rollback_job run re-renders it and records it."""
    with dg.DagsterInstance.from_config(str(demo_home / ".dagster")) as instance:
        records = instance.fetch_materializations(dg.AssetKey("dashboard"), limit=100).records
        jobs = {instance.get_run_by_id(r.run_id).job_name for r in records}
    assert {"rollout_window_job", "rollback_job"} <= jobs
    counts = _warehouse_counts(demo_home)
    assert len(records) >= 1 + counts["rollbacks"]
    latest = records[0].asset_materialization.metadata
    assert latest["breaches"].value == counts["breaches"] > 0
    assert latest["rollbacks"].value == counts["runs"] >= 1
    assert latest["relative_path"].value == "reports/dashboard/index.html"


def test_dashboard_renders_four_panels_offline(demo_home: Path, browser):
    html = RolloutHome(demo_home).root / "reports" / "dashboard" / "index.html"
    assert html.is_file()
    counts = _warehouse_counts(demo_home)
    page = browser.new_page()
    console: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in (
        "error", "warning") else None)
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html.as_uri())
    page.wait_for_selector("body[data-charts-drawn]")
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    assert console == []
    assert [u for u in requests if not u.startswith("file://")] == []
    panels = page.locator("section.panel[data-panel]")
    assert panels.count() == 4
    assert [panels.nth(i).get_attribute("data-panel") for i in range(4)] == [
        "autosave", "restore", "merge", "sla"]
    for i in range(4):
        svgs = panels.nth(i).locator("svg[data-chart-id]")
        assert svgs.count() >= 1
        for j in range(svgs.count()):
            svg = svgs.nth(j)
            assert int(svg.get_attribute("data-points")) > 0, svg.get_attribute("data-chart-id")
            assert svg.locator("path.line, rect.bar").count() >= 1
            assert svg.locator(".bands rect").count() >= 1  # phase band
    restore = page.locator('svg[data-chart-id="restore_success"]')
    # the A-2 restore rule from governance/policy.yaml, the failed windows, the rollback
    assert restore.locator("line.threshold").count() >= 1
    # a circle on each failed restore_success_rate evaluation, a line on each breached window
    assert restore.locator("circle.breach-marker").count() == counts["restore_failed"] > 0
    assert restore.locator("line.breach-line").count() == counts["breach_windows"]
    assert restore.locator("path.rollback-marker").count() == counts["runs"] >= 1
    assert restore.locator("rect.rollback-required").count() == counts["required"]
    assert page.locator("body").get_attribute("data-charts-drawn") == "5"
    assert page.locator("#breaches tbody tr").count() == counts["breaches"]
    assert page.locator("#rollbacks tbody tr").count() == counts["rollbacks"]
    signoff = page.locator("#signoff")
    assert signoff.locator(".pill.fail").count() >= 1  # A-2 restore_success failed
    page.close()


def test_ui_asset_graph_lists_the_pipeline(ui: str, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{ui}/assets/dashboard?view=lineage&lineageScope=upstream&lineageDepth=6")
    for name in PIPELINE:
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    _dismiss_dialogs(page, wait_ms=5000)
    page.screenshot(path=str(ARTIFACTS / "ui-asset-graph.png"))
    for name in PIPELINE:
        assert page.get_by_text(name, exact=True).count() >= 1, name
    assert not errors, errors
    page.close()


def test_ui_check_history_shows_passed_and_failed(ui: str, browser):
    page = browser.new_page()
    page.goto(f"{ui}/assets/slo_scores?view=checks&checkDetail=a2_restore_success")
    _click(page, page.get_by_text("Execution history").first)
    table = page.locator("table").last
    table.get_by_text("Failed", exact=True).first.wait_for(timeout=30_000)
    table.get_by_text("Passed", exact=True).first.wait_for(timeout=30_000)
    _dismiss_dialogs(page)
    page.screenshot(path=str(ARTIFACTS / "ui-slo-checks.png"))
    text = table.inner_text()
    # each evaluation names its window and the value against the policy's threshold
    assert "restore_success_rate = " in text and "required >= 0.995" in text
    assert "2025-01-18-10:" in text
    page.close()
