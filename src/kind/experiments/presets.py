"""The demo's settings: pre-training sources with their transfer tasks on the bundled data, and
named presets of sizes, steps, methods, seeds, guidance scales and budgets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str  # "novel" or "shift"
    spec: str  # its data spec
    title: str


@dataclass(frozen=True)
class Source:
    """A pre-training setting: the source classes and the tasks its learngenes transfer to."""

    name: str
    spec: str
    title: str
    tasks: tuple[Task, ...]
    prefix: str  # of its job names ("" for the first setting, whose names predate the others)


SOURCES = {
    "digits": Source(
        "digits",
        "mnist:0-5",
        "six digits",
        (
            Task("novel", "mnist:6-9", "novel classes (MNIST 6-9)"),
            Task("shift", "animals", "domain shift (animal silhouettes)"),
        ),
        "",
    ),
    # two domains at once: a learngene that has to serve digits and silhouettes alike
    "wide": Source(
        "wide",
        "mnist + animals:bear-elephant",
        "ten digits and six animals",
        (
            Task("novel", "animals:giraffe-zebra", "novel classes (the four held-out animals)"),
            Task("shift", "glyphs", "domain shift (letter glyphs)"),
        ),
        "wide/",
    ),
}


@dataclass(frozen=True)
class Preset:
    size: str = "tiny"
    pretrain_steps: int = 2500
    transfer_steps: int = 1000
    batch_size: int = 128
    transfer_batch_size: int | None = None  # None: `batch_size`
    lr: float = 1e-3
    sources: tuple[str, ...] = ("digits",)
    methods: tuple[str, ...] = ("kind", "kind-tailors", "lora", "full")  # registry names
    seeds: tuple[int, ...] = (0,)
    # methods run with every seed of `seeds`; the others with the first seed only (None: all)
    seeded_methods: tuple[str, ...] | None = None
    null_methods: tuple[str, ...] = ()  # KIND methods also run with a null tailor
    # budget curves: `budget_methods` also run at these multiples of KIND's budget (first seed)
    budget_scales: tuple[float, ...] = ()
    budget_methods: tuple[str, ...] = ("kind", "lora", "pissa", "oft")
    eval_per_class: int = 100  # samples per class for the final evaluation at `cfg_scale`
    curve_points: int = 4  # evaluations along training, for FID against steps (0: none)
    curve_per_class: int = 30
    sample_steps: int = 50  # DDIM steps when evaluating
    cfg_scale: float = 1.5
    cfg_scales: tuple[float, ...] = ()  # a guidance sweep of every transfer (empty: none)
    sweep_samples: int = 200  # samples per guidance scale, spread over the task's classes


PRESETS = {
    "quick": Preset(
        pretrain_steps=200,
        transfer_steps=100,
        batch_size=64,
        eval_per_class=20,
        curve_points=2,
        curve_per_class=10,
        sample_steps=20,
    ),
    "default": Preset(),
    # the claims re-tested: two sources, a guidance sweep for every transfer, budget curves
    # (KIND and LoRA at 1/4, 1 and 4x KIND's count), three seeds for KIND (with and without a
    # null tailor) and LoRA, whose comparison the verdicts rest on, one seed for the rest:
    # 64 transfers of 500 steps at batch 64, sized so the whole preset runs in one ~3 h session
    # on 2 cores (2 jobs of 1 thread); the pre-training is the default preset's
    "paper": Preset(
        transfer_steps=500,
        transfer_batch_size=64,
        sources=("digits", "wide"),
        methods=("kind", "lora", "kind-sigma", "kind-tailors", "pissa"),
        seeds=(0, 1, 2),
        seeded_methods=("kind", "lora"),
        null_methods=("kind",),
        budget_scales=(0.25, 4.0),
        budget_methods=("kind", "lora"),
        eval_per_class=20,
        curve_points=0,
        cfg_scales=(1.0, 1.25, 1.5, 2.0, 3.0),
        sweep_samples=100,
    ),
}
