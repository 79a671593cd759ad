"""Host memory rank 0 takes to collect a torchrun job's samples (`generate_sharded`), gloo ranks
on this machine, sampling itself replaced by a constant fill so only the gathering is measured.

    python benchmarks/bench_gather.py                       # 4,000 samples of 3x256x256, 2 ranks
    python benchmarks/bench_gather.py --samples 3999 --ranks 3

Figure: rank 0's peak resident memory (getrusage) after the gathering minus before it, over the
size of the samples; 1.00x means the samples are held once. Also checks every share arrived in
its rows.
"""

from __future__ import annotations

import argparse
import os
import resource

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kind.core.sampling as sampling
from kind.core.distributed import DistInfo


def _fill(model, diffusion, labels, *, indices, device, **kwargs):
    """Sample s (its label is s) is filled with s % 251, so rank 0 can check where each landed."""
    size = _fill.size
    values = torch.tensor(labels) % 251
    return values.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()


def _rank(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    _fill.size = args.image_size
    sampling.generate = _fill
    info = DistInfo(rank, args.ranks, 0, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    out = sampling.generate_sharded(None, None, list(range(args.samples)), info)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if rank == 0:
        placed = torch.equal(out[:, 0, 0, 0], (torch.arange(args.samples) % 251).to(torch.uint8))
        results.put((before / 1024, peak / 1024, out.numel() / 2**20, placed))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--port", type=int, default=29561)
    args = ap.parse_args()
    if args.samples < 1 or args.ranks < 2 or args.image_size < 1:
        ap.error("--samples and --image-size must be >= 1 and --ranks >= 2")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(r, args, args.port, results)) for r in range(args.ranks)
    ]
    for p in procs:
        p.start()
    before, peak, size, placed = results.get()
    for p in procs:
        p.join()
    print(f"{args.samples} samples over {args.ranks} ranks: {size:.0f} MiB; rank 0 peak RSS grew "
          f"{peak - before:.0f} MiB ({(peak - before) / size:.2f}x the samples); "
          f"shares in place: {placed}")  # fmt: skip


if __name__ == "__main__":
    main()
