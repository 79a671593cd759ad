"""`kind-dit serve`: a local HTTP server for a parts directory (learngene once, tailors on demand)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kind.cli.common import count, number
from kind.core.device import MAX_THREADS

NAME = "serve"
HELP = "serve a parts directory over HTTP: JSON API and a web page"
DESCRIPTION = (
    "Serve PARTS on a local HTTP server: the learngene held once, tailors loaded on first use "
    "(sha256-checked) into an LRU cache, requests for different classes batched into one mixed "
    "forward. POST /generate {class_name, n, seed, steps, cfg_scale, sampler, format} returns a "
    "PNG grid or an .npz; GET /health, /model, /cache; a web page at /."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Where to listen, how big the tailor cache is, how requests batch, which VAE decodes."""
    p.add_argument("parts", help="parts directory (kind-dit decompose)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=count(0, 65535), default=8000, help="port (default 8000; 0: any free)"
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--cache-mb",
        type=number(open_low=True),
        help="memory for tailors in MiB (default: room for every tailor); the cache holds as "
        "many as fit",
    )
    size.add_argument("--cache-tailors", type=count(), help="tailors the cache holds, instead")
    p.add_argument(
        "--max-batch",
        type=count(),
        default=64,
        help="samples per batched forward (default 64), counting the null samples it is padded "
        "with so each class computes as it would alone (many classes need more): the bound on "
        "a forward's memory; a single larger request runs alone",
    )
    p.add_argument(
        "--max-wait-ms",
        type=number(),
        default=50.0,
        help="how long a request waits for others to share its batch (default 50)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--vae",
        help="VAE directory to decode a latent model's samples (default: the one recorded when "
        "the model was trained)",
    )
    p.add_argument(
        "--threads",
        type=count(1, MAX_THREADS),
        help="CPU threads for torch (default: torch's; on a machine that also runs other work, "
        "1 is often fastest for small models)",
    )


def run(args: argparse.Namespace) -> None:
    """Check PARTS, take the port, load the learngene, serve until Ctrl-C."""
    from kind.core.device import pick_device
    from kind.serve.app import create_app
    from kind.serve.cache import MIB
    from kind.serve.server import bind
    from kind.serve.server import run as serve
    from kind.store.parts import read_manifest

    parts = Path(args.parts)
    if not parts.is_dir():
        raise ValueError(f"{parts} is not a directory; give a parts directory (kind-dit decompose)")
    read_manifest(parts)  # a clear error for a directory that holds no parts
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sock = bind(args.host, args.port)
    app = create_app(
        parts,
        cache_tailors=args.cache_tailors,
        cache_bytes=None if args.cache_mb is None else int(args.cache_mb * MIB),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        device=pick_device(args.device),
        vae=args.vae,
    )
    cache = app.state.cache
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(
        f"serving {parts} ({len(cache.classes)} classes; cache: {cache.capacity} tailors, "
        f"{cache.capacity * cache.slot_bytes / MIB:.2f} MiB) at http://{host}:{port}/",
        flush=True,
    )
    serve(app, sock)
