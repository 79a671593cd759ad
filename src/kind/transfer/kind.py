"""KIND's transfer: a model for new classes that inherits the learngenes of a parts directory and
gets fresh tailors and label rows (docs/KIND.md, "Novel classes" and "Large domain shift"; invariant 5).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from kind.core.decomposition import BANKS, PartsError
from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT, ModelConfig, count_params, load_state
from kind.store.parts import load_learngene, read_manifest, read_part

log = logging.getLogger(__name__)


def inherit_learngenes(
    parts: str | Path,
    class_names: list[str],
    *,
    class_to_group: list[int] | None = None,
    train_learngenes: bool = False,
    carry_tailors: bool = False,
    rank_tailor: float | None = None,
    train_sigma: bool = False,
    null_tailor: bool = False,
    seed: int = 0,
) -> tuple[DiT, DiffusionConfig]:
    """A model for new classes: the learngenes of `parts` (frozen unless `train_learngenes`),
    freshly, randomly initialised tailors and label rows; nothing of the source's tailors.

    `train_sigma` trains the learngenes' singular values σ_G too, their directions U_G, V_G frozen
    (the FINE recipe: a few hundred parameters that let the shared network follow a new domain).
    `null_tailor` gives the null class a fresh tailor of its own, trained through label dropout,
    so the unconditional model of guidance is the target domain's, not the source's.

    `carry_tailors` is the ablation behind the domain-shift claim: new tailor group g starts from
    source tailor group g mod G instead of random (the class-specific knowledge of the old domain
    comes along); label rows stay fresh. `rank_tailor` gives the new tailors another rank than
    the source's (the learngenes are unchanged)."""
    parts = Path(parts)
    manifest = read_manifest(parts)
    source = ModelConfig.from_dict(manifest["model"])
    rank = source.rank_tailor if rank_tailor is None else rank_tailor
    if carry_tailors and rank != source.rank_tailor:
        raise PartsError("carried source tailors keep the source's tailor rank; drop rank_tailor")
    if source.null_tailor and not null_tailor:
        log.warning(
            "%s was pre-trained with a null tailor, so its learngenes alone never served as the "
            "unconditional model; without --null-tailor this transfer guides with them alone "
            "(pass --null-tailor to give the null class a fresh tailor)",
            parts,
        )
    config = replace(source, class_names=list(class_names), class_to_group=class_to_group,
                     groups=None, rank_tailor=rank, null_tailor=null_tailor)  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays its own
        torch.manual_seed(seed)
        model = DiT(config)
        load_learngene(model, parts)
        model.reset_tailors()  # fresh tailors outside the transferred learngene
    if carry_tailors:
        source_groups = sorted(int(g) for g in manifest["tailors"] if int(g) != source.null_group)
        state = model.part_state()
        for g in sorted(set(config.tau)):  # class groups; a null tailor always starts fresh
            src = source_groups[g % len(source_groups)]
            tensors = read_part(parts, manifest["tailors"][str(src)], str(src))
            state |= {
                k.replace(f".tailors.{src}.", f".tailors.{g}."): v
                for k, v in tensors.items()
                if f".tailors.{src}." in k
            }
        load_state(model, state, parts)
    sigmas = {f"{name}.S" for name, _ in model.kind_layers()} if train_sigma else set()
    for name, p in model.named_parameters():
        p.requires_grad_(train_learngenes or name in BANKS or name in sigmas)
    return model, DiffusionConfig.from_dict(manifest["diffusion"])


def kind_budget(parts: str | Path, class_names: list[str]) -> int:
    """Trainable parameters of a KIND transfer to these classes: the budget baselines match."""
    model, _ = inherit_learngenes(parts, class_names)
    return count_params(model, trainable=True)
