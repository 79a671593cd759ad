"""KIND against dense at the paper's class counts, on the CPU, in minutes.

    python benchmarks/bench_scale.py                    # DiT-S/4 and DiT-B/4 at 150 classes,
                                                        # DiT-S/4 at 611 (one thread, batch 16)
    python benchmarks/bench_scale.py --cases DiT-S/4:150 --repeats 3 --json out.json

Latent-shaped inputs (4x32x32), rank-8 tailors, a batch of 16 samples of 16 distinct classes,
the masked AdamW and EMA of the training loop for KIND, torch's fused AdamW and a plain EMA
for dense. For each case: parameter tensors (all, and
tailor tensors per gated layer), forward + backward, the optimiser step and the EMA update (KIND
and dense in one process, alternating, median), and the peak resident memory of one training
step (each model in a fresh process). Prints a Markdown table; the targets of the scale work are
forward + backward <= 1.25x dense, optimiser + EMA <= 1.2x dense's, tailor tensors per gated
layer <= 4 whatever the class count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import size_arg, timed  # noqa: E402  (the same alternating median timer)

from kind.core.diffusion import Diffusion, DiffusionConfig  # noqa: E402
from kind.core.host_memory import keep_freed_memory  # noqa: E402
from kind.core.model import DiT, ModelConfig  # noqa: E402
from kind.training.ema import EMA  # noqa: E402
from kind.training.optim import keep_rows, masked_adamw  # noqa: E402

CASES = ("DiT-S/4:150", "DiT-B/4:150", "DiT-S/4:611")


def case(text: str) -> str:
    """Checks a SIZE:CLASSES case up front (argparse turns the error into a usage message)."""
    size, _, count = text.partition(":")
    size_arg(size)
    if not count.isdigit() or int(count) < 16:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give SIZE:CLASSES with at least 16 classes (a batch holds 16 distinct "
            "classes), e.g. DiT-S/4:150"
        )
    return text


def build(size: str, classes: int, kind: bool) -> DiT:
    names = [f"c{i}" for i in range(classes)]
    return DiT(ModelConfig(size=size, kind=kind, image_size=32, in_channels=4, class_names=names,
                           rank_tailor=8))  # fmt: skip


def batch(classes: int, n: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    y = torch.randperm(classes, generator=g)[:n]  # n distinct classes
    return (torch.randn(n, 4, 32, 32, generator=g), y, torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 4, 32, 32, generator=g))  # fmt: skip


def tensors_per_layer(model: DiT) -> float:
    """Tailor parameter tensors per gated layer (0 for a dense model): the bank is one tensor for
    every layer and group."""
    gated = len(model.gated)
    return (1 if model.tailors is not None else 0) / max(gated, 1)


def training_parts(model: DiT, kind: bool):
    """The optimiser and EMA a run gives this model: KIND as the training loop has them (row
    banks masked), dense as a user would otherwise train it (torch's fused AdamW, a plain EMA)."""
    if kind:
        opt, names, banks = masked_adamw(model, 1e-4)
        named = dict(model.named_parameters())
        return opt, EMA([(n, named[n]) for n in names], 0.999, banks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return opt, EMA(list(model.named_parameters()), 0.999)


def _peak_step(size: str, classes: int, kind: bool, queue) -> None:
    """In a fresh process: one training step, then the process's peak resident memory (GiB)."""
    torch.set_num_threads(1)
    keep_freed_memory()
    model = build(size, classes, kind)
    opt, ema = training_parts(model, kind)
    x, y, t, noise = batch(classes)
    rows = model.present_rows(y)
    Diffusion(DiffusionConfig()).loss(model, x, y, t, noise, model.route(y)).mean().backward()
    if kind:
        keep_rows(model.row_banks(), rows)
        opt.set_rows(rows)
    opt.step()
    ema.update(rows)
    # VmHWM, this address space's peak: ru_maxrss would carry over the parent's across exec
    status = Path("/proc/self/status").read_text().split("\n")
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    queue.put(peak_kib / 2**20)  # KiB -> GiB


def peak_memory(size: str, classes: int, kind: bool) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_step, args=(size, classes, kind, queue))
    proc.start()
    proc.join()  # one float on the queue: it fits the pipe, so joining first cannot deadlock
    if proc.exitcode != 0:  # a crashed child would otherwise leave queue.get() waiting forever
        raise SystemExit(f"the peak-memory step of {size}:{classes} failed (exit {proc.exitcode})")
    return queue.get(timeout=60)


def measure(case: str, repeats: int, step_repeats: int) -> dict:
    size, _, count = case.partition(":")
    classes = int(count)
    torch.manual_seed(0)
    models = {k: build(size, classes, k == "kind") for k in ("kind", "dense")}
    parts = {k: training_parts(m, k == "kind") for k, m in models.items()}
    diffusion = Diffusion(DiffusionConfig())
    x, y, t, noise = batch(classes)
    rows = models["kind"].present_rows(y)
    parts["kind"][0].set_rows(rows)

    def fwd_bwd(k):  # as the loop: fresh gradients, the route built for the batch
        def run():
            models[k].zero_grad(set_to_none=True)
            diffusion.loss(models[k], x, y, t, noise, models[k].route(y)).mean().backward()

        return run

    fb = timed({k: fwd_bwd(k) for k in models}, repeats, 1, torch.device("cpu"))
    banks = models["kind"].row_banks()
    raw = {key: bank.grad for key, bank in banks.items()}  # the last backward's

    def kind_step():  # as the loop: the banks' gradients cut to the batch's rows, then the step
        for key, bank in banks.items():  # only the banks' gradients change in a step: restoring
            bank.grad = raw[key]  # every parameter's would time 0.8 ms of this harness as KIND's
        keep_rows(banks, rows)
        parts["kind"][0].step()

    # the updates take milliseconds where the forward takes seconds: more repeats for the same
    # time make their medians steady (their ratio moved by ±0.05 over 5)
    opt = timed({"kind": kind_step, "dense": parts["dense"][0].step}, step_repeats, 2,
                torch.device("cpu"))  # fmt: skip
    ema = timed({k: lambda k=k: parts[k][1].update(rows) for k in models}, step_repeats, 2,
                torch.device("cpu"))  # fmt: skip
    out = {"case": case}
    for k, m in models.items():
        out[k] = {
            "tensors": len(list(m.parameters())),
            "tailor_tensors_per_layer": tensors_per_layer(m),
            "fwd_bwd_s": fb[k],
            "optimizer_s": opt[k],
            "ema_s": ema[k],
            "peak_gib": peak_memory(size, classes, k == "kind"),
        }
    return out


def table(rows: list[dict]) -> str:
    lines = ["| case | tensors KIND / dense | tailor tensors / gated layer | fwd+bwd KIND / dense "
             "| ratio | optimiser + EMA KIND / dense | ratio | peak memory KIND / dense |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        k, d = r["kind"], r["dense"]
        ke, de = k["optimizer_s"] + k["ema_s"], d["optimizer_s"] + d["ema_s"]
        lines.append(
            f"| {r['case']} | {k['tensors']:,} / {d['tensors']:,} | {k['tailor_tensors_per_layer']:.2f} "
            f"| {k['fwd_bwd_s']:.2f} / {d['fwd_bwd_s']:.2f} s | {k['fwd_bwd_s'] / d['fwd_bwd_s']:.2f} "
            f"| {ke * 1e3:.0f} / {de * 1e3:.0f} ms | {ke / de:.2f} "
            f"| {k['peak_gib']:.2f} / {d['peak_gib']:.2f} GiB |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--cases", nargs="+", type=case, default=list(CASES), help="SIZE:CLASSES, e.g. DiT-S/4:150"
    )
    ap.add_argument("--repeats", type=int, default=5, help="forward + backward repeats")
    ap.add_argument("--step-repeats", type=int, default=40, help="optimiser and EMA repeats")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the training loop does on a CPU
    rows = [measure(case, args.repeats, args.step_repeats) for case in args.cases]
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 16 of 16 distinct classes, "
          f"median of {args.repeats} (optimiser and EMA: of {args.step_repeats})\n")  # fmt: skip
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
