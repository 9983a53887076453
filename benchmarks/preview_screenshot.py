"""A headless Chromium screenshot of the browser preview during a live run (README's picture).

    python -m benchmarks.preview_screenshot [--out app/preview/static/screenshot.png] [--window 1280x860]

Starts ``python -m app.live --source synthetic --serve`` with the shipped weights on a free loopback
port, waits until frames flow, starts a recording from the page's endpoint (so the button shows its
recording state), lets Chromium (``chromium``/``chromium-browser``/``google-chrome``; Debian:
``apt-get install chromium``) load the page and take the screenshot, then stops the run with Ctrl-C
(SIGINT) and checks that it exits 130 with its recording finished. Look at the PNG before committing it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "app" / "preview" / "static" / "screenshot.png"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_frames(url: str, frames: int, timeout_s: float) -> dict:
    """The run's /stats once it has delivered ``frames`` frames; RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "stats", timeout=2) as response:
                stats = json.load(response)
            if stats.get("frames", 0) >= frames:
                return stats
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no {frames} frames at {url} within {timeout_s:g} s")


def record(url: str, on: bool) -> dict:
    request = urllib.request.Request(url + "record", data=json.dumps({"recording": on}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preview_screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default: beside the page's assets)")
    parser.add_argument("--window", default="1280x860", metavar="WxH", help="browser window size in pixels")
    parser.add_argument("--size", type=int, default=512, help="synthetic frame size in pixels")
    args = parser.parse_args(argv)
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        print(f"preview_screenshot: error: no Chromium found ({', '.join(BROWSERS)}); "
              "apt-get install chromium", file=sys.stderr)
        return 2
    width, height = (int(part) for part in args.window.lower().split("x"))
    url = f"http://127.0.0.1:{free_port()}/"
    with tempfile.TemporaryDirectory(prefix="cellseg-screenshot-") as scratch:
        live = subprocess.Popen(
            [sys.executable, "-m", "app.live", "--source", "synthetic", "--no-display", "--serve", url[7:-1],
             "--set", f"synth.size={args.size}", "--set", "source.loop=true",
             "--set", f"preview.record_dir={scratch}"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            wait_for_frames(url, 40, timeout_s=120)
            record(url, True)
            wait_for_frames(url, 80, timeout_s=60)
            shot = Path(scratch) / "screenshot.png"
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--force-device-scale-factor=1", f"--window-size={width},{height}",
                            "--virtual-time-budget=4000", "--timeout=8000", f"--screenshot={shot}", url],
                           check=True, timeout=120, capture_output=True)
            saved = record(url, False)
        finally:
            live.send_signal(signal.SIGINT)
            code = live.wait(timeout=60)
        if code != 130:
            print(f"preview_screenshot: error: the live run exited {code}, not 130 (Ctrl-C)", file=sys.stderr)
            return 1
        if not (saved.get("last_saved") and Path(saved["last_saved"]).is_file()):
            print("preview_screenshot: error: the recording was not saved", file=sys.stderr)
            return 1
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, args.out)
    print(f"wrote {args.out} ({width}×{height}); recorded {saved['frames']} frames during the shot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
