"""Screenshot of `kind-dit serve`'s web page (docs/serve.png), taken with headless Chromium.

    python scripts/screenshot_serve.py runs/demo_paper2/deploy/parts     # a trained parts dir
    python scripts/screenshot_serve.py                                   # a tiny random one

Serves PARTS from a thread of this process on a free localhost port, asks for one generation
through the API the page uses (so the cache already holds a tailor), then points Chromium at the
page with query parameters that prefill the form; the page runs them on load, one request per
class batched into one forward, and shows the images and the tailor cache. Needs a `chromium`
binary (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_parts(root: Path) -> Path:
    """A randomly initialised tiny KIND model with four classes, decomposed (noise, not digits)."""
    import torch

    from kind.core.diffusion import DiffusionConfig
    from kind.core.model import DiT, ModelConfig
    from kind.store.parts import decompose

    torch.manual_seed(0)
    model = DiT(ModelConfig(class_names=["zero", "one", "two", "three"], rank_tailor=4))
    return decompose(model.eval(), DiffusionConfig(), root / "parts")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("parts", nargs="?", help="parts directory (default: build a tiny random one)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    ap.add_argument("--query", default="n=4&seed=0", help="page query (classes, n, seed, steps…)")
    ap.add_argument("--window", default="1440,600", help="browser window WIDTH,HEIGHT")
    ap.add_argument("--budget-ms", type=int, default=60000, help="Chromium's virtual-time budget")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium binary on PATH; install it (Debian: apt-get install chromium)")

    from kind.serve.app import create_app
    from kind.serve.server import Background

    with tempfile.TemporaryDirectory() as tmp:
        parts = Path(args.parts) if args.parts else tiny_parts(Path(tmp))
        # a wait that lets every request the page sends at once join one batch
        with Background(create_app(parts, max_wait_ms=500)) as url:
            first = json.loads(urllib.request.urlopen(url + "/model").read())["classes"][0]
            body = json.dumps({"class_name": first["name"], "n": 1}).encode()
            request = urllib.request.Request(
                url + "/generate", body, {"Content-Type": "application/json"}
            )
            urllib.request.urlopen(request).read()  # through the API: the cache holds a tailor
            out = Path(args.out).resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--window-size={args.window}", f"--virtual-time-budget={args.budget_ms}",
                 f"--screenshot={out}", f"{url}/?{args.query}"],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
