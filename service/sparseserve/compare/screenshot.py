"""A screenshot of a compare report as a browser shows it (headless Chromium).

    python -m sparseserve.compare.screenshot compare-report/          # -> report-screenshot.png

For checking by eye what a reader sees: the page, its table and its plots at 100%.
Needs a Chromium (Debian: `apt-get install chromium`); `make report-screenshot` runs a
comparison on the demo repository first.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
SCREENSHOT_FILENAME = "report-screenshot.png"


class ScreenshotError(RuntimeError):
    """No browser, or the browser did not write the screenshot."""


def find_browser() -> str | None:
    """The path of a Chromium on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def screenshot(
    page: Path,
    out: Path,
    width: int = 1600,
    height: int = 4000,
    browser: str | None = None,
    timeout: float = 120.0,
) -> Path:
    """Render `page` (report.html) in headless Chromium into the PNG `out`, `width` x
    `height` CSS pixels (tall enough for the whole report by default)."""
    browser = browser or find_browser()
    if browser is None:
        raise ScreenshotError(f"no Chromium on PATH (looked for {', '.join(BROWSERS)})")
    out.unlink(missing_ok=True)
    # A profile of its own: a shared one may be locked by another run.
    with tempfile.TemporaryDirectory(prefix="sparseserve-chromium-") as profile:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--screenshot={out.resolve()}", page.resolve().as_uri(),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not out.is_file():
        raise ScreenshotError(
            f"{browser} wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: screenshot REPORT_DIR/report.html into REPORT_DIR/report-screenshot.png."""
    parser = argparse.ArgumentParser(
        prog="python -m sparseserve.compare.screenshot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("report", type=Path, help="a report folder (holding report.html)")
    parser.add_argument("--output", type=Path, help=f"default: REPORT/{SCREENSHOT_FILENAME}")
    parser.add_argument("--width", type=int, default=1600, help="CSS pixels (default 1600)")
    parser.add_argument("--height", type=int, default=4000, help="CSS pixels (default 4000)")
    args = parser.parse_args(argv)
    page = args.report / "report.html"
    if not page.is_file():
        print(f"screenshot: no report.html in {args.report}", file=sys.stderr)
        return 2
    out = args.output or args.report / SCREENSHOT_FILENAME
    try:
        screenshot(page, out, args.width, args.height)
    except (ScreenshotError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
