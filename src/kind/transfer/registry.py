"""The one registry of transfer methods: what each is called, what it trains, how its start model
is built, and how reports name it. The CLI's `--method` help, the demo's presets, the report and
the ablations all read this table.

Every method builds a `Start` from a source (a parts directory for the KIND family, a dense run or
model directory for the baselines) and the new classes; the ordinary training loop then trains
whatever has requires_grad.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn

from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT
from kind.store.load import load_model
from kind.transfer import baselines
from kind.transfer.kind import inherit_learngenes


@dataclass(frozen=True)
class Start:
    """A transfer's initial model (requires_grad set on what trains) and what its run records."""

    model: nn.Module
    diffusion: DiffusionConfig
    meta: dict  # recorded in the run's run.json under "transfer"
    export: Callable[[nn.Module], DiT] | None  # trained model -> plain DiT; None: save as is


@dataclass(frozen=True)
class Method:
    name: str  # what --method takes
    family: str  # "kind": from a parts directory; "baseline": adapts a dense pre-trained DiT
    label: str  # how reports name it
    summary: str  # what it trains, for --help
    start: Callable[..., Start]  # (source, class_names, *, class_to_group, train_learngenes,
    #                               budget, rank_tailor, null_tailor, seed) -> Start
    budgeted: bool = False  # whether a budget sizes what it trains (--budget, --match-kind)

    @property
    def is_kind(self) -> bool:
        return self.family == "kind"


def _start_kind(source, class_names, *, carry_tailors: bool = False, unfrozen: bool = False,
                train_sigma: bool = False, class_to_group=None, train_learngenes=False,
                budget=None, rank_tailor=None, null_tailor=False, seed=0) -> Start:  # fmt: skip
    """Learngenes of the parts directory `source`, fresh (or carried) tailors."""
    if budget is not None:
        raise ValueError(
            "--budget and --match-kind size a baseline's adapter; a KIND transfer trains what its "
            "tailors hold (their rank: --rank-tailor)"
        )
    train_learngenes = train_learngenes or unfrozen
    model, diffusion = inherit_learngenes(
        source,
        class_names,
        class_to_group=class_to_group,
        train_learngenes=train_learngenes,
        carry_tailors=carry_tailors,
        rank_tailor=rank_tailor,
        train_sigma=train_sigma,
        null_tailor=null_tailor,
        seed=seed,
    )
    learngenes = "trained" if train_learngenes else "σ trained" if train_sigma else "frozen"
    detail = (f"learngenes {learngenes}, tailors "
              + ("from the source" if carry_tailors else "fresh")
              + (", null tailor" if null_tailor else ""))  # fmt: skip
    meta = {"train_learngenes": train_learngenes, "null_tailor": null_tailor, "detail": detail}
    return Start(model, diffusion, meta, None)


def _start_baseline(name: str, budgeted: bool, source, class_names, *, class_to_group=None,
                    train_learngenes=False, budget=None, rank_tailor=None, null_tailor=False,
                    seed=0) -> Start:  # fmt: skip
    """The dense run or model `source` adapted by baseline `name`; its record holds the budget
    only where the budget sized the adapter (`budgeted`)."""
    if null_tailor or rank_tailor is not None:
        raise ValueError(
            f"--null-tailor and --rank-tailor shape KIND's tailors; baseline {name!r} has none "
            "(a baseline adapts its whole unconditional network already)"
        )
    if class_to_group is not None:  # it would be recorded as the run's and ignored
        raise ValueError(
            f"group_file groups KIND's tailors; baseline {name!r} has none (it adapts one "
            "network for all classes): leave group_file out of its config"
        )
    if train_learngenes:
        raise ValueError(
            f"--train-learngenes trains a KIND transfer's learngenes; baseline {name!r} has none "
            "(what it trains is fixed by the method: --method full trains every parameter)"
        )
    dense, diffusion, _ = load_model(Path(source))
    if dense.config.kind:
        raise ValueError(
            f"method {name!r} adapts a dense pre-trained DiT, but {source} holds a KIND "
            "model; pass a run of `kind-dit train --model dense` (KIND models transfer with "
            "--method kind from their parts directory)"
        )
    adapted = baselines.adapt(name, dense, class_names, budget=budget, seed=seed)
    meta = {"detail": adapted.detail} | ({"budget": budget} if budgeted else {})
    return Start(adapted.model, diffusion, meta, adapted.export)


def _baseline(name: str, label: str, summary: str, budgeted: bool = False) -> Method:
    return Method(name, "baseline", label, summary, partial(_start_baseline, name, budgeted),
                  budgeted)  # fmt: skip


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("kind", "kind", "KIND (learngenes frozen, fresh tailors)",
               "learngenes (frozen) + fresh tailors", _start_kind),
        Method("kind-sigma", "kind", "KIND + learngene σ trained (FINE)",
               "fresh tailors + the learngenes' singular values σ (U, V frozen)",
               partial(_start_kind, train_sigma=True)),
        Method("kind-tailors", "kind", "KIND + source tailors (ablation)",
               "also the source's tailors (ablation)", partial(_start_kind, carry_tailors=True)),
        Method("kind-unfrozen", "kind", "KIND, learngenes trained too (ablation)",
               "learngenes trained too (ablation)", partial(_start_kind, unfrozen=True)),
        _baseline("full", "full fine-tuning", "every parameter"),
        _baseline("lora", "LoRA", "LoRA (peft), rank matched to --budget", budgeted=True),
        _baseline("pissa", "PiSSA", "PiSSA (peft), rank matched to --budget", budgeted=True),
        _baseline("oft", "OFT", "OFT (peft), block size matched to --budget", budgeted=True),
        _baseline("svdiff", "SVDiff", "spectral shifts"),
        _baseline("difffit", "DiffFit", "biases and branch scales"),
        _baseline("heurlg", "Heur-LG", "heuristic learngene: inherited embedders and first half"),
        _baseline("scratch", "from scratch", "a dense DiT trained from nothing"),
    )
}  # fmt: skip


def get(name: str) -> Method:
    """The method called `name`; a clear error naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown transfer method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def check_budget(name: str, option: str) -> None:
    """Refuse a budget (given with `option`) for a baseline it would not size: what such a method
    trains is fixed by the architecture, so the run would record a budget it ignored. (A KIND
    method's own refusal comes when it starts: its message names --rank-tailor.)"""
    method = get(name)
    if not method.is_kind and not method.budgeted:
        sized = ", ".join(m.name for m in METHODS.values() if m.budgeted)
        raise ValueError(
            f"{option} sizes the adapter of methods {sized}; --method {name} trains what its "
            f"architecture fixes ({method.summary}), so the budget would be ignored: leave "
            f"{option} out, or choose one of those methods"
        )


def help_text() -> str:
    """One line per method, for --method's help."""
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
