"""Render an `engram inspect gates` page and screenshot it in headless Chromium (Debian: `apt-get install chromium`).

    python scripts/screenshot_gates.py --checkpoint RUN/engram/final --text "By the way" --text "亚历山大大帝" \
        --out DIR [--width 1200] [--height 900] [--device cpu]

Writes what `engram inspect gates` writes (gates.html, gates.png, gates.json) and gates_screenshot.png, the
page as a browser draws it: the check that the page is self-contained and readable, CJK text included.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SCREENSHOT_FILE = "gates_screenshot.png"


def find_browser() -> str | None:
    """The first Chromium-like browser on PATH, or ``None``."""
    return next((path for path in map(shutil.which, BROWSERS) if path is not None), None)


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 900, browser: str | None = None) -> Path:
    """Load ``page`` (a local HTML file) in headless Chromium and save a ``width`` x ``height`` screenshot."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found on PATH (tried {', '.join(BROWSERS)}): apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="engram-chromium-") as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
                        page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    if not png.is_file():
        raise RuntimeError(f"{browser} exited without writing {png}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--text", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from engram.inspection.gates import run_gates

    report = run_gates(args.checkpoint, args.text, args.out, args.device)
    shot = screenshot(report.html, Path(args.out) / SCREENSHOT_FILE, args.width, args.height)
    print(f"wrote {report.html}, {report.png}, {report.summary}, {shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
