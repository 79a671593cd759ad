"""The demo's settings: the source and target tasks on the bundled data, and named presets of
sizes, steps, methods and seeds."""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "mnist:0-5"
TASKS = {"novel": "mnist:6-9", "shift": "animals"}
TASK_TITLES = {"novel": "novel classes (MNIST 6-9)", "shift": "domain shift (animal silhouettes)"}


@dataclass(frozen=True)
class Preset:
    size: str = "tiny"
    pretrain_steps: int = 2500
    transfer_steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    methods: tuple[str, ...] = ("kind", "kind-tailors", "lora", "full")  # registry names
    seeds: tuple[int, ...] = (0,)
    eval_per_class: int = 100  # samples per class for the final evaluation
    curve_points: int = 4  # evaluations along training, for FID against steps
    curve_per_class: int = 30
    sample_steps: int = 50  # DDIM steps when evaluating
    cfg_scale: float = 1.5


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
    # the default's pre-training, every transfer method, three seeds
    "paper": Preset(
        methods=(
            "kind",
            "kind-tailors",
            "kind-unfrozen",
            "full",
            "lora",
            "pissa",
            "oft",
            "svdiff",
            "difffit",
            "heurlg",
            "scratch",
        ),
        seeds=(0, 1, 2),
    ),
}
