"""AdamW that moves a row bank only at the rows its batch used (docs/KIND.md invariant 2).

A row bank is a parameter whose rows belong to tailor groups or classes (`DiT.row_banks`: the
tailor bank, the label table). A step leaves every row of a group or class absent from the batch
exactly as it was: weights, both moments and its step count, weight decay included; a present row
gets the AdamW update it would get as a parameter of its own, with bias corrections from its own
step count. The rows to update come from `DiT.present_rows` of the global batch, so every rank of a
DDP job updates the same rows.

torch's AdamW cannot do this: it decays and moves the moments of every element it holds, and a
row with a zero gradient is still an element it holds. The other parameters go through torch's
fused AdamW unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def rows_of_grad(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A bank's gradient at `rows` (sorted, distinct) as a dense [P, ...] tensor, from a dense or
    a sparse gradient (a sparse one's other rows, e.g. the row a tailorless null sample reads
    with gate 0, are dropped). No host sync."""
    if not grad.is_sparse:
        return grad.index_select(0, rows)
    index = grad._indices()[0]
    if index.device.type == "cpu" and index.shape == rows.shape and torch.equal(index, rows):
        return grad._values()  # already these rows (an eager blocked route's gather), no copy
    g = grad.coalesce()
    index, values = g.indices()[0], g.values()  # [k], [k, ...]
    pos = torch.searchsorted(rows, index).clamp(max=rows.numel() - 1)
    keep = (rows[pos] == index).to(values.dtype).view(-1, *[1] * (values.dim() - 1))
    return values.new_zeros(rows.numel(), *values.shape[1:]).index_add_(0, pos, values * keep)


def as_row_grad(bank: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The sparse gradient of `bank` holding `values` [P, ...] at `rows` and nothing else."""
    return torch.sparse_coo_tensor(
        rows[None], values, bank.shape, is_coalesced=True, check_invariants=False
    )  # rows are sorted and distinct by construction


def keep_rows(
    banks: dict[str, nn.Parameter],
    rows: dict[str, torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda g: g,
) -> None:
    """Reduce each bank's gradient to its rows of the global batch `rows` (a sparse gradient),
    passed through `reduce` on the way (the mean over DDP ranks): after backward, before the
    gradient is clipped and applied."""
    for key, bank in banks.items():
        if bank.grad is not None:
            r = rows[key].to(bank.device, non_blocking=True)
            grad = reduce(rows_of_grad(bank.grad, r))  # [P, N]
            bank.grad = as_row_grad(bank, r, grad) if r.numel() else None


class MaskedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: list[nn.Parameter],
        banks: dict[str, nn.Parameter],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        """`params`: every trainable parameter; `banks`: those among them that are row banks, by
        the key `step` is given their present rows under."""
        ids = {id(b): key for key, b in banks.items()}
        plain = [p for p in params if id(p) not in ids]
        groups = [{"params": plain}] if plain else []
        groups += [{"params": [p], "bank": ids[id(p)]} for p in params if id(p) in ids]
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        self.rows: dict[str, torch.Tensor] = {}  # set before each step: key -> int64 [P] rows
        self._plain = None
        if plain:  # shares the group dict (lr) and the state with this optimiser
            self._plain = torch.optim.AdamW([self.param_groups[0]], lr=lr, fused=True)
            self._plain.state = self.state

    def set_rows(self, rows: dict[str, torch.Tensor]) -> None:
        """The rows of each bank the coming step updates (`DiT.present_rows`)."""
        self.rows = rows

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self._plain is not None:  # the loaded groups and state are new objects: share again
            self._plain.param_groups = [self.param_groups[0]]
            self._plain.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        if self._plain is not None:
            self._plain.step()
        for group in self.param_groups:
            if "bank" in group:
                self._bank_step(group)

    def _bank_step(self, group: dict) -> None:
        (p,) = group["params"]
        rows = self.rows.get(group["bank"])
        if p.grad is None or rows is None or rows.numel() == 0:
            return
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        if state["step"].device != p.device:  # a checkpoint's step counts load on the CPU
            state["step"] = state["step"].to(p.device)
        grad = rows_of_grad(p.grad, rows.to(p.device, non_blocking=True))  # [P, N]
        # torch's fused AdamW kernel (what torch.optim.AdamW(fused=True) runs) in place on the
        # present rows, each row a tensor of its own (a view) with its own step count
        x, m, v, step = (pick_rows(t, rows) for t in (p, state["exp_avg"], state["exp_avg_sq"],
                                                      state["step"]))  # fmt: skip
        torch._foreach_add_(step, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(
            x, list(grad.unbind()), m, v, [], step,
            amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )  # fmt: skip


def pick_rows(t: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
    """Views of rows `rows` (host int64) of `t`: in-place work on them changes `t`. Selects only
    those rows: `t.unbind()` would make a view of every row, thousands at 611 classes."""
    return [t.select(0, i) for i in rows.tolist()]  # host indices: no device sync


def masked_adamw(
    model: nn.Module, lr: float, weight_decay: float = 0.0
) -> tuple[MaskedAdamW, list[str], dict[str, str]]:
    """The optimiser of `model`'s trainable parameters, its row banks (`row_banks()`, where the
    model has them) masked; returns (optimiser, parameter names in optimiser order, bank keys by
    parameter name for the EMA)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    row_banks = model.row_banks() if hasattr(model, "row_banks") else {}
    banks = {k: p for k, p in row_banks.items() if p.requires_grad}
    optimizer = MaskedAdamW([p for _, p in named], banks, lr=lr, weight_decay=weight_decay)
    key_of = {id(p): k for k, p in banks.items()}
    name_of = {id(p): n for n, p in named}
    order = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return optimizer, order, {n: key_of[id(p)] for n, p in named if id(p) in key_of}
