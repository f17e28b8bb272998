"""The experiment report in a real headless browser (Debian's chromium): the page loads without
console errors, every figure decodes (naturalWidth > 0), a screenshot is saved.

Chromium is looked up on PATH (chromium, chromium-browser, google-chrome). When it is missing,
the test installs Debian's ``chromium`` with apt-get only if ``MEDSCALPEL_INSTALL_BROWSER=1``
(the Makefile's CI test target sets it) and otherwise skips with the reason.
``MEDSCALPEL_SCREENSHOT_DIR`` keeps a copy of the screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_report_experiment import make_run_dir

pytestmark = pytest.mark.browser

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: appended to a copy of the page: checks every image and records script errors in the DOM
PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var div = document.createElement('div');
  div.id = 'probe';
  div.textContent = 'PROBE imgs=' + imgs.length + ' broken=' + bad.length +
    ' sections=' + document.querySelectorAll('section[data-section]').length +
    ' errors=' + window.__errors.length + ' END';
  document.body.appendChild(div);
});
</script>
"""


def _find_browser() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser() -> str:
    path = _find_browser()
    if path:
        return path
    if os.environ.get("MEDSCALPEL_INSTALL_BROWSER") != "1":
        pytest.skip("no headless browser: chromium is not installed (install Debian's chromium, "
                    "or set MEDSCALPEL_INSTALL_BROWSER=1 to let the test run "
                    "'apt-get install -y chromium')")
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is missing and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if res.returncode != 0:
            pytest.skip(f"installing chromium failed ({' '.join(cmd)}): {res.stderr[-300:]}")
    path = _find_browser()
    if not path:
        pytest.skip("chromium was installed but is not on PATH")
    return path


def _run(browser: str, args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    base = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
            f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp)})


def _console_errors(stderr: str) -> list[str]:
    """Console messages of level error from chromium's log (``CONSOLE`` lines), and failed
    loads of the page's own resources."""
    out = []
    for line in stderr.splitlines():
        if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line):
            out.append(line)
        elif "Failed to load resource" in line or "net::ERR_" in line and "file://" in line:
            out.append(line)
    return out


def test_experiment_report_in_chromium(tmp_path):
    from medscalpel.report.experiment import experiment_report

    browser = _browser()
    run = make_run_dir(tmp_path / "run")
    rep = experiment_report(run)
    page = Path(rep.html_path)
    html = page.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")

    res = _run(browser, ["--dump-dom", probe.as_uri()], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r"PROBE imgs=(\d+) broken=(\d+) sections=(\d+) errors=(\d+) END", res.stdout)
    assert m, f"the probe did not run; stdout tail: {res.stdout[-500:]!r}"
    n_img, broken, n_sec, errors = (int(g) for g in m.groups())
    assert n_img == html.count("<img ") and n_img >= 6
    assert broken == 0, "some figures did not decode in the browser"
    from medscalpel.report.sections import SECTIONS

    assert n_sec == len(SECTIONS) and errors == 0
    assert _console_errors(res.stderr) == []
    # the escaped class name is text in the DOM, never an element
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in res.stdout

    shot = tmp_path / "report.png"
    res = _run(browser, [f"--screenshot={shot}", "--window-size=1400,2600", page.as_uri()],
               tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console_errors(res.stderr) == []
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 2600)
        colours = im.convert("L").getextrema()
        assert colours[1] - colours[0] > 100  # not a blank page
    keep = os.environ.get("MEDSCALPEL_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "experiment_report.png")
