"""A dense DiT made into the start of KIND pre-training (`kind-dit train --init-from DENSE`).

Every decomposed layer's learngene is the leading r_G SVD triples of the dense weight (computed in
float64) and keeps its bias; every class-agnostic dense parameter is copied; each class's label
row comes from the dense model's row of the class of the same name, the null row from its null
row; the tailors start fresh (`TailorBank.reset`, docs/KIND.md, initialisation). With
rank_learngene = full rank the start computes the dense model's unconditional outputs to fp32
rounding, and its class outputs too when `tailor_sigma` = 0 (the default 0.01 adds the fresh
tailors).

Pure model-to-model: loading the dense model and recording where it came from is the caller's
(kind.training.loop). A module of its own rather than part of `kind.core.decomposition`, which
takes KIND models apart: this builds one, and owns the compatibility check that comes first.
"""

from __future__ import annotations

import torch
from torch import nn

from kind.core.model import DiT, ModelConfig, parse_size

# tensors kindify fills itself rather than copying by name
_OWN = ("tailors.rows", "y_embedder.table")


class KindifyError(ValueError):
    """A dense model that cannot start this KIND model; the message says what to change."""


def check_kindify(dense: nn.Module, cfg: ModelConfig) -> None:
    """Raise KindifyError unless `dense` is a dense DiT that can start a KIND model of `cfg`: same
    size and patch, image size, channels, learned σ and MLP ratio, and every class of `cfg`
    (matched by name) held by the dense model."""
    config = getattr(dense, "config", None)
    if not isinstance(dense, DiT) or config is None:
        raise KindifyError(
            f"--init-from needs a dense DiT; got a {type(dense).__name__} (a merged model folds "
            "one class in: start from the dense run or model directory instead)"
        )
    if config.kind:
        raise KindifyError(
            "--init-from needs a dense DiT, and this model is already KIND (learngenes and "
            "tailors): to reuse a KIND model's learngenes for new classes, run `kind-dit "
            "transfer` on its parts directory (`kind-dit decompose` writes one)"
        )
    if not cfg.kind:
        raise KindifyError(
            "--init-from makes a KIND model from a dense one; use --model kind (model.kind=true)"
        )
    d_base, d_patch = parse_size(config.size)
    k_base, k_patch = parse_size(cfg.size)
    fixes = []
    if (d_base, d_patch) != (k_base, k_patch):
        fixes.append(f"size {cfg.size} -> {d_base}/{d_patch} (--size {d_base}/{d_patch})")
    for key, flag in (("image_size", "model.image_size"), ("in_channels", "model.in_channels"),
                      ("learn_sigma", "model.learn_sigma"), ("mlp_ratio", "model.mlp_ratio")):  # fmt: skip
        want, have = getattr(config, key), getattr(cfg, key)
        if want != have:
            value = str(want).lower() if isinstance(want, bool) else want
            fixes.append(f"{key} {have} -> {want} (--set {flag}={value})")
    if fixes:
        raise KindifyError(
            "the dense model's architecture differs from this run's: "
            + "; ".join(fixes)
            + ". Set the run's model to the dense model's (data are resized to its image size "
            "and channels)"
        )
    held = {config.class_names[c] for c in config.held_classes}
    missing = [n for n in cfg.class_names if n not in held]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" … ({len(missing)} in all)" if len(missing) > 10 else ""
        )
        raise KindifyError(
            f"the data's class(es) {shown} are not in the dense model, which holds "
            f"{len(held)} classes ({', '.join(sorted(held)[:10])}{' …' if len(held) > 10 else ''}); "
            "train on classes it holds (e.g. mnist:0-2 or folder:cat,dog), or start without "
            "--init-from"
        )


@torch.no_grad()
def kindify(dense: DiT, cfg: ModelConfig) -> DiT:
    """A KIND model of `cfg` started from dense DiT `dense` (see the module docstring).

    The tailors are random (torch's global generator: seed it first for a reproducible start)."""
    check_kindify(dense, cfg)
    model = DiT(cfg)
    own = dense.state_dict()
    decomposed = {name for name, _ in model.kind_layers()}
    for name, layer in model.kind_layers():
        source = dense.get_submodule(name)
        if not isinstance(source, nn.Linear):  # an architecture check would have caught it
            raise KindifyError(f"dense layer {name} is a {type(source).__name__}, not a linear")
        w = source.weight.double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # float64: exact to fp32 rounding
        r = layer.rank_learngene
        layer.U.copy_(u[:, :r])
        layer.S.copy_(s[:r])
        layer.V.copy_(vh[:r].T)
        if layer.bias is not None:
            layer.bias.copy_(source.bias)
    state = model.state_dict()
    for key, tensor in state.items():
        if key in _OWN or key.rpartition(".")[0] in decomposed:
            continue
        if key not in own or own[key].shape != tensor.shape:
            raise KindifyError(f"the dense model has no {key} of shape {tuple(tensor.shape)}")
        tensor.copy_(own[key])
    # label rows by class name; the null row is class-agnostic and was copied above
    index = {n: c for c, n in enumerate(dense.config.class_names)}
    table, source_table = model.y_embedder.table, dense.y_embedder.table
    for c in cfg.held_classes:
        src = dense.y_embedder.host_row_of[index[cfg.class_names[c]]]
        table[model.y_embedder.host_row_of[c]] = source_table[src]
    model.reset_tailors()  # fresh, outside each learngene's subspace
    return model
