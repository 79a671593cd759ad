"""Exponential moving average of the trainable parameters, each averaged over its own updates.

A parameter that got no gradient in a step is left alone, and its decay warm-up counts only its own
updates. A row bank (`DiT.row_banks`: tailors, label rows) is averaged row by row, over the rows the
step updated (the optimiser's `rows`), each row with its own count: the average of a class's
tailors, like the tailors themselves, depends on that class's steps only (docs/KIND.md invariant 2).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kind.io import is_a
from kind.training.optim import pick_rows


def _weight(count: torch.Tensor | int, decay: float) -> torch.Tensor | float:
    """How far the average moves towards the weights after `count` earlier updates."""
    warm = (1 + count) / (10 + count)
    return 1 - (
        torch.clamp(warm, max=decay) if isinstance(warm, torch.Tensor) else min(decay, warm)
    )


class EMA:
    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        decay: float,
        banks: dict[str, str] | None = None,
    ):
        """`banks`: parameter name -> the key of its rows in `update(rows)`, for row banks."""
        self.decay = decay
        self.params = dict(named_params)
        self.data = {n: p.detach() for n, p in self.params.items()}  # detached once, not per update
        self.banks = {n: k for n, k in (banks or {}).items() if n in self.params}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}
        self.counts: dict[str, int | torch.Tensor] = {
            n: torch.zeros(p.shape[0], dtype=torch.long) if n in self.banks else 0
            for n, p in self.params.items()
        }

    @torch.no_grad()
    def update(self, rows: dict[str, torch.Tensor] | None = None) -> None:
        """Call after the optimiser step, before gradients are cleared, with the rows the step
        updated in each bank. One foreach lerp per distinct update count (one in a usual run,
        where every parameter moves every step), the weight computed once per count."""
        groups: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
        # Python builds the lists the foreach kernels take, as torch.optim does: no compute op
        # runs per parameter (a parameter without a gradient this step keeps its count)
        for n, p in self.params.items():
            if p.grad is None:
                continue
            if n in self.banks:
                self._update_rows(n, (rows or {}).get(self.banks[n]))
                continue
            c = self.counts[n]
            shadow, current = groups[c]
            shadow.append(self.shadow[n]), current.append(self.data[n])
            self.counts[n] = c + 1
        for count, (shadow, current) in groups.items():
            torch._foreach_lerp_(shadow, current, _weight(count, self.decay))

    def _update_rows(self, name: str, rows: torch.Tensor | None) -> None:
        if rows is None or rows.numel() == 0:
            return
        rows = rows.cpu()  # host indices, like the counts
        counts = self.counts[name]
        weights = _weight(counts[rows].double(), self.decay).tolist()  # one per row
        torch._foreach_lerp_(pick_rows(self.shadow[name], rows), pick_rows(self.data[name], rows),
                             weights)  # fmt: skip
        counts[rows] += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily swap the EMA weights into the model (for sampling), then restore."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the EMA weights into the model for good (the end of a run)."""
        for n, p in self.params.items():
            p.copy_(self.shadow[n])

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, int | list[int]]]:
        counts = {
            n: c.tolist() if isinstance(c, torch.Tensor) else c for n, c in self.counts.items()
        }
        return self.shadow, counts

    def load(self, shadow: dict[str, torch.Tensor], counts: dict[str, int | list[int]]) -> None:
        if set(shadow) != set(self.shadow):
            extra, missing = (
                sorted(set(shadow) - set(self.shadow)),
                sorted(set(self.shadow) - set(shadow)),
            )
            raise ValueError(
                "the checkpoint trained other parameters than this run would "
                f"({len(extra)} only in the checkpoint, e.g. {extra[:2]}; {len(missing)} only "
                f"here, e.g. {missing[:2]}): the run was started with other settings (another "
                "--method, --train-learngenes, --rank-tailor or --null-tailor); resume with the "
                "ones it was started with"
            )
        bad = [n for n in self.shadow if not (
            is_a(counts.get(n), list[int]) and len(counts[n]) == self.shadow[n].shape[0]
            if n in self.banks else is_a(counts.get(n), int))]  # fmt: skip
        if bad:
            raise ValueError(
                f"the checkpoint's EMA update counts are missing or malformed for {bad[:2]}: its "
                "state.json is damaged"
            )
        shaped = [n for n, t in shadow.items() if t.shape != self.shadow[n].shape]
        if shaped:
            n = shaped[0]
            raise ValueError(
                f"the checkpoint's EMA of {n} is {tuple(shadow[n].shape)}, this run's parameter "
                f"{tuple(self.shadow[n].shape)}: the checkpoint is of another model (resume with "
                "the settings the run was started with)"
            )
        for n, t in shadow.items():
            self.shadow[n].copy_(t)
        self.counts = {
            n: torch.tensor(counts[n], dtype=torch.long) if n in self.banks else int(counts[n])
            for n in self.shadow
        }
