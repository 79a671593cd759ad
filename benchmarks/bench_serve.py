"""Serving a parts directory: `kind-dit serve`'s mixed-class batches against one merged dense model
per class, the memory each needs, and how long a tailor takes to load.

    python benchmarks/bench_serve.py                  # tiny/7, 64 classes: ~2 min on 2 CPU cores
    python benchmarks/bench_serve.py --requests 256 --steps 20 --active 1,8,64

Builds a randomly initialised tiny KIND DiT with 64 classes (quality is irrelevant to speed) and
decomposes it into a parts directory in a temp dir. Everything runs in this process, without HTTP:
requests go straight to the server's own `Batcher` (kind.serve.batcher: its queue, its tailor
cache, one mixed forward per batch), so the numbers are the model's and the batcher's, not the
web stack's.

1. Throughput (images/s): a burst of --requests requests (--n images each, classes drawn
   uniformly from the first 1, 8 or 64 classes) submitted at once, cache warm. Dense baseline:
   one merged dense model per class (`kind.core.decomposition.merge`, all in memory, the
   unconditional network for guidance shared), switching models as requests arrive: one run per
   stretch of consecutive requests of a class; and, its best case with the same queue, every
   queued request of a class in one run. At most --max-batch samples a forward for all; same
   seeds, sampler, steps, guidance.
2. Memory for N classes, bytes of parameters (fp32): one learngene + N tailor slots (the serve
   model) against N dense models plus the shared unconditional one.
3. Tailor load latency: a cache miss (read the tailor file, sha256 against the manifest, write its
   bank row), for every tailor; beside it, loading one merged dense model directory (checksums,
   safetensors, model build). The files sit in the OS page cache: a cold disk adds its read time.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kind.core.decomposition import merge
from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.images import to_uint8
from kind.core.model import DiT, ModelConfig
from kind.core.seeds import sample_seed
from kind.serve.batcher import Batcher
from kind.serve.cache import TailorCache
from kind.serve.draw import Settings
from kind.store.load import load_model
from kind.store.parts import assemble, decompose, load_parts


def name(c: int) -> str:
    """Class c's name in the benchmark's model."""
    return f"c{c}"


def build_parts(root: Path, classes: int, size: str) -> Path:
    torch.manual_seed(0)
    model = DiT(ModelConfig(size=size, class_names=[name(i) for i in range(classes)]))
    return decompose(model.eval(), DiffusionConfig(), root / "parts")


def stream(active: int, requests: int, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(class id, n, seed) for each request, classes uniform over the first `active`."""
    rng = random.Random(seed)
    return [(rng.randrange(active), n, 1000 + i) for i in range(requests)]


async def kind_burst(batcher: Batcher, reqs, settings: Settings) -> None:
    await asyncio.gather(*(batcher.submit(c, n, s, settings) for c, n, s in reqs))


def serve_kind(cache: TailorCache, diffusion: Diffusion, reqs, settings, max_batch) -> dict:
    """Seconds and batches for the burst through the server's batcher."""

    async def main() -> tuple[float, int]:
        batcher = Batcher(cache, diffusion, max_batch=max_batch, max_wait_ms=5)
        batcher.start()
        start = time.perf_counter()
        await kind_burst(batcher, reqs, settings)
        took = time.perf_counter() - start
        await batcher.stop()
        return took, batcher.batches

    took, batches = asyncio.run(main())
    return {"seconds": took, "forwards": batches}


def dense_runs(reqs, max_batch: int, grouped: bool) -> list[tuple[int, list[int]]]:
    """(class, per-sample seeds) of each sampling run a one-model-per-class server makes: in
    arrival order, a run per stretch of consecutive requests of one class (switching models as
    requests arrive), or (`grouped`) every queued request of a class together."""
    runs: list[tuple[int, list[int]]] = []
    for c, n, s in sorted(reqs, key=lambda r: r[0]) if grouped else reqs:
        seeds = [sample_seed(s, name(c), i) for i in range(n)]
        if runs and runs[-1][0] == c and len(runs[-1][1]) + n <= max_batch:
            runs[-1][1].extend(seeds)
        else:
            runs.append((c, seeds))
    return runs


@torch.no_grad()
def serve_dense(dense: dict, diffusion: Diffusion, reqs, settings, max_batch, grouped) -> dict:
    """Seconds and sampling runs for the burst, one merged dense model per class."""
    runs = dense_runs(reqs, max_batch, grouped)
    start = time.perf_counter()
    for c, seeds in runs:
        model, cfg = dense[c], dense[c].config
        x = diffusion.sample(
            model,
            torch.zeros(len(seeds), dtype=torch.long),  # the merged class is class 0
            (cfg.in_channels, cfg.image_size, cfg.image_size),
            null_id=model.null_id,
            sampler=settings.sampler,
            steps=settings.steps,
            cfg_scale=settings.cfg_scale,
            generators=[torch.Generator().manual_seed(s) for s in seeds],
        )
        to_uint8(x)
    return {"seconds": time.perf_counter() - start, "forwards": len(runs)}


def param_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--classes", type=int, default=64, help="classes in the parts directory")
    ap.add_argument("--active", default="1,8,64", help="classes the request stream draws from")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--n", type=int, default=4, help="images a request")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--max-batch", type=int, default=64, help="samples a forward (both servers)")
    ap.add_argument("--repeats", type=int, default=3, help="median of this many bursts")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: tiny models on a shared CPU run many times "
                    "faster on one thread than on threads that contend)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    active = [int(a) for a in args.active.split(",")]
    settings = Settings("ddim", args.steps, args.cfg_scale)
    diffusion = Diffusion(DiffusionConfig())

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parts = build_parts(root, args.classes, args.size)

        # 3. load latency: every tailor once, cold cache (one slot, so each is a miss)
        loads = TailorCache(parts, capacity=1)
        tailor_ms = []
        for g in range(args.classes):
            start = time.perf_counter()
            loads.acquire([g])
            tailor_ms.append((time.perf_counter() - start) * 1000)
            loads.release([g])
        tailor_file = loads.manifest["tailors"]["0"]["bytes"]
        dense_dir = assemble(parts, None, root / "dense_c0", merge_class="c0")
        dense_ms = []
        for _ in range(5):
            start = time.perf_counter()
            load_model(dense_dir)
            dense_ms.append((time.perf_counter() - start) * 1000)
        dense_file = (dense_dir / "model.safetensors").stat().st_size

        # the servers: KIND with a slot for every class, dense with one merged model per class
        cache = TailorCache(parts)
        cache.acquire(list(range(args.classes)))  # warm: every tailor loaded
        cache.release(list(range(args.classes)))
        full, _, _ = load_parts(parts)
        merged = [merge(full, name(c)) for c in range(args.classes)]
        uncond = merged[0].uncond
        for m in merged[1:]:
            m.uncond = uncond  # one unconditional network serves every class's guidance
        serve_kind(cache, diffusion, stream(1, 8, args.n), settings, args.max_batch)  # warm-up
        dense = dict(enumerate(merged))
        serve_dense(dense, diffusion, stream(1, 8, args.n), settings, args.max_batch, True)

        rows = []
        for a in active:
            reqs = stream(a, args.requests, args.n)
            k = [serve_kind(cache, diffusion, reqs, settings, args.max_batch)
                 for _ in range(args.repeats)]  # fmt: skip
            images = args.requests * args.n
            row = [a, len({c for c, _, _ in reqs}), images]
            for runs in (k, *(
                [serve_dense(dense, diffusion, reqs, settings, args.max_batch, grouped)
                 for _ in range(args.repeats)]
                for grouped in (False, True)
            )):  # fmt: skip
                row += [images / statistics.median(r["seconds"] for r in runs), runs[0]["forwards"]]
            rows.append(row)

        memory = []
        models = {1: loads.model, args.classes: cache.model}
        learngene = param_bytes(loads.model) - cache.slot_bytes
        cond = param_bytes(merged[0].cond)
        for n in sorted({1, 8, args.classes}):
            model = models[n] if n in models else TailorCache(parts, capacity=n).model
            memory.append((n, param_bytes(model), n * cond + param_bytes(uncond)))

    threads = torch.get_num_threads()
    print(f"## bench_serve: {args.size}, {args.classes} classes, {platform.machine()}, "
          f"{threads} threads, torch {torch.__version__}\n")  # fmt: skip
    print(f"{args.requests} requests of {args.n} images, DDIM {args.steps} steps, guidance "
          f"{args.cfg_scale}, at most {args.max_batch} samples a forward; median of "
          f"{args.repeats} bursts\n")  # fmt: skip
    print("| active classes | classes asked | images | KIND, mixed batches: img/s (sampling runs) "
          "| dense model per class, in arrival order | dense, queue grouped by class "
          "| KIND / dense (arrival, grouped) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for a, asked, images, k, kf, d, df, g, gf in rows:
        print(f"| {a} | {asked} | {images} | {k:.1f} ({kf}) | {d:.1f} ({df}) | {g:.1f} ({gf}) "
              f"| {k / d:.2f}x, {k / g:.2f}x |")  # fmt: skip
    print(
        "\n| classes held | KIND: learngene + N tailors | N dense models + 1 unconditional "
        "| dense / KIND |"
    )
    print("|---|---|---|---|")
    for n, kb, db in memory:
        print(f"| {n} | {mib(kb)} | {mib(db)} | {db / kb:.1f}x |")
    print(f"\n(learngene {mib(learngene)}, one tailor slot {cache.slot_bytes / 1024:.0f} KiB, "
          f"one dense model {mib(cond)})\n")  # fmt: skip
    print("| load | file bytes | median ms | p90 ms |")
    print("|---|---|---|---|")
    for what, size, ms in [
        ("one tailor (cache miss: read + sha256 + write its bank row)", tailor_file, tailor_ms),
        ("one merged dense model directory (load_model)", dense_file, dense_ms),
    ]:
        p90 = statistics.quantiles(ms, n=10)[-1] if len(ms) > 1 else ms[0]
        print(f"| {what} | {size:,} | {statistics.median(ms):.1f} | {p90:.1f} |")


if __name__ == "__main__":
    main()
