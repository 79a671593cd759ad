"""How a KIND model comes apart and folds back: which tensors are learngene and which belong to a
tailor group, and merging one class (or none) into plain dense weights.

These are operations on models in memory; `kind.store.parts` writes and reads them as files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from kind.core.model import DiT, ModelConfig, load_state

_TAILOR = re.compile(r"\.tailors\.(\d+)\.")
_ROW = re.compile(r"y_embedder\.rows\.(\d+)")


class PartsError(ValueError):
    """A parts directory that cannot be used as asked; the message says what to do."""


BANKS = ("tailors.rows", "y_embedder.table")  # a model's tensors whose rows are groups or classes


def group_of(name: str, config: ModelConfig) -> int | None:
    """The tailor group a tensor of the per-group form (`DiT.part_state`) belongs to (tailor
    factors and class label rows), or None for the learngene (everything class-agnostic, the
    null row included)."""
    if m := _TAILOR.search(name):
        return int(m.group(1))
    if m := _ROW.fullmatch(name):
        return config.tau[int(m.group(1))]
    return None


def split_state(model: DiT) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """(learngene tensors, {group: tailor tensors}) of a KIND model's state dict."""
    if not model.config.kind:
        raise PartsError("only a KIND model decomposes; this is a dense DiT")
    learngene: dict[str, torch.Tensor] = {}
    tailors: dict[int, dict[str, torch.Tensor]] = {g: {} for g in model.config.held_groups}
    for name, tensor in model.part_state().items():
        g = group_of(name, model.config)
        (learngene if g is None else tailors[g])[name] = tensor
    return learngene, tailors


def resolve_classes(config: ModelConfig, names: list[str] | None) -> list[int]:
    """Class ids for class names (None: every class the model holds); clear error for unknown ones.

    A number names a class by its id (ImageNet's 207) when no class name is a number (MNIST's
    "7" is a name): the way to pick a class whose name holds a comma ("tench, Tinca tinca"),
    which a comma-separated `--classes` cannot spell."""
    if names is None:
        return list(config.held_classes)
    held = {config.class_names[c]: c for c in config.held_classes}
    by_id = not any(name.isdigit() for name in config.class_names)
    if by_id:
        held |= {str(c): c for c in config.held_classes}
    unknown = [n for n in names if n not in held]
    if unknown:
        shown = [config.class_names[c] for c in config.held_classes]
        more = f" ... ({len(shown)} in all)" if len(shown) > 20 else ""
        ids = " (or their class ids)" if by_id else ""
        raise PartsError(f"unknown class(es) {unknown}; this model holds {shown[:20]}{more}{ids}")
    return [held[n] for n in names]


@dataclass(frozen=True)
class NullSplit:
    """Which samples of a batch a `MergedDiT` runs through its unconditional network, read on the
    host once per batch (once per sampling run) so that its forward neither syncs with the device
    nor, compiled, has data-dependent shapes. `order` [B] puts the `conditional` samples of the
    class first and the null samples after them; `inverse` [B] puts them back."""

    order: torch.Tensor
    inverse: torch.Tensor
    conditional: int


class MergedDiT(nn.Module):
    """One class folded into a dense DiT, plus the unconditional dense DiT (the learngene, and the
    null tailor where the model has one) for the null class, so classifier-free guidance works on
    a merged model too. Same call signature as DiT."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.cond = DiT(config)
        self.uncond = DiT(replace(config, class_names=[]))
        self.null_id = self.cond.null_id

    def route(self, y: torch.Tensor, blocked: bool = True) -> NullSplit:
        """The split of labels y between the two networks (reads y on the host; checks it holds
        only this model's class and the null class). `blocked` is DiT.route's: both networks are
        dense, so there is no other route to choose."""
        y = y.cpu()
        self.cond.check_classes(y)
        order = torch.argsort(y == self.null_id, stable=True)
        return NullSplit(order, torch.argsort(order), int((y != self.null_id).sum()))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, route: NullSplit | None = None
    ) -> torch.Tensor:
        """`route`: from `self.route(y)`, built once per batch by the caller (sampling does);
        without one the forward reads y on the host."""
        split = self.route(y) if route is None else route
        n, null = split.conditional, torch.full_like(y, self.uncond.null_id)
        if n == len(y):
            return self.cond(x, t, y)
        if n == 0:
            return self.uncond(x, t, null)
        order = split.order.to(x.device)
        x, t, y = x[order], t[order], y[order]  # the class's n samples first, then the null ones
        out = torch.cat([self.cond(x[:n], t[:n], y[:n]), self.uncond(x[n:], t[n:], null[n:])])
        return out[split.inverse.to(x.device)]  # [B, C(2C), H, W] in the batch's order


@torch.no_grad()
def merge(model: DiT, class_name: str | None) -> DiT | MergedDiT:
    """Fold the learngene plus one class's tailor into plain dense weights (docs/KIND.md invariant 4).

    `class_name` None gives the unconditional dense DiT (learngene, plus the null tailor if the
    model has one); a class gives a `MergedDiT` whose conditional network computes the full model's
    output for that class."""
    if not model.config.kind:
        raise PartsError("merge needs a KIND model; this one is already dense")
    dense = dict(kind=False, class_to_group=None, groups=None, null_tailor=False)
    if class_name is None:
        return _fold(model, None, replace(model.config, class_names=[], **dense))
    (c,) = resolve_classes(model.config, [class_name])  # a name, or an id
    dense_cfg = replace(model.config, class_names=[model.config.class_names[c]], **dense)
    merged = MergedDiT(dense_cfg)
    merged.cond.load_state_dict(_fold(model, c, dense_cfg).state_dict())
    merged.uncond.load_state_dict(_fold(model, None, merged.uncond.config).state_dict())
    return merged.eval()


def _fold(model: DiT, c: int | None, dense_cfg: ModelConfig) -> DiT:
    """A dense DiT with class c's weights (c None: the unconditional model's) folded in; label row
    c -> row 0."""
    dense = DiT(dense_cfg).to(next(model.parameters()).device)
    state = {}
    group = model.config.null_group if c is None else model.config.tau[c]
    kind_layers = dict(model.kind_layers())
    for name, tensor in model.part_state().items():
        if ".tailors." in name or (_ROW.fullmatch(name) and name != f"y_embedder.rows.{c}"):
            continue
        owner, _, leaf = name.rpartition(".")
        if owner in kind_layers:
            if leaf in ("U", "S", "V"):
                layer = kind_layers[owner]
                tailor = group is not None and layer.rank_tailor
                linear = layer.merge(model.tailors.chunk(layer, group) if tailor else None)
                state[f"{owner}.weight"] = linear.weight
                if linear.bias is not None:
                    state[f"{owner}.bias"] = linear.bias
            continue
        state["y_embedder.rows.0" if _ROW.fullmatch(name) else name] = tensor
    load_state(dense, state, "the merged weights")
    return dense.eval()
