"""Render a local HTML page in headless Chromium (Debian's ``chromium`` package; ``.ci/run`` installs it).

``render(page, workdir)`` loads the page twice: as it is, for a screenshot and the console messages Chromium logs
(``--enable-logging=stderr``: every ``console.*`` call and every refused or failed load); and a copy with one
probe script added (allowed by a nonce added to the page's Content-Security-Policy, nothing else changed) that
records, once the page has loaded, whether every image is complete with a natural width, read back with
``--dump-dom``. Tests call ``require_chromium()`` first: it skips them, saying why, where Chromium is absent.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# As the machines' notes prescribe for a closed network: without the background-networking flags Chromium tries
# to reach Google's hosts at every start.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]
PROBE = """<script nonce="compressx-probe">
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt}));
  document.documentElement.setAttribute("data-probe", JSON.stringify(images));
});
</script>"""
# Chromium's log lines for page console messages and for loads it refused or could not make.
_CONSOLE = re.compile(r":CONSOLE|Refused to|Failed to load|net::ERR_", re.IGNORECASE)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    path = chromium()
    if path is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    return path


@dataclasses.dataclass
class Rendered:
    screenshot: Path
    images: list[dict]
    console: list[str]


def _run(args: list[str], workdir: Path, name: str) -> subprocess.CompletedProcess:
    profile = workdir / f"profile-{name}"  # a fresh profile per run: nothing carried over
    cmd = [require_chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"chromium failed ({run.returncode}): {run.stderr[-2000:]}"
    return run


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if _CONSOLE.search(line)]


def render(page: Path, workdir: Path, width: int = 1200, height: int = 2400) -> Rendered:
    workdir.mkdir(parents=True, exist_ok=True)
    shot = workdir / f"{page.stem}.png"
    run = _run(
        [f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri()],
        workdir,
        "screenshot",
    )
    console = _console_lines(run.stderr)
    text = page.read_text(encoding="utf-8")
    probed = text.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-compressx-probe';", 1)
    probed = probed.replace("</body>", PROBE + "</body>", 1)
    copy = page.with_name(f".probe-{page.name}")
    copy.write_text(probed, encoding="utf-8")
    try:
        dom = _run(["--virtual-time-budget=10000", "--dump-dom", copy.as_uri()], workdir, "dom")
    finally:
        copy.unlink()
    console += _console_lines(dom.stderr)
    match = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert match, f"the probe script did not run; DOM starts: {dom.stdout[:500]}"
    images = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return Rendered(shot, images, console)


def assert_rendered_cleanly(page: Path, workdir: Path, min_images: int) -> Rendered:
    """Screenshot non-empty (not one colour), no console message, every image loaded."""
    from PIL import Image

    rendered = render(page, workdir)
    assert rendered.console == [], rendered.console
    assert len(rendered.images) >= min_images, rendered.images
    broken = [i for i in rendered.images if not (i["complete"] and i["width"] > 0)]
    assert broken == [], broken
    with Image.open(rendered.screenshot) as shot:
        lo, hi = shot.convert("L").getextrema()
        assert shot.size[0] > 0 and hi - lo > 100, f"the screenshot is blank (grey levels {lo}-{hi})"
    return rendered
