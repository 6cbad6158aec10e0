"""End to end: ``python apps/compare.py --demo`` on 127.0.0.1, driven by headless Chromium through Playwright.

Needs Debian's ``chromium`` at /usr/bin/chromium (``.ci/run`` installs it); skipped, saying so, without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is not installed (apt-get install -y chromium)"
)
ROOT = Path(__file__).resolve().parents[1]
COLUMNS = 3  # base, the demo adapter, perft_e


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer on {url} within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The CLI in --demo mode on a demo dir laid out as ``train --demo`` writes it, plus a second adapter."""
    from test_app import free_port
    from test_chat import make_adapter_dirs

    root = tmp_path_factory.mktemp("browser")
    _, dirs = make_adapter_dirs(str(root))
    shutil.move(dirs["perft"], root / "adapter")  # <demo-dir>/base and <demo-dir>/adapter
    port = free_port()
    log = root / "app.log"
    command = [
        sys.executable, str(ROOT / "apps" / "compare.py"), "--demo", "--demo-dir", str(root), "--port", str(port),
        "--adapter", f"perft_e={dirs['perft_e']}", "--adapter", f"broken={root / 'nowhere'}",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_server(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def test_browser_send_shows_every_column_and_the_heat_map(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(app_url)
            assert "broken" in page.locator("#load-errors").inner_text(timeout=30_000)
            page.locator("#prompt textarea").fill("Is the following text written in capital letters?")
            page.locator("#context textarea").fill("LOUD WORDS HERE")
            page.locator("#send").click()
            page.wait_for_function(
                f"""() => [...Array({COLUMNS}).keys()].every(k => {{
                    const t = document.querySelector('#stats-' + k)?.innerText || '';
                    return t.includes('tokens/s') && !t.includes('…'); }})""",
                timeout=90_000,
            )
            for k, name in enumerate(["base", "demo", "perft_e"]):
                stats = page.locator(f"#stats-{k}").inner_text()
                assert stats.startswith(name) and int(stats.split("· ")[1].split()[0]) > 0, stats
                user = page.locator(f"#chat-{k} .user-row")
                assert user.count() == 1 and "LOUD WORDS HERE" in user.first.text_content()
                bot = page.locator(f"#chat-{k} .bot-row")
                assert bot.count() == 1 and bot.first.text_content().strip(), f"column {k} shows no reply"
            cells = page.locator("#routing-heatmap .rt-cell")
            cells.first.wait_for(timeout=30_000)
            assert cells.count() >= 2 * 2 * 1  # 2 layers x (PEFT, base) rows x at least one token
            assert "L0 PEFT" in page.locator("#routing-heatmap").inner_text()
            page.locator("#stop").click()  # nothing running: the app answers and stays up
            page.screenshot(path=str(tmp_path / "compare-app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "compare-app.png").stat().st_size > 10_000
