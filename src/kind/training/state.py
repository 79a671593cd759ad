"""Everything a run needs to continue exactly where it stopped, and how it saves and restores itself.

A checkpoint holds the model, the EMA of its trainable parameters, the optimiser state (tensors keyed
by parameter name), the RNG states (the batch and noise generators every rank holds identically, and
torch's global ones) and `state.json` with the step, the EMA counts, the optimiser's
hyper-parameters, the gradient scaler and the training seconds so far; `checksums.json` holds the
sha256 of every file, checked before a resume reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kind.core.model import DiT, is_per_part, load_state
from kind.io import (
    atomic_dir,
    atomic_save_tensors,
    is_a,
    read_json,
    read_tensors,
    type_name,
    verify_checksums,
    write_checksums,
    write_json,
)
from kind.store.runs import (
    checkpoint_dir,
    checkpoint_step,
    load_optimizer,
    optimizer_tensors,
    prune_checkpoints,
)
from kind.training.config import TrainConfig
from kind.training.ema import EMA
from kind.training.optim import MaskedAdamW, masked_adamw

# what `TrainState.save` writes into state.json, as `restore` checks it
STATE_KEYS = {
    "step": int,
    "ema_counts": dict[str, int | list[int]],
    "param_groups": list[dict],
    "grad_scaler": dict | None,
    "elapsed_s": float,
    "skipped_steps": int,
}

# the optimiser settings a run's config sets (`TrainState.create`): a resume that changes them
# applies them, rather than the checkpoint's (lr is set again every step anyway)
CONFIGURED = ("lr", "weight_decay")


@dataclass
class TrainState:
    model: DiT
    names: list[str]  # trainable parameters, in optimiser order
    optimizer: MaskedAdamW
    ema: EMA
    gens: dict[str, torch.Generator]  # "data" (CPU) and "noise" (the device's)
    scaler: torch.amp.GradScaler
    step: int = 0
    seconds: float = 0.0  # training seconds of earlier calls (a resumed run)
    skipped: int = 0  # steps not applied because their loss or gradient was non-finite
    bad_in_row: int = 0  # such steps since the last applied one

    @classmethod
    def create(cls, model: DiT, tc: TrainConfig, device: torch.device) -> TrainState:
        """A fresh state for `model`: AdamW and the EMA over its parameters with requires_grad,
        generators seeded from `tc.seed`. Only trainable parameters are optimised (a transfer
        freezes the learngenes this way)."""
        optimizer, names, banks = masked_adamw(model, tc.lr, tc.weight_decay)
        gens = {
            "data": torch.Generator().manual_seed(tc.seed),
            "noise": torch.Generator(device).manual_seed(tc.seed + 1),
        }
        scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
        named = dict(model.named_parameters())
        ema = EMA([(n, named[n]) for n in names], tc.ema_decay, banks)
        return cls(model, names, optimizer, ema, gens, scaler)

    def nonfinite(self) -> list[str]:
        """Names of the weights (model or EMA) holding a NaN or an infinity; a check made before
        every save, never in the step."""
        tensors = self.model.state_dict().items()
        bad = [n for n, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
        return bad + [f"ema:{n}" for n, t in self.ema.shadow.items() if not torch.isfinite(t).all()]

    def save(self, run_dir: Path, keep: int, seconds: float) -> Path:
        """Write checkpoint `step_NNNNNNN` atomically, then drop all but the `keep` newest."""
        path = checkpoint_dir(run_dir, self.step)
        with atomic_dir(path, replace=True) as d:  # a resumed run saves its first step again
            atomic_save_tensors(d / "model.safetensors", self.model.state_dict())
            shadow, counts = self.ema.state()
            atomic_save_tensors(d / "ema.safetensors", shadow)
            tensors, groups = optimizer_tensors(self.optimizer, self.names)
            atomic_save_tensors(d / "optimizer.safetensors", tensors)
            atomic_save_tensors(d / "rng.safetensors", self._rng_tensors())
            state = {
                "step": self.step,
                "ema_counts": counts,
                "param_groups": groups,
                "grad_scaler": dict(self.scaler.state_dict()),
                "elapsed_s": seconds,
                "skipped_steps": self.skipped,
            }
            write_json(d / "state.json", state)
            write_checksums(d)
        prune_checkpoints(run_dir, keep, self.step)
        return path

    def restore(self, path: Path) -> None:
        """Load checkpoint `path` into this state (built for the same model and settings), after
        checking every file against the checkpoint's checksums."""
        verify_checksums(path)
        state = self._read_state(path)
        load_state(self.model, read_tensors(path / "model.safetensors"), path)
        ema, counts = read_tensors(path / "ema.safetensors"), state["ema_counts"]
        optim, groups = read_tensors(path / "optimizer.safetensors"), state["param_groups"]
        if "y_embedder.table" in self.ema.shadow and "y_embedder.table" not in ema:
            ema, counts, optim, groups = self._from_per_group(ema, counts, optim, groups)
        self.ema.load(ema, counts)
        load_optimizer(self.optimizer, self.names, optim, groups, keep=CONFIGURED)
        self._restore_rng(read_tensors(path / "rng.safetensors"))
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step, self.seconds = int(state["step"]), float(state.get("elapsed_s", 0.0))
        self.skipped = int(state.get("skipped_steps", 0))

    @staticmethod
    def _read_state(path: Path) -> dict:
        """Checkpoint `path`'s state.json with its keys of the kinds `save` writes and its step
        the checkpoint's own: a hand-edited or damaged file (its checksums removed with it) is an
        error that names it, not a KeyError or a negative step in the middle of the resume."""
        file = path / "state.json"
        state = read_json(file, "step", "ema_counts", "param_groups")
        bad = [
            f"{key} is {state[key]!r:.60}, not a {type_name(kind)}"
            for key, kind in STATE_KEYS.items()
            if key in state and not is_a(state[key], kind)
        ]
        if not bad and state["step"] != checkpoint_step(path):
            bad = [f"step is {state['step']}, not the {checkpoint_step(path)} its folder says"]
        if bad:
            raise ValueError(
                f"{file}: {'; '.join(bad)}; the checkpoint is damaged: move {path.name} aside to "
                "resume from the one before, or start again with --restart"
            )
        return state

    def _from_per_group(self, ema: dict, counts: dict, optim: dict, groups: list) -> tuple:
        """A checkpoint written by kind-dit 0.1 (a tensor per tailor group and per label row, one
        AdamW group) in this version's banks, so runs started with 0.1 resume. A group or class
        that never had optimiser state gets zeros and step 0, as AdamW would have started it."""
        model = self.model
        first = model.gated[0][0] if model.gated else None
        row_keys = {
            "tailors.rows": [f"{first}.tailors.{g}.U" for g in model.tailors.groups]
            if model.tailors is not None else [],
            "y_embedder.table": [f"y_embedder.rows.{c}" for c in model.config.held_classes],
        }  # fmt: skip
        ema = model.banked_state(ema, missing=lambda t: t)  # never averaged: still the start
        per_row = {bank: [counts.get(k, 0) for k in keys] for bank, keys in row_keys.items()}
        counts = {k: v for k, v in counts.items() if not is_per_part(k)} | per_row
        by_key: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in optim.items():
            param, _, key = name.rpartition("/")
            by_key.setdefault(key, {})[param] = tensor
        steps = by_key.pop("step", {})
        optim = {}
        for key, tensors in by_key.items():  # exp_avg, exp_avg_sq
            banked = model.banked_state(tensors, missing=torch.zeros_like)
            optim |= {f"{n}/{key}": t for n, t in banked.items() if n in self.names}
        optim |= {f"{n}/step": t for n, t in steps.items() if not is_per_part(n)}
        for bank, keys in row_keys.items():
            if bank in self.names:
                optim[f"{bank}/step"] = torch.tensor(
                    [float(steps[k]) if k in steps else 0.0 for k in keys], dtype=torch.float32
                )
        banks = [g.get("bank") for g in self.optimizer.param_groups]
        groups = [dict(groups[0]) | ({"bank": b} if b else {}) for b in banks]
        return ema, counts, optim, groups

    def _rng_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"gen.{k}": g.get_state() for k, g in self.gens.items()}
        state["torch.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state |= {f"torch.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        return state

    def _restore_rng(self, state: dict[str, torch.Tensor]) -> None:
        for k, g in self.gens.items():
            if state[f"gen.{k}"].numel() != g.get_state().numel():  # a CUDA Philox state on a CPU
                raise ValueError(
                    f"the checkpoint's {k} random stream was saved on another device type than "
                    f"{g.device.type}; resume on the device type the run trained on (its samples "
                    "would not continue bit for bit), or start again with --restart"
                )
            g.set_state(state[f"gen.{k}"])
        torch.set_rng_state(state["torch.cpu"])
        cuda = [state[k] for k in sorted(state) if k.startswith("torch.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
