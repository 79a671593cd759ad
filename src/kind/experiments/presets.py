"""The demo's settings: pre-training sources with their transfer tasks on the bundled data, and
named presets of sizes, steps, methods, seeds, guidance scales and budgets."""

from __future__ import annotations

from dataclasses import dataclass, fields


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
    # KIND-ify against KIND from scratch at equal total steps, on the first source (0: off): a
    # KIND pre-training started from the dense pre-training's model (`train.init_from`) for this
    # many steps, against KIND from scratch for pretrain_steps + kindify_steps steps (seed 0: the
    # KIND pre-training continued); both deployed and transferred to the source's tasks with KIND
    # (first seed)
    kindify_steps: int = 0
    # FID against size, per source (empty: off): its KIND model for all source classes truncated
    # to these fractions of its parameter count (and to the smallest count the budget rule
    # reaches), against the dense DiT truncated by the SVD of its weights to the same counts
    size_fractions: tuple[float, ...] = ()
    # sample draws (seeds) of each evaluation the two comparisons above rest on: a one-seed run's
    # comparison can only be set against the sampling noise of its evaluation
    noise_draws: int = 3


def saved_preset(settings: dict) -> Preset:
    """The preset a demo ran with, from its settings.json: lists back to tuples, the fields this
    version added since at their defaults."""
    known = {f.name for f in fields(Preset)}
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
                     if k in known})  # fmt: skip


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
    # on 2 cores (2 jobs of 1 thread); the pre-training is the default preset's.
    # Added later, run on top of a finished paper run (~1 h on 2 cores): KIND-ify for 500 steps
    # (a fifth of the pre-training and as long as a transfer: time for the fresh tailors to take
    # up the classes) against KIND from scratch at 2,500 + 500 steps (the KIND pre-training
    # continued, the same run as from scratch: see `demo.extras`), each transferred to both tasks
    # (4 transfers); FID against size at 100, 80, 70, 55 and 40% of each KIND model's count (the
    # rule cannot take KIND for all classes below ~62% of its count on digits and ~74% on the
    # wide source, whose 16 tailor groups are untouched by it: the lower sizes are the dense
    # DiT's alone; the rule's floor is added as a point)
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
        kindify_steps=500,
        size_fractions=(1.0, 0.8, 0.7, 0.55, 0.4),
        noise_draws=3,
    ),
}
