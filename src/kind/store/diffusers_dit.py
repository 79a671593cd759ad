"""diffusers' `DiTTransformer2DModel` folder (`config.json` + `diffusion_pytorch_model.safetensors`)
to and from kind-dit's dense tensor names.

diffusers ports DiT block for block under other names: `pos_embed.proj` is the patch embedding,
`transformer_blocks.N.attn1.to_q|to_k|to_v|to_out.0` the attention, `ff.net.0.proj`/`ff.net.2` the
MLP, `norm1.linear` the block's adaLN modulation, `proj_out_1`/`proj_out_2` the final layer's. Each
block carries its own copy of the timestep MLP and the label table (`norm1.emb`; diffusers'
conversion of DiT copies the one DiT has into every block; the final layer reads block 0's), so
reading a folder checks that the copies agree and writing one repeats them. Weights are read from
safetensors only (never a pickle). diffusers first saved DiT (0.12 on) as a `Transformer2DModel`
with `norm_type` "ada_norm_zero", as facebook/DiT-XL-2-256 on the Hub still is; diffusers now reads
that as a DiTTransformer2DModel, the same tensors, and so does kind-dit. Which kind-dit size a
folder is, and how the position embedding's layout is reconciled, is `kind.store.interop`'s job.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, SchedulerMixin

from kind.core.diffusion import PREDICTIONS, SCHEDULES, DiffusionConfig
from kind.io import atomic_save_tensors, is_a, read_json, read_tensors, write_json
from kind.store.dit_official import block_count, check_dims, check_names

CONFIG, WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
CLASS_NAME = "DiTTransformer2DModel"
LEGACY_CLASS = "Transformer2DModel"  # diffusers' first DiT class, with norm_type "ada_norm_zero"
DIT_EPS = 1e-6  # DiT's LayerNorm eps everywhere; diffusers uses `norm_eps` before the MLP

# diffusers name -> kind-dit name, within a block and at the top
_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_q": "attn.q",
    "attn1.to_k": "attn.k",
    "attn1.to_v": "attn.v",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_EMB = {
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
}
_TOP = {
    "pos_embed.proj": "x_embedder",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_LABELS = "norm1.emb.class_embedder.embedding_table.weight"
_BLOCKS = re.compile(r"transformer_blocks\.(\d+)\.")
_WB = ("weight", "bias")

# config values kind-dit's DiT (DiT's architecture) has no other setting for
_FIXED = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
}


def find_folder(path: Path) -> Path | None:
    """The DiTTransformer2DModel folder at `path`: the folder itself, or the `transformer/`
    sub-folder of a DiTPipeline folder; None when neither holds a config.json."""
    path = Path(path)
    for folder in (path, path / "transformer"):
        if (folder / CONFIG).is_file():
            return folder
    return None


def pipeline_diffusion(path: Path, dit_diffusion: dict) -> tuple[dict, str] | None:
    """(diffusion config, a note) that the scheduler of the DiTPipeline folder `path` states (its
    `scheduler/scheduler_config.json`, read with diffusers' defaults for what it leaves out), on
    top of `dit_diffusion`; None for a folder without one. A setting kind-dit's diffusion cannot
    hold (another beta schedule, trained betas, zero-SNR rescaling) is refused: imported with
    DiT's, the model would sample from the wrong noise levels without a word."""
    config_path = Path(path) / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        return None
    raw = read_json(config_path)
    cls = getattr(diffusers, str(raw.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        cls = DDPMScheduler  # a scheduler diffusers no longer has: its common keys still apply
    try:
        config = dict(cls.from_config(raw).config)
    except Exception as e:  # diffusers' own checks of the values raise what they choose
        raise ValueError(f"{config_path} is not a scheduler config diffusers reads ({e})") from e
    prediction = {v: k for k, v in PREDICTIONS.items()}.get(config.get("prediction_type"))
    schedule = {v: k for k, v in SCHEDULES.items()}.get(config.get("beta_schedule"))
    steps = config.get("num_train_timesteps")
    problems = [
        f"{key} {config.get(key)!r} (kind-dit has {', '.join(map(repr, allowed))})"
        for key, value, allowed in (
            ("prediction_type", prediction, PREDICTIONS.values()),
            ("beta_schedule", schedule, SCHEDULES.values()),
        )
        if value is None
    ]
    if config.get("trained_betas") is not None:
        problems.append("trained_betas (kind-dit computes its betas from the schedule)")
    if config.get("rescale_betas_zero_snr"):
        problems.append("rescale_betas_zero_snr (kind-dit's schedules end short of zero SNR)")
    if not problems and schedule == "linear":  # kind-dit's linear ends are DiT's, scaled by 1000/T
        ours = DiffusionConfig(schedule="linear", num_timesteps=steps).schedule_args()
        if not all(
            math.isclose(config[k], ours[k], rel_tol=1e-6) for k in ("beta_start", "beta_end")
        ):
            problems.append(
                f"linear betas {config['beta_start']:g}..{config['beta_end']:g} over {steps} steps "
                f"(kind-dit's are {ours['beta_start']:g}..{ours['beta_end']:g})"
            )
    if problems:
        raise ValueError(
            f"{config_path} states a diffusion kind-dit cannot sample: {'; '.join(problems)}; "
            "import the transformer/ folder alone to sample it with DiT's diffusion instead"
        )
    clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample") else None
    diffusion = dit_diffusion | {"prediction": prediction, "schedule": schedule,
                                 "num_timesteps": steps, "clip_x0": clip}  # fmt: skip
    return diffusion, (
        f"diffusion read from {config_path}: {prediction}-prediction, {schedule} schedule, "
        f"{steps} steps, " + (f"x0 clipped to ±{clip:g}" if clip else "no x0 clipping")
    )


def diffusers_keys(depth: int) -> list[str]:
    """Every tensor name of a DiTTransformer2DModel with `depth` blocks."""
    names = list(_TOP)
    for i in range(depth):
        names += [f"transformer_blocks.{i}.{n}" for n in (*_EMB, *_BLOCK)]
    keys = [f"{n}.{w}" for n in names for w in _WB]
    return keys + [f"transformer_blocks.{i}.{_LABELS}" for i in range(depth)]


_INT_KEYS = ("sample_size", "in_channels", "out_channels", "num_attention_heads",
             "attention_head_dim", "num_layers", "num_embeds_ada_norm", "patch_size")  # fmt: skip
# diffusers' DiTTransformer2DModel defaults for the settings kind-dit reads: what diffusers builds
# where config.json gives none. A null one (no model diffusers can build) is read as left out; not
# so out_channels and num_embeds_ada_norm, whose null means in_channels and no classes
_DEFAULTS = {"sample_size": 32, "patch_size": 2, "in_channels": 4, "num_attention_heads": 16,
            "attention_head_dim": 72, "num_layers": 28, "norm_eps": 1e-5}  # fmt: skip


def _shard_names(index: Path, folder: Path) -> list[str]:
    """The weight files a sharded folder's index names: plain file names in `folder` (a path
    elsewhere would read a file the folder does not hold)."""
    weight_map = read_json(index, "weight_map")["weight_map"]
    if not isinstance(weight_map, dict):
        raise ValueError(
            f"{index}: weight_map is a JSON {type(weight_map).__name__}, not an object of tensor "
            "name -> file name; the file is damaged"
        )
    for name in weight_map.values():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise ValueError(
                f"{index}: weight_map names {name!r}, not the name of a file in {folder}; the "
                "file is damaged or was not written by diffusers"
            )
    return sorted(set(weight_map.values()))


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a DiTTransformer2DModel folder (or of diffusers' older DiT
    Transformer2DModel); a clear error for anything else."""
    folder = Path(folder)
    config = read_json(folder / CONFIG)
    name = config.get("_class_name", CLASS_NAME)
    if name == LEGACY_CLASS and config.get("norm_type") != "ada_norm_zero":
        raise ValueError(
            f"{folder} holds a diffusers {LEGACY_CLASS} with norm_type "
            f"{config.get('norm_type')!r}, not a DiT (whose norm_type is 'ada_norm_zero'); give "
            "the DiT transformer folder (a DiTPipeline's transformer/)"
        )
    if name not in (CLASS_NAME, LEGACY_CLASS):
        raise ValueError(
            f"{folder} holds a diffusers {name}, not a {CLASS_NAME}; give the DiT transformer "
            "folder (a DiTPipeline's transformer/)"
        )
    config = {k: v for k, v in config.items() if v is not None or k not in _DEFAULTS}
    for key, value in config.items():  # the shapes read from it below are whole numbers
        if key in _INT_KEYS and value is not None and not is_a(value, int):
            raise ValueError(f"{folder / CONFIG}: {key} = {value!r} is not an integer")
        if key == "norm_eps" and not is_a(value, float):
            raise ValueError(f"{folder / CONFIG}: norm_eps = {value!r} is not a number")
    if (folder / WEIGHTS).is_file():
        return config, read_tensors(folder / WEIGHTS)
    if (folder / INDEX).is_file():  # sharded: the index names the file of every tensor
        state: dict[str, torch.Tensor] = {}
        for shard in _shard_names(folder / INDEX, folder):
            state |= read_tensors(folder / shard)
        return config, state
    pickled = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.bin"))
    hint = (
        f" (it has {', '.join(pickled)}: kind-dit reads safetensors only, never pickles; "
        "re-save it with save_pretrained(..., safe_serialization=True))"
        if pickled
        else ""
    )
    raise ValueError(f"{folder} has no {WEIGHTS}{hint}")


def check_config(config: dict, folder: Path) -> list[str]:
    """Refuse settings kind-dit's DiT cannot compute; notes on the ones it computes as DiT does
    rather than as diffusers does, and on those config.json leaves to diffusers' defaults."""
    bad = [
        f"{k} = {config[k]!r} (DiT: {v!r})"
        for k, v in _FIXED.items()
        if k in config and config[k] != v
    ]
    if config.get("num_embeds_ada_norm") is None:
        bad.append("num_embeds_ada_norm = None (a class-conditional DiT has a class count)")
    if bad:
        raise ValueError(
            f"{folder}/{CONFIG} describes an architecture kind-dit's DiT has no option for: "
            + "; ".join(bad)
        )
    notes = []
    unstated = [k for k in _DEFAULTS if k not in config and k != "norm_eps"]
    if unstated:  # the one below says what the missing norm_eps means
        notes.append(
            f"{folder}/{CONFIG} gives no {', '.join(unstated)}; read as diffusers' defaults "
            f"({', '.join(str(_DEFAULTS[k]) for k in unstated)})"
        )
    eps = config.get("norm_eps", _DEFAULTS["norm_eps"])
    if eps != DIT_EPS:
        notes.append(
            f"diffusers normalises before each MLP with eps {eps:g} (norm_eps); kind-dit, like "
            f"DiT, with {DIT_EPS:g}"
        )
    return notes


def to_kind(
    config: dict, state: dict[str, torch.Tensor], what: str
) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """(kind-dit dense tensors, hints, kind name -> diffusers name) of a folder's tensors.

    hints: `image_size`, `patch`, `in_channels`, `out_channels`, `heads`, `head_dim` and
    `num_classes` as the config states them (diffusers' defaults where it does not)."""
    depth = config.get("num_layers", _DEFAULTS["num_layers"])
    if depth < 1:
        raise ValueError(f"{what}: num_layers = {depth!r}; a DiT has at least one block")
    found = block_count(state, _BLOCKS)
    if found and found != depth:  # said here rather than as a list of missing or unknown blocks
        raise ValueError(
            f"{what}: config.json says num_layers = {depth} (diffusers' default where it gives "
            f"none), the weights hold {found} blocks"
        )
    check_names(state, diffusers_keys(depth), what)
    check_dims(state, "pos_embed.proj.weight", what)
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for w in _WB:
        for theirs, ours in _TOP.items():
            out[f"{ours}.{w}"], names[f"{ours}.{w}"] = state[f"{theirs}.{w}"], f"{theirs}.{w}"
        for i in range(depth):
            b = f"transformer_blocks.{i}."
            for theirs, ours in _BLOCK.items():
                key = f"blocks.{i}.{ours}.{w}"
                out[key], names[key] = state[f"{b}{theirs}.{w}"], f"{b}{theirs}.{w}"
    # one timestep MLP and label table, repeated in every block: take block 0's, check the rest
    shared = [f"{n}.{w}" for n in _EMB for w in _WB] + [_LABELS]
    for i in range(1, depth):
        differ = [
            n for n in shared if not torch.equal(state[f"transformer_blocks.{i}.{n}"],
                                                 state[f"transformer_blocks.0.{n}"])
        ]  # fmt: skip
        if differ:
            raise ValueError(
                f"{what}: block {i}'s {', '.join(differ)} differ from block 0's; DiT (and "
                "kind-dit) has one timestep embedder and one label table for all blocks, as "
                "diffusers' conversion of DiT writes them"
            )
    for n in _EMB:
        for w in _WB:
            key = f"{_EMB[n]}.{w}"
            out[key], names[key] = (
                state[f"transformer_blocks.0.{n}.{w}"],
                f"transformer_blocks.0.{n}.{w}",
            )
    table = state[f"transformer_blocks.0.{_LABELS}"]
    label_name = f"transformer_blocks.0.{_LABELS}"
    out["y_embedder.table"], names["y_embedder.table"] = table[:-1], f"{label_name} (class rows)"
    out["y_embedder.null"], names["y_embedder.null"] = table[-1], f"{label_name} (last row: null)"
    settings = _DEFAULTS | config
    hints = {
        "image_size": settings["sample_size"],
        "patch": settings["patch_size"],
        "in_channels": settings["in_channels"],
        "out_channels": settings.get("out_channels") or settings["in_channels"],
        "heads": settings["num_attention_heads"],
        "head_dim": settings["attention_head_dim"],
        "num_classes": settings.get("num_embeds_ada_norm"),
    }
    return out, hints, names


def from_kind(
    state: dict[str, torch.Tensor],
    *,
    depth: int,
    heads: int,
    image_size: int,
    patch: int,
    in_channels: int,
    out_channels: int,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json content, tensors) of a DiTTransformer2DModel holding kind-dit dense tensors
    (already in DiT's channel order)."""
    from diffusers import __version__

    hidden = state["x_embedder.weight"].shape[0]
    table = torch.cat([state["y_embedder.table"], state["y_embedder.null"][None]])
    config = {
        "_class_name": CLASS_NAME,
        "_diffusers_version": __version__,
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "sample_size": image_size,
        "patch_size": patch,
        "num_embeds_ada_norm": table.shape[0] - 1,
        "upcast_attention": False,
        "norm_eps": DIT_EPS,
        **_FIXED,
    }
    out = {}
    for w in _WB:
        for theirs, ours in _TOP.items():
            out[f"{theirs}.{w}"] = state[f"{ours}.{w}"]
        for i in range(depth):
            b = f"transformer_blocks.{i}."
            for theirs, ours in _BLOCK.items():
                out[f"{b}{theirs}.{w}"] = state[f"blocks.{i}.{ours}.{w}"]
            for theirs, ours in _EMB.items():
                out[f"{b}{theirs}.{w}"] = state[f"{ours}.{w}"]
    for i in range(depth):
        out[f"transformer_blocks.{i}.{_LABELS}"] = table
    return config, out


def write_folder(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """config.json and the safetensors file into `folder` (inside a directory the caller writes
    atomically); every block's copy of the shared tensors is stored as a tensor of its own."""
    folder = Path(folder)
    write_json(folder / CONFIG, config)
    atomic_save_tensors(
        folder / WEIGHTS, {k: v.clone() for k, v in state.items()}, {"format": "pt"}
    )
