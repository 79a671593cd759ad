"""A class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023), built from dense linears or
from KIND's class-gated SVD linears with one switch (`ModelConfig.kind`).

In the KIND form, the attention q, k, v, output projection and both MLP matrices of every block are
`KindLinear`s (learngenes + tailors); adaLN modulation, embeddings and the final layer are
class-agnostic (learngene side, dense unless `decompose_adaln`). The label embedding keeps one row
per class: row c travels with class c's tailors, the null row (classifier-free guidance) with the
learngenes. The null class activates no tailor, so the learngene-only network is the unconditional
model.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from kind.core.gated import (
    KindLinear,
    Linear,
    Route,
    TailorBank,
    fold,
    linears,
    make_route,
    route_to,
)
from kind.io import is_a, type_name

# name -> (depth, hidden size, heads); DiT-* as in the DiT paper, the small ones for CPUs.
SIZES: dict[str, tuple[int, int, int]] = {
    "DiT-XL": (28, 1152, 16),
    "DiT-L": (24, 1024, 16),
    "DiT-B": (12, 768, 12),
    "DiT-S": (12, 384, 6),
    "mini": (6, 192, 6),
    "tiny": (4, 128, 4),
}
PATCHES: dict[str, tuple[int, ...]] = {name: (2, 4, 8) for name in SIZES}
PATCHES |= {"mini": (2, 4, 7), "tiny": (2, 4, 7)}
DEFAULT_PATCH = {"mini": 7, "tiny": 7}  # 28x28 bundled data -> 16 tokens, fast on a CPU
SIZE_NAMES = tuple(f"{n}/{p}" for n in SIZES for p in PATCHES[n]) + tuple(DEFAULT_PATCH)


def parse_size(name: str) -> tuple[str, int]:
    """'DiT-B/2' -> ('DiT-B', 2); 'tiny' -> ('tiny', 7)."""
    base, _, patch = name.partition("/")
    if base not in SIZES or (not patch and base not in DEFAULT_PATCH):
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(SIZE_NAMES)}")
    p = int(patch) if patch else DEFAULT_PATCH[base]
    if p not in PATCHES[base]:
        raise ValueError(f"size {base} comes with patch {PATCHES[base]}, not {p}")
    return base, p


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model's architecture (saved as JSON beside its weights)."""

    size: str = "tiny"
    kind: bool = True  # False: a plain dense DiT
    image_size: int | None = 28  # None in a run config: the training data's
    in_channels: int | None = 1
    learn_sigma: bool = (
        False  # output 2C channels: ε/v and the variance interpolation (DiT's hybrid)
    )
    class_names: list[str] = field(default_factory=list)
    class_to_group: list[int] | None = None  # τ; None = identity (each class owns its tailors)
    groups: list[int] | None = (
        None  # tailor groups held; None = all (an assembled model holds fewer)
    )
    rank_learngene: float = 0.5  # components, or fraction (< 1) of min(in, out)
    rank_tailor: float = 8.0
    # per-layer learngene ranks that differ from rank_learngene (layer name -> components), as a
    # budget assembly (`kind.store.parts.assemble`, max_params) leaves them; None: none differ
    learngene_ranks: dict[str, int] | None = None
    tailor_sigma: float = 1e-2  # initial singular values of fresh tailors
    decompose_adaln: bool = False  # adaLN modulation as learngene-only SVD layers
    # the null class (classifier-free guidance) gets a tailor group of its own, so the
    # unconditional model can follow a transfer's target domain (docs/KIND.md, open question a)
    null_tailor: bool = False
    mlp_ratio: float = 4.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def tau(self) -> list[int]:
        return (
            self.class_to_group
            if self.class_to_group is not None
            else list(range(self.num_classes))
        )

    @property
    def null_group(self) -> int | None:
        """The null class's tailor group (after every class group), or None: no tailor."""
        return max(self.tau, default=-1) + 1 if self.kind and self.null_tailor else None

    @property
    def held_groups(self) -> list[int]:
        if not self.kind:
            return []
        if self.groups is not None:
            return list(self.groups)
        return sorted(set(self.tau)) + ([] if self.null_group is None else [self.null_group])

    @property
    def held_classes(self) -> list[int]:
        """Class ids whose label rows (and, for KIND, tailors) this model holds."""
        if not self.kind or self.groups is None:
            return list(range(self.num_classes))
        kept = set(self.groups)
        return [c for c, g in enumerate(self.tau) if g in kept]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A config as saved (model.json, a parts manifest, a checkpoint): every value of the
        type its field declares, so a damaged or hand-edited file is a ValueError naming the key,
        not a TypeError deep in the model."""
        if not isinstance(d, dict):
            raise ValueError(f"the model config is a {type(d).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            if not is_a(value, hints[key]):
                raise ValueError(
                    f"model config key {key!r} is {value!r:.100}, not a {type_name(hints[key])}; "
                    "the file is damaged or was edited by hand"
                )
        return cls(**d)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [grid*grid, dim] (MAE / DiT)."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)  # [M, d/2]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, d]

    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies, then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # [B, half]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, freq_dim], fp32
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # [B, hidden]: a model cast to bf16 too


class LabelEmbedder(nn.Module):
    """One table of class rows (row i: the i-th class the model holds) and the null row apart.

    A class's row travels with its tailors (the masked optimiser moves only the rows of classes in
    the batch); the null row is class-agnostic and travels with the learngenes."""

    def __init__(self, classes: list[int], num_classes: int, hidden: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(len(classes), hidden))
        self.null = nn.Parameter(torch.randn(hidden))
        row = torch.zeros(num_classes + 1, dtype=torch.long)
        row[classes] = torch.arange(len(classes))
        self.register_buffer("row_of", row, persistent=False)  # class id -> table row
        self.host_row_of = row.clone()  # the same on the host (not moved by .to): no device read

    def forward(self, y: torch.Tensor, null_id: int) -> torch.Tensor:
        # y [B] -> [B, hidden]; the null row enters every graph (DDP needs no unused parameters)
        null = self.null.expand(y.shape[0], -1)
        if self.table.shape[0] == 0:  # an unconditional model
            return null
        return torch.where((y == null_id)[:, None], null, self.table[self.row_of[y]])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, T, D] scaled and shifted per sample by [B, D] (broadcast over tokens)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention; its four linears are KIND layers in a KIND model (`linear`)."""

    def __init__(self, hidden: int, heads: int, linear):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor, route: Route | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (
            h.view(B, T, self.heads, D // self.heads).transpose(1, 2)
            for h in linears((self.q, self.k, self.v), x, route)
        )  # 3 x [B, heads, T, D/heads]
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # [B, heads, T, D/heads]
        return self.proj(out.transpose(1, 2).reshape(B, T, D), route)  # [B, T, D]


class Mlp(nn.Module):
    """DiT's MLP (tanh-GELU); both linears are KIND layers in a KIND model (`linear`)."""

    def __init__(self, hidden: int, inner: int, linear):
        super().__init__()
        self.fc1, self.fc2 = linear(hidden, inner), linear(inner, hidden)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor, route: Route | None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x, route)), route)  # [B, T, D] -> [B, T, inner] -> back


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, linear, adaln_linear):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, linear)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), linear)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), adaln_linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, route: Route | None) -> torch.Tensor:
        # c [B, D] -> [B, 6D] -> six [B, D]; each gate scales its branch per sample
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), route)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2), route)


class FinalLayer(nn.Module):
    """adaLN, then each token to its patch's output values (unpatchified by the model)."""

    def __init__(self, hidden: int, patch: int, out_channels: int, adaln_linear):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), adaln_linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, T, p*p*C_out]


class DiT(nn.Module):
    """Diffusion Transformer: (x [B, C, H, W], t [B], y [B]) -> [B, C_out, H, W].

    `y` holds class ids 0..K-1 into `config.class_names`, or K (`null_id`) for the null class.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        base, self.patch = parse_size(cfg.size)
        depth, hidden, heads = SIZES[base]
        unset = [k for k in ("image_size", "in_channels") if getattr(cfg, k) is None]
        if unset:  # a run config leaves them to the data; a model needs them
            raise ValueError(f"model config gives no {' or '.join(unset)}; a model needs both")
        if cfg.image_size < 1 or cfg.in_channels < 1:
            raise ValueError(
                f"model config has image_size {cfg.image_size}, in_channels {cfg.in_channels}; "
                "both must be positive"
            )
        if cfg.image_size % self.patch:
            fits = [f"{base}/{p}" for p in PATCHES[base] if cfg.image_size % p == 0]
            raise ValueError(
                f"image size {cfg.image_size} is not divisible by patch {self.patch} of size "
                f"{cfg.size}; choose a model size whose patch divides it: "
                f"{', '.join(f'--size {f}' for f in fits) or 'none of ' + base + chr(39) + 's'}"
            )
        if len(cfg.tau) != cfg.num_classes:
            raise ValueError(
                f"class_to_group has {len(cfg.tau)} entries for {cfg.num_classes} classes"
            )
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.null_id = cfg.num_classes
        self.held_ids = frozenset(cfg.held_classes) | {self.null_id}  # what check_classes allows
        self.grid = cfg.image_size // self.patch
        groups = cfg.held_groups
        if cfg.null_group is not None and cfg.null_group not in groups:
            raise ValueError(
                f"model.groups {groups} leaves out group {cfg.null_group}, the null class's "
                "tailor (model.null_tailor is on): without it the unconditional model would run "
                "learngene-only, unlike the model the groups came from; add the group"
            )
        rank_tailor = cfg.rank_tailor if groups else 0

        def linear(i: int, o: int) -> nn.Module:
            if not cfg.kind:
                return Linear(i, o)
            return KindLinear(i, o, cfg.rank_learngene, rank_tailor)

        def adaln_linear(i: int, o: int) -> nn.Module:
            if cfg.kind and cfg.decompose_adaln:
                return KindLinear(i, o, cfg.rank_learngene)
            return nn.Linear(i, o)

        self.x_embedder = nn.Conv2d(cfg.in_channels, hidden, self.patch, stride=self.patch)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(cfg.held_classes, cfg.num_classes, hidden)
        self.register_buffer("pos_embed", sincos_pos_embed(hidden, self.grid), persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, heads, cfg.mlp_ratio, linear, adaln_linear) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden, self.patch, self.out_channels, adaln_linear)
        ranks = dict(cfg.learngene_ranks or {}) if cfg.kind else {}  # a dense DiT has none
        for name, m in self.kind_layers():
            if name in ranks:
                m.resize_learngene(int(ranks.pop(name)))
        if ranks:
            raise ValueError(f"learngene_ranks names layers this model lacks: {sorted(ranks)}")
        # every tailor in one bank (a row per held group), gated layers in module order
        self.gated = [(n, m) for n, m in self.kind_layers() if m.rank_tailor]
        self.tailors = (
            TailorBank([m for _, m in self.gated], groups, cfg.tailor_sigma) if self.gated else None
        )
        # class id 0..K (K = null) -> bank row of its tailor group; -1: no tailor (the null class
        # without a null tailor, or a class this model does not hold)
        row = {g: i for i, g in enumerate(groups)}
        null_group = -1 if cfg.null_group is None else cfg.null_group
        held = set(cfg.held_classes)
        slot = [row.get(g, -1) if c in held else -1 for c, g in enumerate(cfg.tau)]
        slot.append(row.get(null_group, -1))
        self.register_buffer("slot_of", torch.tensor(slot, dtype=torch.long), persistent=False)
        self.host_slot_of = self.slot_of.clone()  # the host's copy: routes never read the device
        self.grad_checkpointing = False  # recompute block activations in backward (saves memory)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init (xavier linears, adaLN-Zero, zero output layer), KIND layers as SVDs of it;
        label rows N(0, 1) rather than DiT's N(0, 0.02), so that the class signal counts early in
        the short CPU runs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for m in self.t_embedder.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        zero_layers = [b.adaLN_modulation[-1] for b in self.blocks]
        zero_layers += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero_layers:
            if isinstance(m, KindLinear):
                m.init_from_dense(torch.zeros(m.out_features, m.in_features))
            else:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_tailors()

    def reset_tailors(self) -> None:
        """Fresh tailors for every group, outside each layer's current learngene subspace."""
        if self.tailors is not None:
            self.tailors.reset([m for _, m in self.gated])

    def kind_layers(self) -> list[tuple[str, KindLinear]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, KindLinear)]

    def check_classes(self, y: torch.Tensor) -> None:
        """A clear error for a class id this model does not hold (reads y on the host)."""
        present = set(y.tolist())
        missing = sorted(present - self.held_ids)
        if missing:
            names = self.config.class_names
            bad = [names[c] if 0 <= c < len(names) else str(c) for c in missing]
            kept = [names[c] for c in self.config.held_classes]
            raise ValueError(
                f"class(es) {bad} are not in this model, which holds {kept}; "
                "assemble a model with those classes from the parts directory"
            )

    def route(self, y: torch.Tensor, blocked: bool = True) -> Route | None:
        """The route of labels y (see `kind.core.gated.Route`), None for a dense model. Blocked:
        read on the host (call it once per batch, with CPU labels where you have them); static:
        no host sync, for compiled models. Labels on the host are checked against the classes
        the model holds (outside a compiled graph)."""
        if blocked or (y.device.type == "cpu" and not torch.compiler.is_compiling()):
            y = y.cpu()
            self.check_classes(y)
        if self.tailors is None:
            return None
        if blocked:
            return make_route(self.host_slot_of[y], blocked=True)
        table = self.host_slot_of if y.device.type == "cpu" else self.slot_of
        return make_route(table[y], blocked=False)

    def present_rows(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of the row banks that labels y (CPU) use: "tailors" (bank rows of their groups)
        and "labels" (table rows of their classes, the null row apart). The masked optimiser and
        EMA update exactly these rows; nothing else in a bank moves."""
        classes = torch.unique(y.cpu())
        classes = classes[classes != self.null_id]
        rows = {"labels": self.y_embedder.host_row_of[classes]}
        if self.tailors is not None:
            slots = torch.unique(self.host_slot_of[torch.unique(y.cpu())])
            rows["tailors"] = slots[slots >= 0]
        return rows

    def row_banks(self) -> dict[str, nn.Parameter]:
        """The parameters whose rows belong to groups or classes, by the key of `present_rows`."""
        banks = {"labels": self.y_embedder.table}
        return banks | ({"tailors": self.tailors.rows} if self.tailors is not None else {})

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, p*p*C] -> [B, C, H, W]
        B, p, g, C = x.shape[0], self.patch, self.grid, self.out_channels
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, route: Route | None = None
    ) -> torch.Tensor:
        """`route`: from `self.route(y)`, built once per batch by the caller; without one the
        model builds it (eager: blocked, reading y on the host; compiled: static)."""
        if route is None and (self.tailors is not None or y.device.type == "cpu"):
            # a model without tailors has no route, but its host labels are checked all the same
            route = self.route(y, blocked=not torch.compiler.is_compiling())
        order = None
        if route is not None:
            if route.rows.device != x.device:
                route = route_to(route, x.device)
            order = route.order
            if order is not None:  # sort once into group blocks so no layer has to (see Route)
                x, t, y = x[order], t[order], y[order]
            route = self.tailors.attach(replace(route, order=None))
            if torch.is_grad_enabled() and not (self.grad_checkpointing and self.training):
                # a step keeps every folded weight for its backward anyway: fold all layers at
                # once, a product a shape (inference folds layer by layer, freeing as it goes)
                layers = [m for _, m in self.gated]  # each runs on the B·T token rows
                route = replace(route, weights=fold(layers, route, x.shape[0] * self.grid**2))
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.null_id)  # [B, D]
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, c, route, use_reentrant=False)
            else:
                h = block(h, c, route)
        out = self.unpatchify(self.final_layer(h, c))  # [B, C_out, H, W]
        if order is not None:
            out = torch.empty_like(out).index_copy_(0, order, out)  # back to the input order
        return out

    def orthogonality_penalty(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over KIND layers of the orthogonality penalty for the learngene and the tailors of
        bank rows `rows` (the groups of the batch; never an absent group: invariant 2)."""
        chunks = (
            self.tailors.gather(rows) if rows is not None and self.tailors is not None else None
        )
        device = self.pos_embed.device.type
        # in fp32 under autocast too: bf16's step near 1 (2^-7) is coarser than the drift from
        # orthonormal columns the penalty is there to remove
        with torch.autocast(device, enabled=False):
            terms = [
                m.orthogonality_penalty(chunks[m.bank_slot] if chunks and m.rank_tailor else None)
                for _, m in self.kind_layers()
            ]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def orthogonality_error(self) -> float:
        bank = self.tailors
        chunks = bank.rows.detach().split(bank.widths, 1) if bank is not None else None
        return max(
            (m.orthogonality_error(chunks[m.bank_slot] if m.rank_tailor else None)
             for _, m in self.kind_layers()),
            default=0.0,
        )  # fmt: skip

    # ---- the per-group form of the weights: parts files, and models saved by kind-dit 0.1 ----

    def part_state(self) -> dict[str, torch.Tensor]:
        """The state dict with the banks cut into one tensor per group and factor
        (`{layer}.tailors.{g}.U|S|V`) and one per class label row (`y_embedder.rows.{c}`): the
        form parts files hold, one file per group."""
        state = self.state_dict()
        table = state.pop("y_embedder.table")
        out = {k: v for k, v in state.items() if k != "tailors.rows"}
        out |= {f"y_embedder.rows.{c}": table[i].clone()
                for i, c in enumerate(self.config.held_classes)}  # fmt: skip
        if self.tailors is not None:
            chunks = state["tailors.rows"].split(self.tailors.widths, dim=1)
            for name, layer in self.gated:
                factors = layer.unpack(chunks[layer.bank_slot])
                for i, g in enumerate(self.tailors.groups):
                    out |= {f"{name}.tailors.{g}.{f}": t[i].clone()
                            for f, t in zip("USV", factors, strict=True)}  # fmt: skip
        return out

    def banked_state(
        self,
        state: dict[str, torch.Tensor],
        missing: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The inverse of `part_state`: per-group and per-class tensors stacked into this model's
        banks (other tensors pass through; a state already banked comes back as it is). With
        `missing`, an absent per-group or per-class tensor is `missing(this model's own)`, e.g.
        zeros for the optimiser state of a class a 0.1 run never saw."""
        if "y_embedder.table" in state:  # banked already
            return state
        if missing is not None:
            own = self.part_state()
            state = {k: missing(v) for k, v in own.items() if is_per_part(k)} | state
        out = {k: v for k, v in state.items() if not is_per_part(k)}
        try:
            rows = [state[f"y_embedder.rows.{c}"] for c in self.config.held_classes]
            out["y_embedder.table"] = torch.stack(rows) if rows else self.y_embedder.table[:0]
            if self.tailors is not None:
                out["tailors.rows"] = torch.stack([self.tailor_row(state, g)
                                                   for g in self.tailors.groups])  # fmt: skip
        except KeyError as e:
            raise ValueError(f"the weights lack {e.args[0]!r}, which this model needs") from None
        return out

    def tailor_row(self, state: dict[str, torch.Tensor], group: int) -> torch.Tensor:
        """Group `group`'s tailor as one bank row [N] (layer after layer, U | σ | V) from its
        per-group tensors (`{layer}.tailors.{group}.U|S|V`, as a tailor part file holds them);
        KeyError for a missing one. What `banked_state` stacks, and what a server that swaps
        tailors in and out of bank rows (kind.serve.cache) writes into one row."""
        return torch.cat([state[f"{name}.tailors.{group}.{f}"].reshape(-1)
                          for name, _ in self.gated for f in "USV"])  # fmt: skip


_PER_GROUP = re.compile(r"\.tailors\.\d+\.[USV]$")
_PER_CLASS = re.compile(r"y_embedder\.rows\.\d+")


def is_per_part(name: str) -> bool:
    """A tensor of the per-group form: one tailor factor of one group, or one class label row."""
    return bool(_PER_GROUP.search(name) or _PER_CLASS.fullmatch(name))


def count_params(model: nn.Module, trainable: bool = False) -> int:
    """Number of parameters of `model` (only those with requires_grad when `trainable`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: object) -> None:
    """load_state_dict with an error that names the source and the mismatching tensors. Weights
    in the per-group form (parts files, models saved by kind-dit 0.1) are stacked into banks."""
    if isinstance(model, DiT):
        state = model.banked_state(state)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", bad),
            )
            if keys
        )
        raise ValueError(
            f"weights in {source} do not fit this model ({detail}); they were saved "
            "for a different configuration"
        )
    model.load_state_dict(state)
