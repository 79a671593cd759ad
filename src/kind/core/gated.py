"""The class-gated SVD linear layer: learngene components shared by every sample, tailor components
chosen per sample by its class.

    y = U_G diag(S_G) V_Gᵀ x + U_T[g] diag(S_T[g]) V_T[g]ᵀ x + b,      g = τ(class of the sample)

The factors are the trained parameters (knowledge integration); the dense weight never is. Each
tailor group lives in its own `Tailor` module (its own parameters) so that a batch without group g
leaves g's parameters out of the autograd graph: their `.grad` stays None and a stock optimiser
(AdamW, with weight decay and momentum) skips them entirely, which is what docs/KIND.md invariant 2 asks.
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
    """How a batch is split among tailor groups; built once per forward by the model.

    Inside a layer every group is one contiguous block of samples: `sizes[i]` samples use group
    `keys[i]`, and the last `sizes[-1]` samples (the null class of classifier-free guidance) use no
    tailor, so a group's samples can go through one weight together. `order` sorts a batch into
    that block order (None when it already is); the DiT sorts its batch once on the way in, so its
    layers never need to.
    """

    keys: tuple[str, ...]
    sizes: tuple[int, ...]  # len(keys) + 1 block sizes; the last block has no tailor
    order: torch.Tensor | None  # int64 [B] permutation into block order (None: already in order)


def make_route(groups: torch.Tensor) -> Route:
    """Route for per-sample tailor groups `groups` (int64 [B], -1 = no tailor)."""
    g = groups.tolist()
    present = sorted(set(g) - {-1})
    block = {v: i for i, v in enumerate(present)} | {-1: len(present)}
    ranks = [block[v] for v in g]
    sizes = [0] * (len(present) + 1)
    for r in ranks:
        sizes[r] += 1
    order = None
    if ranks != sorted(ranks):
        order = torch.tensor(sorted(range(len(g)), key=ranks.__getitem__), device=groups.device)
    return Route(keys=tuple(str(v) for v in present), sizes=tuple(sizes), order=order)


def resolve_rank(rank: float, in_features: int, out_features: int) -> int:
    """A rank given as a fraction (< 1) of min(in, out) or as an absolute count (≥ 1)."""
    full = min(in_features, out_features)
    r = round(rank * full) if rank < 1 else int(rank)
    if not 0 <= r <= full:
        raise ValueError(
            f"rank {rank} gives {r} components; a {out_features}x{in_features} "
            f"matrix has at most {full}"
        )
    return r


def _orthonormal(rows: int, cols: int, avoid: torch.Tensor | None = None) -> torch.Tensor:
    """Random matrix with orthonormal columns [rows, cols], orthogonal to the orthonormal columns
    of `avoid` when there is room, so a fresh tailor starts outside the learngene's subspace."""
    a = torch.randn(rows, cols, dtype=torch.float64)
    if avoid is not None and avoid.shape[1] + cols <= rows:
        a -= avoid @ (avoid.T @ a)
    q, _ = torch.linalg.qr(a)
    return q[:, :cols]


class _GroupedLinear(torch.autograd.Function):
    """y_i = x_i W_iᵀ + b for consecutive row blocks x_i of x, as one autograd node.

    The per-block products are plain ATen calls writing into preallocated outputs, so a layer with
    P groups adds one graph node instead of ~4P (P linears, their bias adds, the concatenation):
    at CPU sizes, where each block is small, that bookkeeping costs as much as the arithmetic.
    On GPUs a grouped GEMM (torch._grouped_mm) could do the block loop in one kernel."""

    @staticmethod
    def forward(ctx, x, weights, bias, rows):
        # x: [M, in], weights: [G, out, in], rows: G block lengths summing to M -> [M, out]
        ctx.save_for_backward(x, weights)
        ctx.rows, ctx.has_bias = rows, bias is not None
        y = x.new_empty(x.shape[0], weights.shape[1])
        for xb, yb, w in zip(x.split(rows), y.split(rows), weights):
            if bias is None:
                torch.mm(xb, w.T, out=yb)
            else:
                torch.addmm(bias, xb, w.T, out=yb)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weights = ctx.saved_tensors
        grad_x, grad_w = torch.empty_like(x), torch.empty_like(weights)
        blocks = zip(x.split(ctx.rows), grad_y.split(ctx.rows), grad_x.split(ctx.rows))
        for i, (xb, gy, gx) in enumerate(blocks):
            torch.mm(gy, weights[i], out=gx)  # [m, out] @ [out, in]
            torch.mm(gy.T, xb, out=grad_w[i])  # [out, m] @ [m, in]
        grad_b = grad_y.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def grouped_linear(
    x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, sizes: tuple[int, ...]
) -> torch.Tensor:
    """Block i of `sizes[i]` samples of x [B, ..., in] through weights[i] [out, in] (+ bias)."""
    if torch.is_autocast_enabled(x.device.type):  # compute in what F.linear would use
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(dtype), weights.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    per_sample = x[0].numel() // x.shape[-1]  # tokens per sample
    rows = tuple(n * per_sample for n in sizes)
    with torch.autocast(x.device.type, enabled=False):
        y = _GroupedLinear.apply(x.reshape(-1, x.shape[-1]), weights, bias, rows)
    return y.view(*x.shape[:-1], weights.shape[1])


class Tailor(nn.Module):
    """One tailor group's components in one layer: U [out, r], S [r], V [in, r]."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.U = nn.Parameter(torch.empty(out_features, rank))
        self.S = nn.Parameter(torch.empty(rank))
        self.V = nn.Parameter(torch.empty(in_features, rank))


class KindLinear(nn.Module):
    """Linear layer in SVD form, split into learngene components and per-group tailor components.

    Args:
        rank_learngene / rank_tailor: number of components (≥ 1) or fraction of min(in, out) (< 1).
        groups: the tailor groups this layer holds (all groups of a pre-trained model, a subset in an
            assembled one). A layer with no groups is a plain learngene-only SVD layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank_learngene: float,
        rank_tailor: float = 0,
        groups: list[int] = (),
        bias: bool = True,
        tailor_sigma: float = 1e-2,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank_learngene = resolve_rank(rank_learngene, in_features, out_features)
        self.rank_tailor = resolve_rank(rank_tailor, in_features, out_features) if groups else 0
        self.tailor_sigma = tailor_sigma
        r = self.rank_learngene
        self.U = nn.Parameter(torch.empty(out_features, r))
        self.S = nn.Parameter(torch.empty(r))
        self.V = nn.Parameter(torch.empty(in_features, r))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.tailors = nn.ModuleDict(
            {str(g): Tailor(in_features, out_features, self.rank_tailor) for g in groups}
        )
        self.init_from_dense(nn.init.xavier_uniform_(torch.empty(out_features, in_features)))

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor) -> None:
        """Learngene = the leading r_G SVD triples of a conventionally initialised dense weight;
        tailors = fresh random components (docs/KIND.md, initialisation)."""
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        r = self.rank_learngene
        self.U.copy_(u[:, :r])
        self.S.copy_(s[:r])
        self.V.copy_(vh[:r].T)
        self.reset_tailors()

    @torch.no_grad()
    def reset_tailors(self) -> None:
        """Every tailor: random orthonormal directions (outside the learngene's subspace when there
        is room) with small singular values, so it starts near zero but every factor gets
        gradient."""
        basis_u = torch.linalg.qr(self.U.double())[0]  # [out, r_G]; U may have drifted from
        basis_v = torch.linalg.qr(self.V.double())[0]  # orthonormal after training
        for t in self.tailors.values():
            t.U.copy_(_orthonormal(self.out_features, self.rank_tailor, basis_u))
            t.V.copy_(_orthonormal(self.in_features, self.rank_tailor, basis_v))
            t.S.fill_(self.tailor_sigma)

    def learngene_weight(self) -> torch.Tensor:
        return (self.U * self.S) @ self.V.T  # [out, in]

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        # x: [B, T, in] (or [B, in]) -> [B, T, out]
        if route is None or not route.keys:
            return self._learngene(x)
        if route.order is not None:  # sort into group blocks, compute, then restore the order
            out = self.forward(x[route.order], replace(route, order=None))
            return torch.empty_like(out).index_copy_(0, route.order, out)
        # A sample only ever touches its own group's factors (invariant 1), and groups absent
        # from the batch stay out of the graph (invariant 2). Two ways to compute the same thing:
        n, fin, fout = x.numel() // self.in_features, self.in_features, self.out_features
        tailors = [self.tailors[k] for k in route.keys]
        U = torch.stack([t.U for t in tailors]) * torch.stack([t.S for t in tailors])[:, None]
        V = torch.stack([t.V for t in tailors])  # U: [P, out, r] (σ folded in), V: [P, in, r]
        if len(tailors) * fin * fout <= n * max(fin, fout):
            # Few groups (CPU sizes): fold each group into its own dense weight, no bigger in all
            # than the layer's activations, and run each block of samples through its weight.
            w = self.learngene_weight()  # [out, in]
            W = torch.baddbmm(w.expand(len(tailors), -1, -1), U, V.transpose(1, 2))  # [P, out, in]
            W = torch.cat([W, w.unsqueeze(0)])  # [P + 1, out, in]: the null block uses w alone
            return grouped_linear(x, W, self.bias, route.sizes)
        # Many groups (the ImageNet setting): the learngene in one matmul for the whole batch,
        # each sample's rank-r tailor through its gathered factors in one batched product.
        slot = torch.repeat_interleave(
            torch.arange(len(route.sizes), device=x.device),
            torch.tensor(route.sizes, device=x.device),
        )  # [B]
        U = torch.cat([U, U.new_zeros(1, *U.shape[1:])])[slot]  # [B, out, r]; null: zeros
        V = torch.cat([V, V.new_zeros(1, *V.shape[1:])])[slot]  # [B, in, r]
        x3 = x.reshape(x.shape[0], -1, fin)  # [B, T, in]
        y = self._learngene(x3)
        return torch.baddbmm(y, torch.bmm(x3, V), U.transpose(1, 2)).view(*x.shape[:-1], fout)

    def _learngene(self, x: torch.Tensor) -> torch.Tensor:
        """The learngene for the whole batch: one matmul on the materialised weight, unless the
        rank is small enough that two thin factored matmuls cost under half as much."""
        fin, fout, r = self.in_features, self.out_features, self.rank_learngene
        if 2 * r * (fin + fout) >= fin * fout:
            return F.linear(x, self.learngene_weight(), self.bias)
        y = ((x @ self.V) * self.S) @ self.U.T
        return y + self.bias if self.bias is not None else y

    @torch.no_grad()
    def merge(self, group: int | None) -> nn.Linear:
        """Fold the learngene plus group `group`'s tailor (None: learngene only) into a dense layer."""
        weight = (self.U.double() * self.S.double()) @ self.V.double().T
        if group is not None:
            t = self.tailors[str(group)]
            weight += (t.U.double() * t.S.double()) @ t.V.double().T
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.to(device=self.U.device, dtype=self.U.dtype)
        dense.weight.copy_(weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense

    def _factor_gram_error(self, keys: tuple[str, ...], which: str) -> torch.Tensor:
        """Σ over groups g in keys of ‖AᵀA − I‖² with A = [learngene | tailor g] for factor `which`
        (U or V); ‖GᵀG − I‖² alone when keys is empty. Tailors of different groups are never used
        together, so they are not asked to be orthogonal to each other: this keeps the penalty, and
        its gradient, free of any group absent from the batch (invariant 2)."""
        G = getattr(self, which)
        eye = torch.eye(G.shape[1], device=G.device, dtype=G.dtype)
        err = ((G.T @ G - eye) ** 2).sum()
        for key in keys:
            T = getattr(self.tailors[key], which)
            eye_t = torch.eye(T.shape[1], device=T.device, dtype=T.dtype)
            err = err + 2 * ((G.T @ T) ** 2).sum() + ((T.T @ T - eye_t) ** 2).sum()
        return err

    def orthogonality_penalty(self, keys: tuple[str, ...] = ()) -> torch.Tensor:
        """‖UᵀU − I‖² + ‖VᵀV − I‖² over the learngene and the tailors of groups `keys`."""
        return self._factor_gram_error(keys, "U") + self._factor_gram_error(keys, "V")

    @torch.no_grad()
    def orthogonality_error(self) -> float:
        """Worst RMS deviation from orthonormal columns of [U_G | U_T[g]] and [V_G | V_T[g]] over all
        groups g (or the learngene alone): 0 for an exact SVD."""
        keys = [(k,) for k in self.tailors] or [()]
        worst = 0.0
        for key in keys:
            n = self.rank_learngene + (self.rank_tailor if key else 0)
            for which in ("U", "V"):
                worst = max(
                    worst, math.sqrt(self._factor_gram_error(key, which).item()) / max(n, 1)
                )
        return worst

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r_learngene={self.rank_learngene}, "
            f"r_tailor={self.rank_tailor}, groups={list(self.tailors)}"
        )


class Linear(nn.Linear):
    """nn.Linear that accepts (and ignores) a route, so dense and KIND blocks share one code path."""

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        return super().forward(x)
