"""The report page in a real headless browser (Debian `chromium`): it loads without console errors, every
embedded plot decodes, and the rendered page is not blank. Skipped when chromium is not installed
(CI: `apt-get install -y --no-install-recommends chromium`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from momkd_fed.report import build_report
from test_report import FEDERATED_PLOTS, assert_valid_png, write_federated_run

pytestmark = pytest.mark.slow

# appended to a COPY of the page (the report itself carries no script): after the load event, count the <img>
# elements the browser decoded, and write the count into the DOM that --dump-dom prints
_PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var m = document.createElement("div");
  m.id = "img-check";
  m.textContent = "decoded " + ok + " of " + imgs.length;
  document.body.appendChild(m);
});
</script>"""
_BROKEN_IMG = '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAA" alt="truncated">'


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (apt-get install -y --no-install-recommends chromium)")


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def _page_problems(stderr: str) -> list[str]:
    """Console messages (the page has no script, so any is an error) and failed loads in chromium's log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "net::ERR_" in line]


def _decoded(page: Path, tmp: Path, profile: str, extra: str = "") -> tuple[int, int, list[str]]:
    probe = tmp / f"probe_{profile}.html"
    text = page.read_text(encoding="utf-8").replace("<h2>Plots</h2>", "<h2>Plots</h2>" + extra)
    probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    proc = _run(["--dump-dom", probe.as_uri()], tmp / profile)
    m = re.search(r'<div id="img-check">decoded (\d+) of (\d+)</div>', proc.stdout)
    assert m, f"probe marker missing from the dumped DOM; stderr: {proc.stderr[-2000:]}"
    return int(m.group(1)), int(m.group(2)), _page_problems(proc.stderr)


def test_report_page_loads_and_shows_every_plot_in_chromium(tmp_path):
    page = build_report(write_federated_run(tmp_path / "run"))

    ok, total, problems = _decoded(page, tmp_path, "p1")
    assert (ok, total) == (len(FEDERATED_PLOTS), len(FEDERATED_PLOTS))
    assert problems == []

    # negative control: the same probe does notice an image that does not decode
    ok, total, _ = _decoded(page, tmp_path, "p2", extra=_BROKEN_IMG)
    assert (ok, total) == (len(FEDERATED_PLOTS), len(FEDERATED_PLOTS) + 1)

    # the unmodified page: no console messages, and a screenshot with the plots' colours on it
    shot = tmp_path / "page.png"
    proc = _run(["--hide-scrollbars", "--window-size=1280,4000", f"--screenshot={shot}", page.as_uri()],
                tmp_path / "p3")
    assert _page_problems(proc.stderr) == []
    rgb = assert_valid_png(shot)
    with Image.open(shot) as im:
        hsv = np.asarray(im.convert("HSV"), dtype=np.float64)  # (H, W, 3)
    colourful = (hsv[..., 1] > 100) & (hsv[..., 2] > 60)  # saturated pixels: plot lines, bars, ROC curves
    assert colourful.mean() > 0.002, f"screenshot shows no plots ({colourful.mean():.4%} coloured pixels)"
    assert rgb.shape[:2] == (4000, 1280)
