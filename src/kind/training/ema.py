"""Exponential moving average of the trainable parameters, each averaged over its own updates.

A parameter that got no gradient in a step (the tailor of a class absent from the batch) is left
alone, and its decay warm-up counts only its own updates: the average of a class's tailors, like the
tailors themselves, depends on that class's steps only (docs/KIND.md invariant 2).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}
        self.counts = dict.fromkeys(self.params, 0)

    @torch.no_grad()
    def update(self) -> None:
        """Call after the optimiser step, before gradients are cleared."""
        groups: dict[float, tuple[list, list]] = defaultdict(lambda: ([], []))
        for n, p in self.params.items():
            if p.grad is None:
                continue
            c = self.counts[n]
            weight = 1 - min(self.decay, (1 + c) / (10 + c))
            groups[weight][0].append(self.shadow[n])
            groups[weight][1].append(p.detach())
            self.counts[n] = c + 1
        for weight, (shadow, current) in groups.items():
            torch._foreach_lerp_(shadow, current, weight)

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

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        return self.shadow, self.counts

    def load(self, shadow: dict[str, torch.Tensor], counts: dict[str, int]) -> None:
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
        for n, t in shadow.items():
            self.shadow[n].copy_(t)
        self.counts = {n: int(counts[n]) for n in self.shadow}
