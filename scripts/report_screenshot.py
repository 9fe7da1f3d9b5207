"""Render a run dir's report.html to a PNG with headless Chromium, to look at it as a user would.

    python scripts/report_screenshot.py <run dir> [--out report.png] [--height 900] [--rerender]

--rerender draws the iteration plot and writes report.md / report.html again from report.json and the diagnosis first (the
current code's rendering of an earlier run). Needs `chromium` (Debian: apt-get install chromium).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(html: Path, out: Path, width: int = 1280, height: int = 900, timeout: float = 120) -> Path:
    """``html`` rendered by headless Chromium into ``out`` (PNG, width x height: the first screen)."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium on PATH: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="qf-chromium-") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out.resolve()}",
               f"--window-size={width},{height}", html.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot: {' '.join(cmd)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: <run dir>/report.png)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900, help="900: the first screen; larger for more of the page")
    ap.add_argument("--rerender", action="store_true", help="write report.md/html again with the current code")
    a = ap.parse_args()
    if a.rerender:
        from quantfix import report

        run, diag = report.load_run(a.run_dir)
        report.plot_iterations(run, a.run_dir)
        report.write_human(run, a.run_dir, diag)
    out = screenshot(a.run_dir / "report.html", a.out or a.run_dir / "report.png", a.width, a.height)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
