"""The class-gated SVD linear layer: learngene components shared by every sample, tailor components
chosen per sample by its class.

    y = U_G diag(S_G) V_Gᵀ x + U_T[g] diag(S_T[g]) V_T[g]ᵀ x + b,      g = τ(class of the sample)

The factors are the trained parameters (knowledge integration); the dense weight never is. The
learngene factors belong to each `KindLinear`; the tailors of all layers and groups live in one
`TailorBank` per model (a row per group), read through a `Route` the caller builds once per batch.
A batch without group g never reads g's row, and the masked optimiser and EMA
(kind.training.optim, kind.training.ema) never write it: docs/KIND.md invariant 2.
peft cannot express this (its per-sample adapter routing refuses training mode), so the gate is ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Route:
    """Which tailor each sample of a batch uses; built once per batch by the caller (once per
    sampling run when sampling), so the forward never reads label values on the host.

    Two shapes of route, one per way of computing the tailor path:

    - blocked (`sizes` set; eager): `rows` are the bank rows of the groups present, the batch is
      sorted into one contiguous block per group (`order`) followed by a block without tailor
      (`sizes` holds the block lengths as host ints, `offsets` their ends as a tensor for the
      grouped GEMM), so a layer can fold each group into one weight; `slot[i]` is sample i's
      index into `rows`.
    - static (`sizes` None; compile and large class counts): `rows` holds one bank row per sample
      and `slot` is None. Its shapes depend on the batch size only, so a compiled model never
      recompiles for another class mix.

    `gate` is 1 for a sample with a tailor and 0 for the null class when it has none. `factors`
    holds the gathered tailor rows cut per layer (`TailorBank.gather`), and `weights` the blocked
    route's folded weights per layer (`fold`, None where a layer does not fold), both filled in
    by the model, indexed by the layers' places in the bank.
    """

    rows: torch.Tensor  # int64 [P] (blocked) or [B] (static): bank rows to gather
    gate: torch.Tensor  # [B] float: 1 = the sample's tailor applies, 0 = no tailor
    slot: torch.Tensor | None = None  # int64 [B]: sample -> index into `rows` (None: identity)
    sizes: tuple[int, ...] | None = None  # len(rows) + 1 block lengths (blocked)
    offsets: torch.Tensor | None = None  # int32 [len(rows) + 1]: where each block ends (blocked)
    order: torch.Tensor | None = None  # int64 [B] permutation into block order, or None
    factors: tuple[torch.Tensor, ...] = ()  # per layer: [len(rows), tailor_width]
    weights: tuple[torch.Tensor | None, ...] = ()  # per layer: [len(rows) + 1, out, in] or None


def make_route(slots: torch.Tensor, blocked: bool = True) -> Route:
    """Route for per-sample bank rows `slots` (int64 [B], -1 = no tailor).

    blocked=True reads the values on the host (call it with CPU labels, once per batch);
    blocked=False is pure tensor arithmetic on whatever device `slots` lives, with no host sync."""
    gate = (slots >= 0).float()
    if not blocked:
        return Route(rows=slots.clamp(min=0), gate=gate)
    s = slots.tolist()
    present = sorted(set(s) - {-1})
    block = {v: i for i, v in enumerate(present)} | {-1: len(present)}
    ranks = [block[v] for v in s]
    sizes = [0] * (len(present) + 1)
    for r in ranks:
        sizes[r] += 1
    perm = sorted(range(len(s)), key=ranks.__getitem__)
    order = None if perm == list(range(len(s))) else torch.tensor(perm)
    # samples without a tailor point at row 0 with gate 0 (the row is read, never applied)
    slot = [min(ranks[i], max(len(present) - 1, 0)) for i in perm]
    slot = None if slot == list(range(len(present))) else torch.tensor(slot)  # None: identity
    ends = torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return Route(rows=torch.tensor(present, dtype=torch.long), gate=gate[perm], slot=slot,
                 sizes=tuple(sizes), offsets=ends, order=order)  # fmt: skip


def route_to(route: Route, device: torch.device) -> Route:
    """The route's tensors on `device` (copied without waiting)."""
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return replace(route, rows=move(route.rows), gate=move(route.gate), slot=move(route.slot),
                   offsets=move(route.offsets), order=move(route.order))  # fmt: skip


def resolve_rank(rank: float, in_features: int, out_features: int) -> int:
    """A rank given as a fraction (< 1) of min(in, out) or as an absolute count (≥ 1)."""
    full = min(in_features, out_features)
    r = round(rank * full) if rank < 1 else int(rank)  # 2.5 (an older run's) reads as 2
    if not 0 <= r <= full:
        raise ValueError(
            f"rank {rank} gives {r} components; a {out_features}x{in_features} "
            f"matrix has at most {full}"
        )
    return r


def _orthonormal(n: int, rows: int, cols: int, avoid: torch.Tensor | None = None) -> torch.Tensor:
    """n random matrices with orthonormal columns [n, rows, cols], orthogonal to the orthonormal
    columns of `avoid` when there is room, so a fresh tailor starts outside the learngene's
    subspace."""
    a = torch.randn(n, rows, cols, dtype=torch.float64)
    if avoid is not None and avoid.shape[1] + cols <= rows:
        a -= avoid @ (avoid.T @ a)
    q, _ = torch.linalg.qr(a)
    return q[..., :cols]


def grouped_linear(
    x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, route: Route
) -> torch.Tensor:
    """Block i of a blocked route's samples (`route.sizes[i]` of them) of x [B, ..., in] through
    weights[i] [out, in] (+ bias), as one grouped GEMM: torch's `grouped_mm`, a C++ loop over the
    blocks on CPUs and one kernel on GPUs that have one, forward and backward."""
    if torch.is_autocast_enabled(x.device.type):  # compute in what F.linear would use
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(dtype), weights.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    x2 = x.reshape(-1, x.shape[-1])  # [B·T, in]
    if _grouped_mm_runs(x2, weights.shape[1]):
        per_sample = x2.shape[0] // x.shape[0]  # tokens per sample
        with torch.autocast(x.device.type, enabled=False):
            y = F.grouped_mm(x2, weights.transpose(1, 2), offs=route.offsets * per_sample)
        y = y if bias is None else y.add_(bias)  # grouped_mm's bias takes no gradient
        if y.requires_grad:  # its backward refuses a gradient of stride 0 (that of y.sum())
            y.register_hook(torch.Tensor.contiguous)
    else:  # a dtype or GPU that grouped_mm would run through a host-syncing loop: ours, on host ints
        y = torch.cat([F.linear(xb, w, bias) for xb, w in zip(x.split(route.sizes), weights)])
    return y.view(*x.shape[:-1], weights.shape[1])  # [B, ..., out]


def _grouped_mm_runs(x: torch.Tensor, out_features: int) -> bool:
    """Whether `F.grouped_mm` runs on x [rows, in] -> [rows, out_features] without reading the
    block offsets on the host: its CPU kernel (fp32, bf16, fp16) and its CUDA kernel (bf16,
    compute capability 9.0 and up), each for rows of whole 16-byte units (its stride rule)."""
    if any(n * x.element_size() % 16 for n in (x.shape[1], out_features)):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return (
        x.device.type == "cuda"
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class _Fold(torch.autograd.Function):
    """w[None] + a @ b: learngene weights w [L, out, in] plus thin products a [n, L, out, r] @
    b [n, L, r, in] (r: a tailor's rank), the n folded weights of L layers: [n, L, out, in].

    Its backward takes a's gradient as the transposed product (b @ gᵀ)ᵀ: autograd computes it as
    g @ bᵀ, a batched product with r columns, which MKL runs ~4× slower than the same numbers with
    r rows (BENCHMARKS.md); w's gradient sums over the n weights, b's is the usual product."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # w, a and b of one dtype (autocast does not cast an out= product's operands)
        ctx.save_for_backward(a, b)
        (n, L, fout, r), fin = a.shape, b.shape[-1]
        W = w.expand(n, L, fout, fin).contiguous()  # the learngenes, their tailors added in place
        W3 = W.view(n * L, fout, fin)
        torch.baddbmm(W3, a.reshape(n * L, fout, r), b.reshape(n * L, r, fin), out=W3)
        return W

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # grad [n, L, out, in] -> w [L, out, in], a [n, L, out, r], b [n, L, r, in]
        a, b = ctx.saved_tensors
        need_w, need_a, need_b = ctx.needs_input_grad
        return (
            grad.sum(0) if need_w else None,
            torch.matmul(b, grad.transpose(-1, -2)).transpose(-1, -2) if need_a else None,
            torch.matmul(a.transpose(-1, -2), grad) if need_b else None,
        )


class KindLinear(nn.Module):
    """Linear layer in SVD form: learngene components (its own parameters) plus, per sample, the
    components of that sample's tailor group, which live in the model's `TailorBank`.

    Args:
        rank_learngene / rank_tailor: number of components (≥ 1) or fraction of min(in, out) (< 1);
            rank_tailor 0 makes a plain learngene-only SVD layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank_learngene: float,
        rank_tailor: float = 0,
        bias: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank_learngene = resolve_rank(rank_learngene, in_features, out_features)
        self.rank_tailor = resolve_rank(rank_tailor, in_features, out_features)
        self.bank_slot: int | None = None  # this layer's place in its TailorBank
        r = self.rank_learngene
        self.U = nn.Parameter(torch.empty(out_features, r))
        self.S = nn.Parameter(torch.empty(r))
        self.V = nn.Parameter(torch.empty(in_features, r))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.init_from_dense(nn.init.xavier_uniform_(torch.empty(out_features, in_features)))

    @torch.no_grad()
    def resize_learngene(self, rank: int) -> None:
        """Give the learngene `rank` components (new U, S, V: the leading SVD triples of the current
        learngene weight; a budget assembly then loads the kept components into them)."""
        if not 1 <= rank <= min(self.in_features, self.out_features):
            raise ValueError(
                f"learngene rank {rank} for a {self.out_features}x{self.in_features} layer; "
                f"it takes 1 to {min(self.in_features, self.out_features)} components"
            )
        weight, like = self.learngene_weight(), self.U
        self.rank_learngene = rank
        self.U = nn.Parameter(like.new_empty(self.out_features, rank))
        self.S = nn.Parameter(like.new_empty(rank))
        self.V = nn.Parameter(like.new_empty(self.in_features, rank))
        self.init_from_dense(weight)

    @property
    def tailor_width(self) -> int:
        """Numbers one group's tailor takes in a bank row: U (out×r), σ (r), V (in×r)."""
        return self.rank_tailor * (self.out_features + 1 + self.in_features)

    def unpack(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # chunk [n, tailor_width] -> U [n, out, r], S [n, r], V [n, in, r] (views, one split)
        n, r, fin, fout = chunk.shape[0], self.rank_tailor, self.in_features, self.out_features
        U, S, V = chunk.split([fout * r, r, fin * r], dim=1)
        return U.view(n, fout, r), S, V.view(n, fin, r)

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor) -> None:
        """Learngene = the leading r_G SVD triples of a conventionally initialised dense weight
        (docs/KIND.md, initialisation); the tailors are the bank's (`TailorBank.reset`)."""
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        r = self.rank_learngene
        self.U.copy_(u[:, :r])
        self.S.copy_(s[:r])
        self.V.copy_(vh[:r].T)

    def learngene_weight(self) -> torch.Tensor:
        return (self.U * self.S) @ self.V.T  # [out, in]

    def folds(self, groups: int, rows: int) -> bool:
        """Whether a batch of `groups` tailor groups over `rows` rows (tokens) runs folded: each
        group's weight built in full (groups·in·out numbers) when that is no bigger than the
        layer's activations (rows·max(in, out)); else the learngene and the tailors run apart."""
        return rows >= self.fold_rows(groups)

    def fold_rows(self, groups: int) -> int:
        """The fewest rows at which `groups` groups fold: groups·in·out ≤ rows·max(in, out)."""
        return groups * min(self.in_features, self.out_features)

    def materialises(self, rows: int, rank: int | None = None) -> bool:
        """Whether the learngene (at `rank` components, default its own) runs on `rows` rows as one
        matmul on its materialised weight U diag(σ) Vᵀ (rows·in·out, plus in·out·r to build it)
        rather than two thin matmuls through its factors (rows·r·(in + out)): whichever costs
        fewer multiply-adds, with a 25 % margin for the one matmul, which runs closer to peak."""
        fin, fout = self.in_features, self.out_features
        r = self.rank_learngene if rank is None else rank
        return rows * fin * fout + fin * fout * r <= 1.25 * rows * r * (fin + fout)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        # x: [B, T, in] (or [B, in]) -> [B, T, out]
        if route is None or not self.rank_tailor or route.rows.shape[0] == 0:
            return self._learngene(x)
        if route.order is not None:  # sort into group blocks, compute, then restore the order
            out = self.forward(x[route.order], replace(route, order=None))
            return torch.empty_like(out).index_copy_(0, route.order, out)
        # A sample only ever touches its own group's factors (invariant 1); the bank rows of
        # groups absent from the batch are never read, and the masked optimiser leaves them be
        # (invariant 2). Two ways to compute the same thing, chosen from the shapes:
        W = self.folded(route, x.numel() // self.in_features)
        if W is not None:  # few groups (CPU sizes): each block of samples through its own weight
            return grouped_linear(x, W, self.bias, route)
        # Many groups, or static shapes (compile, GPUs): the learngene in one matmul for the whole
        # batch, each sample's rank-r tailor through its own gathered factors in batched products.
        return self.add_tailors(self._learngene(x), x, route)

    def add_tailors(self, y: torch.Tensor, x: torch.Tensor, route: Route) -> torch.Tensor:
        """y (the learngene's output) plus each sample's tailor applied to x, through its gathered
        factors: y + U_T[g] diag(σ_T[g]) V_T[g]ᵀ x, the unfolded tailor path."""
        U, S, V = self.unpack(route.factors[self.bank_slot])  # [P, out, r], [P, r], [P, in, r]
        if route.slot is not None:
            U, S, V = U[route.slot], S[route.slot], V[route.slot]  # [B, out, r], [B, r], [B, in, r]
        # the null class without a tailor reads some group's row: zeroed, not multiplied by 0,
        # so not even a non-finite tailor of that group reaches it (0 * inf is NaN; invariant 1)
        keep = route.gate[:, None, None] > 0  # [B, 1, 1]
        U, S, V = torch.where(keep, U, 0), torch.where(keep[:, 0], S, 0), torch.where(keep, V, 0)
        x3 = x.reshape(x.shape[0], -1, self.in_features)  # [B, T, in]
        y3 = y.reshape(x.shape[0], -1, self.out_features)  # [B, T, out]
        xv = torch.bmm(x3, V.to(x3.dtype)) * S[:, None].to(x3.dtype)  # [B, T, r]
        out = torch.baddbmm(y3, xv, U.to(x3.dtype).transpose(1, 2))  # [B, T, out]
        return out.view(*x.shape[:-1], self.out_features)

    def folded(self, route: Route, rows: int) -> torch.Tensor | None:
        """This layer's weights [P + 1, out, in] for a blocked route's P groups and its tailorless
        block, or None when it does not fold them (`fold`): the model's, folded with the other
        layers of this shape, or, for a route without them, this layer's own."""
        if route.weights and self.rank_tailor:
            return route.weights[self.bank_slot]
        return fold([self], route, rows)[0]

    def _learngene(self, x: torch.Tensor) -> torch.Tensor:
        """The learngene for the whole batch, materialised or factored (`materialises`)."""
        if self.materialises(x.numel() // self.in_features):
            return F.linear(x, self.learngene_weight(), self.bias)
        y = ((x @ self.V) * self.S) @ self.U.T
        return y + self.bias if self.bias is not None else y

    @torch.no_grad()
    def merge(self, tailor: torch.Tensor | None = None) -> nn.Linear:
        """Fold the learngene plus one tailor (its bank chunk [tailor_width]; None: the learngene
        alone) into a dense layer."""
        weight = (self.U.double() * self.S.double()) @ self.V.double().T
        if tailor is not None:
            U, S, V = (f[0].double() for f in self.unpack(tailor[None]))
            weight += (U * S) @ V.T
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.to(device=self.U.device, dtype=self.U.dtype)
        dense.weight.copy_(weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense

    def _gram_error(self, which: str, tailors: torch.Tensor | None) -> torch.Tensor:
        """‖G_ᵀG − I‖² + Σ_p (2‖GᵀT_p‖² + ‖T_pᵀT_p − I‖²) for the learngene factor G `which` (U or
        V) and the tailor factors T_p of `tailors` ([P, rows, r]; None: none). Tailors of
        different groups are never used together, so they are not asked to be orthogonal to
        each other: the penalty, and its gradient, stay free of any group absent from the
        batch (invariant 2)."""
        G = getattr(self, which)
        err = ((G.T @ G - torch.eye(G.shape[1], device=G.device, dtype=G.dtype)) ** 2).sum()
        if tailors is None or tailors.shape[0] == 0:
            return err
        eye_t = torch.eye(tailors.shape[2], device=G.device, dtype=G.dtype)
        cross = (G.T @ tailors) ** 2  # [P, r_G, r]
        own = (tailors.transpose(1, 2) @ tailors - eye_t) ** 2  # [P, r, r]
        return err + 2 * cross.sum() + own.sum()

    def orthogonality_penalty(self, chunk: torch.Tensor | None = None) -> torch.Tensor:
        """‖UᵀU − I‖² + ‖VᵀV − I‖² of [learngene | tailor p] for the tailors in `chunk`
        ([P, tailor_width] bank rows; None: the learngene alone)."""
        U, _, V = self.unpack(chunk) if chunk is not None else (None, None, None)
        return self._gram_error("U", U) + self._gram_error("V", V)

    @torch.no_grad()
    def orthogonality_error(self, chunk: torch.Tensor | None = None) -> float:
        """Worst RMS deviation from orthonormal columns of [U_G | U_T[g]] and [V_G | V_T[g]] over
        the tailors g of `chunk` ([P, tailor_width]; None: the learngene alone): 0 for an exact
        SVD."""
        n = self.rank_learngene + (self.rank_tailor if chunk is not None else 0)
        worst = 0.0
        for row in [None] if chunk is None else chunk[:, None]:  # a report, not the step
            U, _, V = self.unpack(row) if row is not None else (None, None, None)
            for which, T in (("U", U), ("V", V)):
                worst = max(worst, math.sqrt(self._gram_error(which, T).item()) / max(n, 1))
        return worst

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r_learngene={self.rank_learngene}, "
            f"r_tailor={self.rank_tailor}"
        )


def fold(layers: list[KindLinear], route: Route, rows: int) -> tuple[torch.Tensor | None, ...]:
    """The weights [P + 1, out, in] of a blocked route's P groups and its tailorless last block for
    each of `layers` that folds a batch of `rows` rows (`KindLinear.folds`); None for the others.

    Each group's weight is the learngene plus its tailor, U_G diag(σ_G) V_Gᵀ + U_T diag(σ_T) V_Tᵀ;
    the tailorless block's is the learngene alone: a zero tailor appended to the thin factors, so
    one product writes all P + 1 weights. Layers of one shape fold together in one batched product:
    a model has a few shapes and many layers, and folding one layer at a time costs ~28
    small operations a layer, forward and backward, which at CPU sizes outweighs the arithmetic."""
    out: list[torch.Tensor | None] = [None] * len(layers)
    if route.sizes is None or route.rows.shape[0] == 0:
        return tuple(out)
    P = route.rows.shape[0]
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for i, m in enumerate(layers):  # once per forward, over layers (not groups or samples)
        if m.rank_tailor and m.folds(P, rows):
            shapes.setdefault((m.in_features, m.out_features, m.rank_learngene), []).append(i)
    for idx in shapes.values():
        ms = [layers[i] for i in idx]
        L, head = len(ms), ms[0]
        chunks = _stack([route.factors[m.bank_slot] for m in ms], dim=1)  # [P, L, width]
        U, S, V = (f.unflatten(0, (P, L)) for f in head.unpack(chunks.flatten(0, 1)))
        # U [P, L, out, r], S [P, L, r], V [P, L, in, r]
        UG, SG, VG = (_stack([getattr(m, f) for m in ms], dim=0) for f in "USV")
        w = torch.bmm(UG * SG[:, None], VG.transpose(1, 2))  # [L, out, in]: the learngenes
        US = F.pad(U * S[..., None, :], (0, 0, 0, 0, 0, 0, 0, 1))  # [P + 1, L, out, r]
        Vt = F.pad(V, (0, 0, 0, 0, 0, 0, 0, 1)).transpose(-1, -2)  # [P + 1, L, r, in]
        # the tailors in the learngenes' dtype: under autocast, the one its GEMMs compute in
        W = _Fold.apply(w, US.to(w.dtype), Vt.to(w.dtype))  # [P + 1, L, out, in]
        for i, W_i in zip(idx, W.unbind(1) if L > 1 else [W.squeeze(1)]):  # [P + 1, out, in]
            out[i] = W_i
    return tuple(out)


def _stack(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.stack, but a view for one tensor (a layer folding alone), not a copy."""
    return torch.stack(tensors, dim) if len(tensors) > 1 else tensors[0].unsqueeze(dim)


class TailorBank(nn.Module):
    """The tailors of every gated layer of a model in one parameter `rows` [G, N]: row i holds
    tailor group `groups[i]`'s components in every layer, layer after layer, each as
    [U (out×r) | σ (r) | V (in×r)].

    Why one tensor rather than modules per group: a step must touch only the groups present in
    its batch (invariant 2). With every group a row, the forward reads the rows it needs in one
    gather, and the masked optimiser, the EMA and the DDP reduction (kind.training) each update
    just those rows in one operation, whatever the number of groups (150, 611, 1,000) and layers.
    Parts files keep one file per group: `kind.core.model.DiT.part_state` cuts the bank into
    them and `DiT.banked_state` stacks them back.
    """

    def __init__(self, layers: list[KindLinear], groups: list[int], sigma: float = 1e-2):
        super().__init__()
        self.groups, self.sigma = list(groups), sigma
        self.widths = [layer.tailor_width for layer in layers]
        for i, layer in enumerate(layers):
            layer.bank_slot = i
        self.rows = nn.Parameter(torch.zeros(len(self.groups), sum(self.widths)))

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Bank rows `rows` [n], cut per layer: one gather and one split, whatever the count.

        Eager, the gradient is sparse: it holds the gathered rows only, where a dense one would
        be a [G, N] tensor of zeros to fill every step (at 150 classes, more numbers than the
        dense model has). Compiled graphs keep the dense gradient, which inductor supports."""
        if torch.compiler.is_compiling():
            picked = self.rows[rows]
        else:
            picked = F.embedding(rows, self.rows, sparse=True)
        return picked.split(self.widths, dim=1)  # per layer [n, width]

    def attach(self, route: Route) -> Route:
        """`route` with its rows of this bank gathered (what the model does once per forward)."""
        return replace(route, factors=self.gather(route.rows))

    def chunk(self, layer: KindLinear, group: int) -> torch.Tensor:
        """Group `group`'s tailor in `layer`: [tailor_width] (a view)."""
        return self.rows[self.groups.index(group)].split(self.widths)[layer.bank_slot]

    @torch.no_grad()
    def reset(self, layers: list[KindLinear]) -> None:
        """Every group's tailor in every layer: random orthonormal directions (outside the
        learngene's subspace when there is room) with small singular values, so it starts near
        zero but every factor gets gradient (docs/KIND.md, initialisation)."""
        chunks = self.rows.split(self.widths, dim=1)
        n = len(self.groups)
        for layer in layers:  # once per model, not per step
            U, S, V = layer.unpack(chunks[layer.bank_slot])  # views into the bank
            # on the host, as the random directions are (one stream, whatever the device)
            basis_u = torch.linalg.qr(layer.U.double().cpu())[0]  # [out, r_G]; U may have
            basis_v = torch.linalg.qr(layer.V.double().cpu())[0]  # drifted after training
            U.copy_(_orthonormal(n, layer.out_features, layer.rank_tailor, basis_u))
            V.copy_(_orthonormal(n, layer.in_features, layer.rank_tailor, basis_v))
            S.fill_(self.sigma)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, width={sum(self.widths)}"


def linears(
    layers: tuple[nn.Module, ...], x: torch.Tensor, route: Route | None
) -> list[torch.Tensor]:
    """x through several layers that read the same input (attention's q, k and v), as one GEMM
    three times as wide instead of three: their weights stacked along the output, one `F.linear`
    (dense, or KIND learngenes that materialise, each layer's tailors then added on its own) or
    one grouped GEMM over the folded KIND weights, the output split per layer. Layers of any other
    kind (a peft adapter), and KIND learngenes that run factored, go one by one."""
    dense = all(type(m) is Linear for m in layers)
    kind = all(type(m) is KindLinear for m in layers)
    unsorted = route is not None and route.order is not None  # the model sorts before its layers
    if not (dense or kind) or any(m.bias is None for m in layers):
        return [m(x, route) for m in layers]
    outs, bias = [m.out_features for m in layers], torch.cat([m.bias for m in layers])
    if dense:
        return list(F.linear(x, torch.cat([m.weight for m in layers]), bias).split(outs, dim=-1))
    rows = x.numel() // x.shape[-1]
    tailored = route is not None and route.rows.shape[0] > 0
    if tailored and not unsorted:
        folded = [m.folded(route, rows) for m in layers]  # [P + 1, out, in] each, or None
        if all(w is not None for w in folded):  # each block through its group's weights
            y = grouped_linear(x, torch.cat(folded, dim=1), bias, route)  # [..., Σ out]
            return list(y.split(outs, dim=-1))
    if unsorted or not all(m.materialises(rows) for m in layers):
        return [m(x, route) for m in layers]
    weight = torch.cat([m.learngene_weight() for m in layers])  # [Σ out, in]
    ys = F.linear(x, weight, bias).split(outs, dim=-1)  # [..., out] each
    if not tailored:
        return list(ys)
    return [m.add_tailors(y, x, route) if m.rank_tailor else y for m, y in zip(layers, ys)]


class Linear(nn.Linear):
    """nn.Linear that accepts (and ignores) a route, so dense and KIND blocks share one code path."""

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        return super().forward(x)
