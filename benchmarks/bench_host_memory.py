"""Page faults and time of the CPU training step and sampling forward, with glibc's default heap
thresholds and with `kind.core.host_memory.keep_freed_memory`, each in a fresh process.

    python benchmarks/bench_host_memory.py             # tiny default model, batch 128, 2 threads
    python benchmarks/bench_host_memory.py --calls train-kind --processes 8 --trim-mib 64
                                                       # the kept heap with another trim threshold
    python benchmarks/bench_host_memory.py --calls train-kind --size DiT-S/4 --batch 32 --threads 1

The training step: one forward + backward + optimiser step of a mixed-class batch (as
bench_speed.py). The sampling forward: one classifier-free-guided forward of 64 samples (64
conditional + 64 null rows, the rows a sampler's step runs), no gradient. Median of --repeats,
after 3 warm-up calls; page faults are the process's minor faults per call (getrusage), one
figure a fresh process (--processes of them: whether a process's heap trims every call depends on
where its allocations land, which differs from process to process).
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
from bench_speed import size_arg  # this script's folder is on the path when it runs

from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.host_memory import TRIM_THRESHOLD, keep_freed_memory
from kind.core.model import DiT, ModelConfig
from kind.training.optim import masked_adamw

CALLS = ["train-kind", "train-dense", "sample-kind", "sample-dense"]


def measure(kind: bool, what: str, keep: bool, args: argparse.Namespace) -> dict:
    """In this process: faults and median seconds per call of `what` ("train" or "sample"); kept
    with another trim threshold where --trim-mib is set."""
    torch.set_num_threads(args.threads)
    if keep:
        keep_freed_memory(args.trim_mib * 2**20 if args.trim_mib else TRIM_THRESHOLD)
    torch.manual_seed(0)
    names = [str(i) for i in range(6)]
    C, H = (1, 28) if args.size == "tiny" else (4, 32)  # bundled images, or SD-VAE latents
    model = DiT(
        ModelConfig(size=args.size, kind=kind, image_size=H, in_channels=C, class_names=names)
    )
    g = torch.Generator().manual_seed(0)
    B = args.batch
    x, t = torch.randn(B, C, H, H, generator=g), torch.randint(0, 1000, (B,), generator=g)
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
    for _ in range(args.repeats):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"faults": statistics.median(faults), "ms": statistics.median(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2, help="fresh processes a measurement")
    ap.add_argument("--calls", nargs="+", default=CALLS, choices=CALLS)
    ap.add_argument("--trim-mib", type=int, default=0, help="kept: this trim threshold instead")
    ap.add_argument(
        "--size", type=size_arg, default="tiny", help="tiny (28x28x1) or e.g. DiT-S/4 (32x32x4)"
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = ap.parse_args()
    if args.one:
        kind, what, keep = json.loads(args.one)
        print(json.dumps(measure(kind, what, keep, args)))
        return
    trim = f"trim threshold {args.trim_mib} MiB" if args.trim_mib else "the library's thresholds"
    print(f"torch {torch.__version__}, {args.size}, batch {args.batch}, {args.threads} threads, median of {args.repeats}, "
          f"{args.processes} processes each; kept: {trim}\n")  # fmt: skip
    print("| call | model | page faults a call, default / kept | ms, default / kept |")
    print("|---|---|---|---|")
    for call in args.calls:
        what, model = call.split("-")
        r = {False: [], True: []}
        for keep in (False, True):  # each in fresh processes: the setting is per process
            for _ in range(args.processes):
                cmd = [sys.executable, __file__, "--repeats", str(args.repeats),
                       "--threads", str(args.threads), "--trim-mib", str(args.trim_mib),
                       "--size", args.size, "--batch", str(args.batch), "--one", json.dumps([model == "kind", what, keep])]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                r[keep].append(json.loads(out.strip().splitlines()[-1]))
        faults = [", ".join(f"{m['faults']:,.0f}" for m in r[keep]) for keep in (False, True)]
        ms = [", ".join(f"{m['ms']:.1f}" for m in r[keep]) for keep in (False, True)]
        print(f"| {'training step' if what == 'train' else 'guided sampling forward'} | "
              f"{'KIND' if model == 'kind' else 'dense'} | {faults[0]} / {faults[1]} | {ms[0]} / {ms[1]} |")  # fmt: skip


if __name__ == "__main__":
    main()
