"""The baselines KIND's transfer is compared against (docs/KIND.md, "Novel classes", "Large domain shift").

Each one adapts a dense DiT pre-trained on source classes to new classes with the ordinary training
loop: full fine-tuning, parameter-efficient fine-tuning (LoRA, PiSSA, OFT through peft; SVDiff and
DiffFit written here, peft has neither), the heuristic learngene Heur-LG, and training from scratch.
Every method starts from the same new-class model: the source's class-agnostic tensors and null row,
fresh N(0, 1) label rows for the new classes (always trainable: the old classes' rows mean nothing
for the new ones). `Adapted.export` folds whatever a method added back into a plain dense DiT, so
every baseline deploys as the same architecture and samples/evaluates through the same code.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from peft import LoraConfig, OFTConfig, PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from kind.core.gated import Linear, Route
from kind.core.model import DiT, ModelConfig, count_params, load_state

TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")  # the block matrices KIND decomposes
TARGET_PATTERN = r"blocks\.\d+\.(attn\.(q|k|v|proj)|mlp\.(fc1|fc2))"
_ROW = "y_embedder.table"  # new-class label rows: trainable in every method


@dataclass
class Adapted:
    model: nn.Module  # forward(x, t, y), .config (dense, new classes), .null_id; requires_grad set
    trainable: int  # number of trainable parameters
    detail: str  # what trains, e.g. "LoRA rank 24 on q,k,v,proj,fc1,fc2 + label rows"
    export: Callable[[nn.Module], DiT]  # trained model -> plain dense DiT (adapters merged)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed a model's initialisation without disturbing the caller's global RNG stream. CPU only:
    DiT's init runs on CPU, and peft creates (and initialises) adapters on CPU before moving them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def target_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every block matrix an adapter goes on."""
    return [
        (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if re.fullmatch(TARGET_PATTERN, n)
    ]


# ---- peft adapters: LoRA, PiSSA, OFT ----------------------------------------------------------


@dataclass(frozen=True)
class _Peft:
    label: str  # name and size unit for the detail line, e.g. "LoRA rank"
    config: Callable[[int], PeftConfig]  # size -> peft config on TARGET_PATTERN
    cost: Callable[[int, int, int], int]  # (size, in, out) -> adapter parameters of one layer
    sizes: Callable[[list[tuple[int, int]]], list[int]]  # admissible sizes for these layers
    default: int  # size when no budget is given


def _lora(init: bool | str) -> Callable[[int], PeftConfig]:
    # alpha = r: scaling 1 at every rank (PiSSA's choice; the LoRA paper fixes alpha, so its
    # scaling alpha/r shrinks as r grows): here a larger rank's update grows with its rank, which
    # the budget curves' 4x LoRA runs were made with.
    # PiSSA ("pissa") starts A, B at the top-r singular triples of W and leaves the residual
    # W - BA as the frozen base weight, so the start model computes what the source does.
    return lambda r: LoraConfig(
        r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGET_PATTERN, init_lora_weights=init
    )


def _ranks(shapes: list[tuple[int, int]]) -> list[int]:
    return list(range(1, min(min(s) for s in shapes) + 1))


def _oft_blocks(shapes: list[tuple[int, int]]) -> list[int]:
    # OFT rotates the input in blocks of b features; b must divide every layer's input width, or
    # peft silently adjusts it per layer and the count would no longer be the one chosen.
    return [
        b for b in range(2, min(i for i, _ in shapes) + 1) if all(i % b == 0 for i, _ in shapes)
    ]


_PEFT = {
    "lora": _Peft("LoRA rank", _lora(True), lambda r, i, o: r * (i + o), _ranks, 8),
    "pissa": _Peft("PiSSA rank", _lora("pissa"), lambda r, i, o: r * (i + o), _ranks, 8),
    # peft stores each block's skew-symmetric generator as its b(b-1)/2 upper-triangle entries.
    "oft": _Peft(
        "OFT block size",
        # the exact Cayley map (a solve per block), as the OFT paper: peft's default truncated
        # Neumann series drifts from orthogonal as the generators grow in training
        lambda b: OFTConfig(
            r=0, oft_block_size=b, target_modules=TARGET_PATTERN, use_cayley_neumann=False
        ),  # fmt: skip
        lambda b, i, o: (i // b) * (b * (b - 1) // 2),
        _oft_blocks,
        32,
    ),
}


def size_for_budget(
    method: str, shapes: list[tuple[int, int]], budget: int | None, fixed: int = 0
) -> int:
    """The rank (LoRA, PiSSA) or block size (OFT) whose adapter count plus `fixed` (the label
    rows) comes closest to `budget`; the method's default when there is no budget."""
    spec = _PEFT[method]
    sizes = spec.sizes(shapes)
    if budget is None:
        return min(sizes, key=lambda s: abs(s - spec.default))
    return min(
        sizes, key=lambda s: abs(fixed + sum(spec.cost(s, i, o) for i, o in shapes) - budget)
    )


def _peft_adapter(method: str) -> Callable[[DiT, int | None], str]:
    def add(model: DiT, budget: int | None) -> str:
        rows = sum(p.numel() for n, p in model.named_parameters() if n.startswith(_ROW))
        size = size_for_budget(method, target_shapes(model), budget, rows)
        # peft wraps our `gated.Linear` (an nn.Linear) as a plain Linear and hands the extra
        # positional `route` through to it, so blocks keep calling layer(x, route).
        inject_adapter_in_model(_PEFT[method].config(size), model)
        return f"{_PEFT[method].label} {size} on {','.join(TARGETS)} + label rows"

    return add


# ---- SVDiff and DiffFit (not in peft) --------------------------------------------------------


class SpectralShift(nn.Module):
    """SVDiff (Han et al. 2023): W = U diag(σ) Vᵀ frozen (every one of the min(out, in) singular
    values, no truncation), a trained spectral shift δ (init 0), W' = U diag(relu(σ + δ)) Vᵀ. Its
    count, min(out, in) per matrix, is fixed by the shapes. Keeps the layer's (x, route) call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        dtype = linear.weight.dtype
        self.register_buffer("U", u.to(dtype))  # [out, k]
        self.register_buffer("sigma", s.to(dtype))  # [k]
        self.register_buffer("Vh", vh.to(dtype))  # [k, in]
        self.delta = nn.Parameter(torch.zeros_like(self.sigma))
        self.bias = linear.bias

    def weight(self) -> torch.Tensor:
        return (self.U * F.relu(self.sigma + self.delta)) @ self.Vh  # [out, in]

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """The dense layer computing W' x + b."""
        dense = nn.utils.skip_init(
            Linear, self.Vh.shape[1], self.U.shape[0], device=self.U.device, dtype=self.U.dtype
        )
        dense.weight.copy_(self.weight())
        dense.bias.copy_(self.bias)
        return dense


class BranchScale(nn.Module):
    """DiffFit's γ (Xie et al. 2023; per channel, init 1) on a block branch (attention or MLP): the
    branch output times γ, with the branch's (x, route) call kept so the block code is untouched."""

    def __init__(self, branch: nn.Module, out: str):
        super().__init__()
        self.branch, self.out = branch, out  # `out`: the branch's output projection (proj, fc2)
        layer = getattr(branch, out)
        self.gamma = nn.Parameter(torch.ones_like(layer.bias))

    def forward(self, x: torch.Tensor, route: Route | None) -> torch.Tensor:
        return self.branch(x, route) * self.gamma

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The branch with γ folded into its output projection (in place: export works on a copy)."""
        layer = getattr(self.branch, self.out)
        layer.weight.mul_(self.gamma[:, None])
        layer.bias.mul_(self.gamma)
        return self.branch


def _svdiff(model: DiT, budget: int | None) -> str:
    shifts = sum(min(s) for s in target_shapes(model))
    for name, module in list(model.named_modules()):
        if re.fullmatch(TARGET_PATTERN, name):
            _replace(model, name, SpectralShift(module))
    return f"SVDiff spectral shifts on {','.join(TARGETS)} ({shifts}, fixed by the shapes) + label rows"


def _difffit(model: DiT, budget: int | None) -> str:
    # DiT's LayerNorms have no affine parameters, so DiffFit's norm terms do not exist here.
    for block in model.blocks:
        block.attn, block.mlp = BranchScale(block.attn, "proj"), BranchScale(block.mlp, "fc2")
    return "DiffFit: biases, per-block branch scales γ, label rows (LayerNorms have no affine)"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


# ---- the methods ------------------------------------------------------------------------------


def _block(name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _heurlg_inherits(name: str, depth: int) -> bool:
    """Heur-LG: the embedders (null row included) and the first half of the blocks."""
    if name.startswith(("x_embedder.", "t_embedder.", "y_embedder.null")):
        return True
    b = _block(name)
    return b is not None and b < depth // 2


@dataclass(frozen=True)
class Recipe:
    inherits: Callable[[str, int], bool]  # (tensor name, depth) -> copied from the source
    trains: Callable[[str], bool]  # parameter name -> trainable (label rows always are)
    add: Callable[[DiT, int | None], str] | None = None  # adapters, in place; returns the detail
    detail: str = ""  # for methods without adapters


def _all(*_: object) -> bool:
    return True


def _class_agnostic(name: str, depth: int) -> bool:
    return not name.startswith(_ROW)


RECIPES = {
    "full": Recipe(_class_agnostic, _all, detail="full fine-tuning (every parameter)"),
    "lora": Recipe(_class_agnostic, lambda n: "lora_" in n, _peft_adapter("lora")),
    "pissa": Recipe(_class_agnostic, lambda n: "lora_" in n, _peft_adapter("pissa")),
    "oft": Recipe(_class_agnostic, lambda n: ".oft_R." in n, _peft_adapter("oft")),
    "svdiff": Recipe(_class_agnostic, lambda n: n.endswith(".delta"), _svdiff),
    "difffit": Recipe(_class_agnostic, lambda n: n.endswith((".bias", ".gamma")), _difffit),
    "heurlg": Recipe(
        _heurlg_inherits, _all, detail="Heur-LG: embedders + first half of the blocks inherited"
    ),
    "scratch": Recipe(lambda n, d: False, _all, detail="dense DiT from scratch"),
}


def adapt(
    method: str,
    source: DiT,
    class_names: list[str],
    *,
    budget: int | None = None,
    seed: int = 0,
) -> Adapted:
    """A model for `class_names` adapted from the dense pre-trained `source` (left untouched) by
    `method`. `budget` (trainable parameters) sets the LoRA/PiSSA rank or OFT block size; the other
    methods' counts are fixed by the architecture."""
    if method not in RECIPES:
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(RECIPES)}")
    if source.config.kind:
        raise ValueError(
            "baselines adapt a dense DiT (model.kind=false); a KIND model transfers its "
            "learngenes with kind.transfer.kind.inherit_learngenes"
        )
    spec = RECIPES[method]
    config = replace(source.config, class_names=list(class_names), class_to_group=None, groups=None)
    with _seeded(seed):
        model = DiT(config)
        depth = len(source.blocks)
        inherited = {n: t for n, t in source.state_dict().items() if spec.inherits(n, depth)}
        model.load_state_dict(inherited, strict=False)
        model.to(next(source.parameters()).device)
        detail = spec.add(model, budget) if spec.add else spec.detail
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(_ROW) or spec.trains(name))
    return Adapted(model, count_params(model, trainable=True), detail, export)


def _folded(module: nn.Module) -> nn.Module | None:
    """The plain module computing what an adapter module computes, or None for a plain one."""
    if isinstance(module, BaseTunerLayer):
        module.merge()
        return module.get_base_layer()
    if isinstance(module, (SpectralShift, BranchScale)):
        return module.folded()
    return None


@torch.no_grad()
def export(model: nn.Module) -> DiT:
    """A plain dense DiT (the dense DiT's keys exactly) computing what the adapted `model` computes:
    peft adapters merged, spectral shifts and branch scales folded. `model` is not changed."""
    # A copy: peft's merge writes into the frozen base weight, which the training loop's EMA swap
    # (it restores trainable parameters only) would never undo.
    work = copy.deepcopy(model)
    for name, module in list(work.named_modules()):
        plain = _folded(module)
        if plain is not None:
            _replace(work, name, plain)
    with _seeded(0):
        dense = DiT(ModelConfig.from_dict(work.config.to_dict()))
    dense.to(next(work.parameters()).device)
    load_state(dense, work.state_dict(), "the adapted model")
    return dense.eval()
