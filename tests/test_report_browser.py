"""The run report's `index.html` in a real headless browser (Debian's Chromium): it renders, and every image loads.

Skipped when `chromium` is not installed (`apt-get install chromium`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import EXPECTED_PNGS, write_run

from chronomoe_v3.report import render_report

TIMEOUT_S = 60


def chromium_flags(user_data: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={user_data}", "--virtual-time-budget=5000"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Chromium is not installed (no `chromium` on PATH); install it with `apt-get install chromium`")
    return path


@pytest.fixture(scope="module")
def index_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    result = render_report(write_run(root), root / "report")
    assert {p.name for p in result.written} == EXPECTED_PNGS | {"index.html"}
    return result.index


def test_screenshot_is_not_blank(chromium: str, index_html: Path, tmp_path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [chromium, *chromium_flags(tmp_path / "profile"), f"--screenshot={shot}", "--window-size=1200,3000",
         index_html.resolve().as_uri()],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(str(shot))
    assert pixels.shape[:2] == (3000, 1200)
    colours = {tuple(p) for p in pixels[::10, ::10].reshape(-1, pixels.shape[2]).tolist()}
    assert len(colours) > 20, "the screenshot is (nearly) one flat colour"


def test_every_image_loads(chromium: str, index_html: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [chromium, *chromium_flags(tmp_path / "profile"), "--dump-dom", index_html.resolve().as_uri()],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body is not None, proc.stdout[:2000]
    ok = re.search(r'data-images-ok="(\d+)"', body.group(0))
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    assert ok is not None and total is not None, f"the load script did not run: {body.group(0)}"
    assert int(total.group(1)) == len(EXPECTED_PNGS)
    assert int(ok.group(1)) == int(total.group(1)) > 0
