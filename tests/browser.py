"""Headless Chromium (Debian's `chromium`, installed by .ci/run) for the gallery tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--mute-audio"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it with `apt-get install -y chromium`")
    pytest.skip("chromium is not installed (apt-get install -y chromium); CI installs it")


def run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def probe(page: str, script: str, budget_ms: int = 20000) -> dict:
    """Open a copy of `page` (next to it, so relative media resolve) with `script` appended; the script must
    put a JSON result into <pre id="probe">, which is read back from the dumped DOM."""
    copy = os.path.join(os.path.dirname(page), "_probe.html")
    with open(page) as f:
        text = f.read()
    with open(copy, "w") as f:
        f.write(text.replace("</body>", f"<script>{script}</script></body>"))
    try:
        result = run([f"--virtual-time-budget={budget_ms}", "--dump-dom", "file://" + copy])
    finally:
        os.remove(copy)
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the page reported nothing: {result.stdout[-2000:]} {result.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(found.group(1)))


def screenshot(page: str, png: str, size: str = "1280,1000", budget_ms: int = 10000) -> None:
    result = run([f"--virtual-time-budget={budget_ms}", f"--window-size={size}", "--hide-scrollbars",
                  f"--screenshot={png}", "file://" + page])
    assert os.path.exists(png), result.stderr[-2000:]
