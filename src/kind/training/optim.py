"""AdamW that moves a row bank only at the rows its batch used (docs/KIND.md invariant 2).

A row bank is a parameter whose rows belong to tailor groups or classes (`DiT.row_banks`: the
tailor bank, the label table). A step leaves every row of a group or class absent from the batch
exactly as it was: weights, both moments and its step count, weight decay included; a present row
gets the AdamW update it would get as a parameter of its own, with bias corrections from its own
step count. The rows to update come from `DiT.present_rows` of the global batch, so every rank of a
DDP job updates the same rows.

torch's AdamW cannot do this: it decays and moves the moments of every element it holds, and a
row with a zero gradient is still an element it holds. Every update, the banks' rows and the other
parameters alike, runs through torch's fused AdamW kernel.

Step counts: the kernel takes one 0-d count a tensor. Counting them up one by one (torch's AdamW
calls `_foreach_add_` on the list, which on a CPU is a call a tensor, ~4 µs each: 1.4 ms a step for
DiT-S's 325 tensors, more than the kernel spends on its small ones) is replaced by one add: the
plain parameters' counts are views of one tensor, a bank's counts are one [G] tensor already.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def rows_of_grad(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A bank's gradient at `rows` (sorted, distinct) as a dense [P, ...] tensor, from a dense or
    a sparse gradient (a sparse one's other rows, e.g. the row a tailorless null sample reads
    with gate 0, are dropped). No host sync: a sparse gradient is read uncoalesced (coalescing
    sizes its output from the data, which waits for a GPU); its repeated rows, a per-sample
    gather's, add up in `index_add_`."""
    if not grad.is_sparse:
        return grad.index_select(0, rows)
    index, values = grad._indices()[0], grad._values()  # [k], [k, ...]; rows may repeat
    if index.device.type == "cpu" and index.shape == rows.shape and torch.equal(index, rows):
        return values  # already these rows (an eager blocked route's gather), no copy
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
    gradient is clipped and applied.

    Whether a bank takes part is decided from what every rank shares (the global rows, whether
    the bank trains), never from this rank's own gradient: a rank whose share of the batch reads
    none of the rows (every sample of it the null class) has none, and skipping the reduction
    there would pair mismatched collectives across ranks. It reduces zeros instead."""
    for key, bank in banks.items():
        r = rows[key].to(bank.device, non_blocking=True)
        if not bank.requires_grad or not r.numel():
            bank.grad = None
            continue
        if bank.grad is None:  # [P, N]: this rank's samples read none of the rows
            local = bank.new_zeros(r.numel(), *bank.shape[1:])
        else:
            local = rows_of_grad(bank.grad, r)  # [P, N]
        bank.grad = as_row_grad(bank, r, reduce(local))


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
        self._counts: dict[int, torch.Tensor] = {}  # plain group index -> [n] step counts
        self._link_counts()

    def set_rows(self, rows: dict[str, torch.Tensor]) -> None:
        """The rows of each bank the coming step updates (`DiT.present_rows`)."""
        self.rows = rows

    @torch.no_grad()
    def step(self, closure=None):
        """One call of torch's fused AdamW kernel (what torch.optim.AdamW(fused=True) runs) for
        every group setting: the plain parameters with a gradient and the present rows of every
        bank together, each row a tensor of its own (a view, updated in place) with its own step
        count. Calling the kernel directly rather than through torch.optim.AdamW skips its
        per-parameter Python bookkeeping, which at hundreds of tensors costs more than the rows."""
        calls: dict[tuple, tuple[list, ...]] = {}  # group setting -> x, grad, m, v, step
        for i, group in enumerate(self.param_groups):
            key = (group["lr"], tuple(group["betas"]), group["weight_decay"], group["eps"])
            lists = calls.setdefault(key, ([], [], [], [], []))
            if "bank" in group:
                self._bank_lists(group, *lists)
            else:
                self._plain_lists(i, group, *lists)
        for (lr, (beta1, beta2), weight_decay, eps), (x, g, m, v, step) in calls.items():
            if x:
                torch._fused_adamw_(
                    x, g, m, v, [], step, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                    weight_decay=weight_decay, eps=eps, maximize=False,
                )  # fmt: skip

    def state_dict(self) -> dict:
        """torch's format, each step count a tensor of its own (not a view of the shared counts)."""
        sd = super().state_dict()
        sd["state"] = {i: st | {"step": st["step"].clone()} for i, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link_counts()

    def _link_counts(self) -> None:
        """Hold the step counts of each group of plain parameters in one tensor [n], each
        parameter's state["step"] a 0-d view of its entry (0 for one without state yet)."""
        for i, group in enumerate(self.param_groups):
            if "bank" in group:
                continue
            ps = group["params"]
            old = [self.state.get(p, {}).get("step") for p in ps]
            counts = torch.zeros(len(ps), dtype=torch.float32, device=ps[0].device)
            for j, (p, step) in enumerate(zip(ps, old)):  # once per optimiser or checkpoint
                if step is not None:
                    counts[j] = step.to(counts.device)
                    self.state[p]["step"] = counts[j]
            self._counts[i] = counts

    def _state(self, p: torch.Tensor, steps: Callable[[], torch.Tensor]) -> dict:
        """p's AdamW state (torch.optim.AdamW's keys, so its checkpoints read as AdamW's), made on
        first use with the step counts `steps()`: 0-d for a parameter, [G] for a bank."""
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] = steps()
        return state

    def _plain_lists(self, i: int, group: dict, x: list, g: list, m: list, v: list, step: list):
        """The group's parameters with a gradient, their moments and step counts, the counts
        moved on by one add."""
        counts, has = self._counts[i], []
        for j, p in enumerate(group["params"]):  # list building, as torch's AdamW does
            if p.grad is not None:
                state = self._state(p, lambda j=j: counts[j])
                x.append(p), g.append(p.grad), step.append(state["step"])
                m.append(state["exp_avg"]), v.append(state["exp_avg_sq"])
                has.append(j)
        if len(has) == counts.numel():
            counts.add_(1)
        elif has:
            index = torch.tensor(has).to(counts.device, non_blocking=True)  # as the bank rows
            counts.index_add_(0, index, counts.new_ones(len(has)))

    def _bank_lists(self, group: dict, x: list, g: list, m: list, v: list, step: list) -> None:
        """The present rows of the group's bank, its gradient's rows, moments and step counts."""
        (p,) = group["params"]
        rows = self.rows.get(group["bank"])
        if p.grad is None or rows is None or rows.numel() == 0:
            return
        state = self._state(
            p, lambda: torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        )
        if state["step"].device != p.device:  # a checkpoint's step counts load on the CPU
            state["step"] = state["step"].to(p.device)
        on_device = rows.to(p.device, non_blocking=True)
        grad = rows_of_grad(p.grad, on_device)  # [P, N]
        state["step"].index_add_(0, on_device, state["step"].new_ones(rows.numel()))
        x += pick_rows(p, rows)
        g += grad.unbind()
        m += pick_rows(state["exp_avg"], rows)
        v += pick_rows(state["exp_avg_sq"], rows)
        step += pick_rows(state["step"], rows)


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
