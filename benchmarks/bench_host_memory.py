"""Page faults and time of the CPU training step and sampling forward, with glibc's default heap
thresholds and with `kind.core.host_memory.keep_freed_memory`, each in a fresh process.

    python benchmarks/bench_host_memory.py             # tiny default model, batch 128, 2 threads

The training step: one forward + backward + optimiser step of a mixed-class batch (as
bench_speed.py). The sampling forward: one classifier-free-guided forward of 64 samples (64
conditional + 64 null rows, the rows a sampler's step runs), no gradient. Median of --repeats,
after 3 warm-up calls; page faults are the process's minor faults per call (getrusage).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.host_memory import keep_freed_memory
from kind.core.model import DiT, ModelConfig
from kind.training.optim import masked_adamw


def measure(kind: bool, what: str, keep: bool, repeats: int, threads: int) -> dict:
    """In this process: faults and median seconds per call of `what` ("train" or "sample")."""
    torch.set_num_threads(threads)
    if keep:
        keep_freed_memory()
    torch.manual_seed(0)
    names = [str(i) for i in range(6)]
    model = DiT(ModelConfig(kind=kind, image_size=28, in_channels=1, class_names=names))
    g = torch.Generator().manual_seed(0)
    B = 128
    x, t = torch.randn(B, 1, 28, 28, generator=g), torch.randint(0, 1000, (B,), generator=g)
    if what == "train":
        y = torch.arange(B) % 7  # the six classes and the null class
        opt = (
            masked_adamw(model, 1e-4)[0]
            if kind
            else torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        )
        diffusion, noise = Diffusion(DiffusionConfig()), torch.randn(x.shape, generator=g)

        def call():
            if kind:
                opt.set_rows(model.present_rows(y))
            diffusion.loss(model, x, y, t, noise, model.route(y)).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        y = torch.cat([torch.arange(B // 2) % 6, torch.full((B // 2,), 6)])  # cond + null rows
        route = model.route(y)
        model.eval()

        def call():
            with torch.no_grad():
                model(x, t, y, route)

    for _ in range(3):
        call()
    faults, times = [], []
    for _ in range(repeats):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"faults": statistics.median(faults), "ms": statistics.median(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = ap.parse_args()
    if args.one:
        kind, what, keep = json.loads(args.one)
        print(json.dumps(measure(kind, what, keep, args.repeats, args.threads)))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}\n")
    print("| call | model | page faults, default / kept | ms, default / kept | speed-up |")
    print("|---|---|---|---|---|")
    for what in ("train", "sample"):
        for kind in (True, False):
            r = {}
            for keep in (False, True):  # each in a fresh process: the setting is per process
                cmd = [sys.executable, __file__, "--repeats", str(args.repeats),
                       "--threads", str(args.threads), "--one", json.dumps([kind, what, keep])]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                r[keep] = json.loads(out.strip().splitlines()[-1])
            print(f"| {'training step' if what == 'train' else 'guided sampling forward'} | "
                  f"{'KIND' if kind else 'dense'} | {r[False]['faults']:.0f} / {r[True]['faults']:.0f} | "
                  f"{r[False]['ms']:.1f} / {r[True]['ms']:.1f} | "
                  f"{r[False]['ms'] / r[True]['ms']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
