"""A real-browser test of the attack visualizer: JupyterLab + headless Chromium (Debian's package)
driven by Playwright's Python client (no browser download).

It starts JupyterLab on a free localhost port with a token, opens a copy of
notebooks/08_visualizer.ipynb with the smoke profile's parameters injected (papermill,
prepare only), runs all cells from the Run menu, moves the eps slider with the keyboard and checks
that the panels are redrawn (the status line names the new eps and the image changes). A
screenshot goes to figures/08_visualizer_browser.png.

Skipped (with the reason) only when /usr/bin/chromium or playwright is missing and the ``CI``
environment variable is not set; under CI a missing browser is a failure.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from safemed_lib.paths import FIGURES, PROJECT_ROOT

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOK = PROJECT_ROOT / "notebooks" / "08_visualizer.ipynb"


def _require(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the browser test must run; `make test` installs it)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_notebook(dest: Path) -> Path:
    """08_visualizer.ipynb with the smoke profile injected (as ``make test`` prepares it)."""
    import papermill

    out = dest / NOTEBOOK.name
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters={"profile": "smoke", "overrides": {}},
                               prepare_only=True, kernel_name="python3", progress_bar=False)
    return out


@pytest.fixture
def lab(tmp_path):
    _require(CHROMIUM.is_file(), f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _require(False, "the playwright Python client is not installed")
    root = tmp_path / "root"
    root.mkdir()
    _smoke_notebook(root)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SAFEMED_THREADS="1",
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"))
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # containers often run as root
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url, token
    finally:
        proc.send_signal(signal.SIGINT)  # the server shuts its kernels down, then exits
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)
        log.close()


def _dismiss_popups(page) -> None:
    """JupyterLab may ask to pick a kernel (accept the preselected one) and about news (no)."""
    time.sleep(1.0)
    dialog = page.get_by_role("dialog")
    if dialog.count() and dialog.get_by_role("button", name="Select Kernel").count():
        dialog.get_by_role("button", name="Select Kernel").click()
    news = page.get_by_role("alert").filter(has_text="Jupyter news")
    if news.count():
        news.get_by_role("button", name="No").click()


def test_visualizer_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    url, token = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
            expect(page.get_by_role("button", name="Python 3 (ipykernel) | Idle")).to_be_visible(timeout=60_000)
            _dismiss_popups(page)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            status = page.locator(".safemed-attack-app code.safemed-status")
            # the first panel waits for the kernel to build the smoke models (base, SFT) when none are
            # cached: minutes on a loaded 2-core machine (120 s timed out with other runs beside it)
            expect(status).to_contain_text("eps=8/255", timeout=600_000)
            image = page.locator(".safemed-attack-app img.safemed-image")
            expect(image).to_have_attribute("src", __import__("re").compile("^(blob:|data:)"))
            before = image.get_attribute("src")

            handle = page.locator(".safemed-attack-app .safemed-eps .noUi-handle")
            handle.focus()
            handle.press("ArrowLeft")  # 8/255 -> 4/255
            expect(status).to_contain_text("eps=4/255", timeout=60_000)
            expect(image).not_to_have_attribute("src", before, timeout=30_000)

            page.locator(".safemed-attack-app").scroll_into_view_if_needed()
            FIGURES.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(FIGURES / "08_visualizer_browser.png"))
        except Exception:
            page.screenshot(path=str(Path(os.environ.get("TMPDIR", "/tmp")) / "08_visualizer_browser_failure.png"))
            raise
        finally:
            browser.close()
