"""Speed of KIND against dense, in one process, alternating, median of many repeats.

    python benchmarks/bench_speed.py                      # the default CPU size (tiny/7, batch 128)
    python benchmarks/bench_speed.py --size DiT-B/2 --image-size 32 --channels 4 --batch-size 64 \
        --precision bf16 --device cuda                    # the scale path on a GPU

Measures, for a mixed-class batch (every class plus ~10% null samples, as in training):
  1. one training step (forward + backward + AdamW step) of the KIND DiT vs the dense DiT;
  2. the gated layer vs nn.Linear (forward + backward) at the model's MLP shape;
  3. inference of one class merged into a dense DiT vs the dense DiT.
Prints a Markdown table and writes the numbers as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kind.core.decomposition import merge
from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.flops import count_flops
from kind.core.gated import route_to
from kind.core.host_memory import keep_freed_memory
from kind.core.model import SIZES, DiT, ModelConfig, parse_size
from kind.training.optim import masked_adamw

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts)
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def size_arg(text: str) -> str:
    """A model size for argparse: an unknown one is a usage error naming the sizes there are."""
    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device_arg(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; give cpu, cuda or cuda:N"
        ) from None


def result_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run inside it: at CPU sizes each costs a dispatch, and at two or
    more threads a fork and join of the thread pool, whatever the arithmetic it does."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def timed(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device) -> dict:
    """Median seconds per call of each function, calls alternating so drift hits all equally."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    ap.add_argument("--peak-tflops", type=float, help="the card's bf16 peak (default: by name)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU")
    if device.type == "cpu":  # as the training loop does: no page faults to refill its heap
        keep_freed_memory()
    amp = PRECISIONS[args.precision]
    torch.manual_seed(0)

    names = [str(i) for i in range(args.classes)]
    common = dict(
        size=args.size, image_size=args.image_size, in_channels=args.channels, class_names=names
    )
    try:  # the model's own checks (size, patch, image size) as a usage error, not a traceback
        models = {k: DiT(ModelConfig(kind=k == "kind", **common)) for k in ("kind", "dense")}
    except ValueError as e:
        ap.error(str(e))
    models = {k: m.to(device) for k, m in models.items()}
    # KIND as the training loop runs it (masked AdamW over its row banks); dense as a user would
    # otherwise train it (torch's fused AdamW)
    opts = {"kind": masked_adamw(models["kind"], 1e-4)[0],
            "dense": torch.optim.AdamW(models["dense"].parameters(), lr=1e-4, fused=True)}  # fmt: skip
    diffusion = Diffusion(DiffusionConfig())
    B = args.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, args.channels, args.image_size, args.image_size, generator=g).to(device)
    y = torch.arange(B) % args.classes
    y[torch.rand(B, generator=g) < 0.1] = args.classes  # ~10% null samples
    y = y[torch.randperm(B, generator=g)].to(device)
    t = torch.randint(0, 1000, (B,), generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)

    y_host = y.cpu()
    # compiled models take the static route (shapes fixed by the batch size); eager CPU the blocked
    nets = {k: torch.compile(m) if args.compile else m for k, m in models.items()}
    blocked = device.type == "cpu" and not args.compile

    def train_step(k):
        def fn():
            # the per-batch host work of the loop: the route and the rows the step may change
            route = models[k].route(y_host, blocked=blocked)
            if k == "kind":
                opts[k].set_rows(models[k].present_rows(y_host))
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = diffusion.loss(nets[k], x, y, t, noise, route).mean()
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)

        return fn

    step = timed({k: train_step(k) for k in models}, args.repeats, args.warmup, device)
    flops, ops, memory = {}, {}, {}
    for k in models:  # one more step each: its floating-point work, operations and peak memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with count_flops() as counter, OpCounter() as op_counter:
            train_step(k)()
        flops[k], ops[k] = counter.get_total_flops(), op_counter.count
        if device.type == "cuda":
            memory[k] = torch.cuda.max_memory_allocated(device) / 2**30

    # the gated layer vs nn.Linear at the MLP's first matrix, same tokens
    _, hidden, _ = SIZES[parse_size(args.size)[0]]
    layer_tokens = (args.image_size // parse_size(args.size)[1]) ** 2
    gated = models["kind"].blocks[0].mlp.fc1
    linear = torch.nn.Linear(hidden, gated.out_features).to(device)
    h = torch.randn(B, layer_tokens, hidden, device=device, requires_grad=True)
    kind = models["kind"]
    route = kind.route(y_host, blocked=blocked)
    route = route_to(replace(route, order=None), device)  # rows gathered per call, as the model

    def layer_fn(fn):
        def run():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = fn()
            out.float().sum().backward()

        return run

    layer = timed(
        {
            "kind": layer_fn(lambda: gated(h, kind.tailors.attach(route))),
            "dense": layer_fn(lambda: linear(h)),
        },
        args.repeats,
        args.warmup,
        device,
    )

    # inference: one class merged into dense weights vs the dense DiT
    merged = merge(models["kind"], names[0]).cond
    y0 = torch.zeros(B, dtype=torch.long, device=device)

    @torch.no_grad()
    def infer(m):
        def run():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                m(x, t, y0)

        return run

    inference = timed(
        {"merged": infer(merged.eval()), "dense": infer(models["dense"].eval())},
        args.repeats,
        args.warmup,
        device,
    )
    models["kind"].eval()
    inference |= timed({"kind": infer(models["kind"])}, args.repeats, args.warmup, device)

    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    tflops = {k: flops[k] / step[k] / 1e12 for k in models}
    peak = args.peak_tflops or next(
        (v for name, v in PEAK_BF16_TFLOPS.items() if name in result_machine(device)), None
    )
    result = {
        "machine": result_machine(device),
        "torch": torch.__version__,
        "size": args.size,
        "batch_size": B,
        "classes": args.classes,
        "precision": args.precision,
        "compile": args.compile,
        "params": params,
        "train_step_s": step,
        "train_step_ratio": step["kind"] / step["dense"],
        "layer_s": layer,
        "layer_ratio": layer["kind"] / layer["dense"],
        "inference_s": inference,
        "merged_inference_ratio": inference["merged"] / inference["dense"],
        "train_step_flops": flops,
        "train_step_ops": ops,
        "train_tflops_per_s": tflops,
        "peak_bf16_tflops": peak,
        "peak_memory_gib": memory,
    }
    rows = [
        ("training step (fwd+bwd+AdamW)", step["kind"], step["dense"], result["train_step_ratio"]),
        (
            f"gated layer vs nn.Linear ({hidden}->{gated.out_features}, fwd+bwd)",
            layer["kind"],
            layer["dense"],
            result["layer_ratio"],
        ),
        (
            "inference: merged class model vs dense",
            inference["merged"],
            inference["dense"],
            result["merged_inference_ratio"],
        ),
        (
            "inference: unmerged KIND vs dense",
            inference["kind"],
            inference["dense"],
            inference["kind"] / inference["dense"],
        ),
    ]
    print(
        f"{result['machine']}, torch {torch.__version__}, {args.size}, batch {B}, "
        f"{args.classes} classes, {args.precision}, median of {args.repeats}"
    )
    print("| measurement | KIND (ms) | dense (ms) | ratio |\n|---|---|---|---|")
    for name, a, b, r in rows:
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {r:.3f} |")
    for k in models:
        util = f", {100 * tflops[k] / peak:.1f}% of the {peak:g} TFLOP/s bf16 peak" if peak else ""
        mem = f", peak memory {memory[k]:.2f} GiB" if memory else ""
        print(
            f"{k}: {flops[k] / 1e12:.3f} TFLOP and {ops[k]} operations a step, "
            f"{tflops[k]:.2f} TFLOP/s{util}{mem}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
