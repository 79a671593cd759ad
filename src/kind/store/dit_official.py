"""The official DiT checkpoint (facebookresearch/DiT, `models.py`) read into kind-dit's dense
tensor names.

A DiT `.pt` file is a state dict, read only with `torch.load(weights_only=True)` (tensors and
plain containers; nothing is unpickled that could run code), or a checkpoint of DiT's `train.py`
({"model", "ema", "opt", "args"}, its `args` an `argparse.Namespace`, a plain record that
is let through), whose "ema" entry is the model. Its names are those of DiT's modules:
`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table` (one row per class, then
the null class), `pos_embed` (the fixed 2-D sine-cosine table), and per block a fused
`attn.qkv` ([3·hidden, hidden]: the q, k and v rows stacked in that order), `attn.proj`,
`mlp.fc1`/`mlp.fc2` and `adaLN_modulation.1`, then `final_layer.linear` and
`final_layer.adaLN_modulation.1`. This module checks that set of names and renames it to the
tensors of `kind.core.model.DiT` (q, k, v apart; the class rows and the null row apart). Which
kind-dit size that is, and how the position embedding's layout is reconciled, is
`kind.store.interop`'s job.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed

LICENSE = "CC-BY-NC-4.0"
LICENSE_URL = "https://creativecommons.org/licenses/by-nc/4.0/"

# kind-dit name (within a block) <- DiT name, for the tensors that keep their shape
_BLOCK_SAME = ("attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
_TOP_SAME = ("t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
             "final_layer.adaLN_modulation.1")  # fmt: skip
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def dit_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """DiT's fixed position embedding [grid*grid, dim], as `models.py` computes it (MAE's
    `get_2d_sincos_pos_embed`, which diffusers ports: with the grid as its base size it does not
    rescale positions): the first half of the channels codes a token's column, the second half
    its row."""
    return get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="pt").float()


def official_keys(depth: int) -> list[str]:
    """Every tensor name of a DiT state dict with `depth` blocks."""
    keys = ["pos_embed", "y_embedder.embedding_table.weight"]
    names = ["x_embedder.proj", *_TOP_SAME]
    for i in range(depth):
        names += [f"blocks.{i}.{n}" for n in ("attn.qkv", *_BLOCK_SAME)]
    return keys + [f"{n}.{w}" for n in names for w in ("weight", "bias")]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a DiT `.pt` file (a training checkpoint's "ema" entry, as DiT's
    `find_model` takes it); a clear error for anything else."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py's "args"
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors come in many types
        # torch's message says which class the safe load refused, then advises an unsafe load
        held = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if held:
            raise ValueError(
                f"{path} holds objects other than tensors (a {held.group(1)}), which a safe "
                "load refuses; save the model's state dict instead (torch.save(model.state_dict(), "
                "PATH)) or use safetensors"
            ) from None
        raise ValueError(
            f"{path} is not a PyTorch checkpoint of tensors (not a file torch.save wrote, or "
            "damaged); give an official DiT .pt state dict (e.g. DiT-XL-2-256x256.pt) or a "
            "diffusers DiTTransformer2DModel folder"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise ValueError(
            f"{path} loads, but is not a state dict (names -> tensors); give an official DiT "
            ".pt state dict"
        )
    return obj


def _list(keys: list[str], limit: int = 8) -> str:
    more = f" … ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# the prefixes a wrapper puts before every name: DistributedDataParallel's, torch.compile's
_WRAPPED = ("module.", "_orig_mod.")


def check_names(state: dict[str, torch.Tensor], expected: list[str], what: str) -> None:
    """Refuse a state dict whose names are not exactly `expected`, naming the difference."""
    missing = [k for k in expected if k not in state]
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        detail = "; ".join(
            f"{label}: {_list(keys)}"
            for label, keys in (("missing", missing), ("unknown", unknown))
            if keys
        )
        hint = (
            "; every name starts with module. or _orig_mod.: the state dict of a "
            "DistributedDataParallel or torch.compile wrapper; save the wrapped model's "
            "(model.module or model._orig_mod) state_dict() instead"
            if state and all(k.startswith(_WRAPPED) for k in state)
            else ""
        )
        raise ValueError(f"{what} does not hold a DiT's tensors ({detail}){hint}")


_SHAPES = {1: "[channels] (a bias)", 2: "[rows, columns] (a matrix)",
           4: "[hidden, channels, patch, patch] (the patch embedding's kernel)"}  # fmt: skip


def check_dims(state: dict[str, torch.Tensor], kernel: str, what: str) -> None:
    """Refuse a tensor with the wrong number of dimensions before any shape is read from it:
    biases are vectors, `kernel` (the patch embedding's weight) a 4-d convolution kernel,
    every other weight a matrix. Other names (DiT's `pos_embed`) are checked where read."""
    for key, t in state.items():
        dims = 1 if key.endswith(".bias") else 4 if key == kernel else 2
        if key.endswith((".bias", ".weight")) and t.dim() != dims:
            raise ValueError(f"{what}: {key} has shape {tuple(t.shape)}, expected {_SHAPES[dims]}")


def block_count(state: dict[str, torch.Tensor], pattern: re.Pattern = _BLOCK) -> int:
    """1 + the highest block index among the names (0 without blocks)."""
    found = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(found, default=-1) + 1


def to_kind(
    state: dict[str, torch.Tensor], what: str
) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """(kind-dit dense tensors, hints, kind name -> DiT name) of a DiT state dict.

    hints: `image_size` (from the position table's token count and the patch size) and
    `pos_embed` ([tokens, hidden], the checkpoint's own table, for the caller to check)."""
    depth = block_count(state)
    check_names(state, official_keys(depth), what)
    check_dims(state, "x_embedder.proj.weight", what)
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}

    def put(kind_name: str, dit_name: str, tensor: torch.Tensor) -> None:
        out[kind_name] = tensor
        names[kind_name] = dit_name

    for w in ("weight", "bias"):
        put(f"x_embedder.{w}", f"x_embedder.proj.{w}", state[f"x_embedder.proj.{w}"])
        for n in _TOP_SAME:
            put(f"{n}.{w}", f"{n}.{w}", state[f"{n}.{w}"])
        for i in range(depth):
            b = f"blocks.{i}."
            qkv = state[f"{b}attn.qkv.{w}"]
            if qkv.shape[0] % 3:
                raise ValueError(
                    f"{what}: {b}attn.qkv.{w} has {qkv.shape[0]} rows, not 3 x hidden size"
                )
            for part, t in zip("qkv", qkv.chunk(3, dim=0)):
                put(f"{b}attn.{part}.{w}", f"{b}attn.qkv.{w} ({part} rows)", t)
            for n in _BLOCK_SAME:
                put(f"{b}{n}.{w}", f"{b}{n}.{w}", state[f"{b}{n}.{w}"])
    table = state["y_embedder.embedding_table.weight"]
    if table.shape[0] < 2:
        raise ValueError(
            f"{what}: y_embedder.embedding_table.weight is not a [classes + 1, hidden] table "
            "with at least one class row before the null class's"
        )
    put("y_embedder.table", "y_embedder.embedding_table.weight (class rows)", table[:-1])
    put("y_embedder.null", "y_embedder.embedding_table.weight (last row: null class)", table[-1])
    hidden, patch = (
        state["x_embedder.proj.weight"].shape[0],
        state["x_embedder.proj.weight"].shape[-1],
    )
    pos = state["pos_embed"]
    pos = pos.reshape(-1, pos.shape[-1]) if pos.dim() else pos.reshape(1, 1)
    grid = math.isqrt(pos.shape[0])
    if grid * grid != pos.shape[0] or pos.shape[1] != hidden:
        raise ValueError(
            f"{what}: pos_embed has shape {tuple(state['pos_embed'].shape)}, not [1, tokens, "
            f"{hidden}] with a square number of tokens"
        )
    return out, {"image_size": grid * patch, "pos_embed": pos}, names
