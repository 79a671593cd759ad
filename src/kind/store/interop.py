"""Public DiT weights in, diffusers out.

`import_dit` turns an official DiT checkpoint (`kind.store.dit_official`) or a diffusers
`DiTTransformer2DModel` folder (`kind.store.diffusers_dit`) into a dense kind-dit model directory;
`export_diffusers` writes a dense kind-dit model (or a merged one: its class network, and its null
network beside it) as a diffusers folder. The two format modules only check and rename tensors;
this one infers the architecture, reconciles the position embedding, validates, and writes.

Exactness. kind-dit's DiT computes DiT's function (the same layers, timestep frequencies
10000^(-i/128), LayerNorm eps 1e-6) with one difference of convention: its fixed position
embedding (`kind.core.model.sincos_pos_embed`) holds DiT's two halves of channels in the other
order (row code first, column code second). Nothing in a DiT cares about the order of the
residual stream's channels (its LayerNorms have no affine weights; everything else that touches
the stream is linear or elementwise), so the same network with the stream's channels reordered is
the same function: `permute_residual` reorders every tensor that writes or reads the stream, and
an imported model computes DiT's outputs to fp32 rounding. The order is found by comparing the
model's own table with DiT's (`residual_order`); it is the identity wherever the two agree.

diffusers' port departs from DiT in two places kind-dit does not follow: its timestep features use
frequencies 10000^(-i/127) (`downscale_freq_shift=1`, not a setting) and its pre-MLP LayerNorm
uses `norm_eps` (1e-5 by default). An exported folder sets norm_eps = 1e-6; the frequencies cannot
be set, so diffusers computes an exported model's timestep embedding a little differently from
kind-dit (a note says so), and an imported folder is computed the way DiT computes it.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import torch

from kind.core.decomposition import MergedDiT
from kind.core.diffusion import DiffusionConfig
from kind.core.model import PATCHES, SIZES, DiT, ModelConfig, load_state, parse_size
from kind.data.vae import (
    DEFAULT_SCALING_FACTOR,
    check_space,
    latent_problem,
    vae_root,
    vae_space,
)
from kind.io import (
    atomic_dir,
    atomic_file,
    atomic_write_text,
    check_new_dir,
    read_json,
    sha256_file,
    verify_checksums,
    write_checksums,
    write_json,
)
from kind.store import diffusers_dit, dit_official
from kind.store.load import load_model
from kind.store.modeldir import MODEL_JSON, is_model_dir, save_model_dir
from kind.store.parts import is_parts_dir
from kind.store.runs import CONFIG_JSON as RUN_CONFIG
from kind.store.runs import latest_checkpoint

NOTICE, KIND_JSON = "NOTICE", "kind_dit.json"
UNCONDITIONAL = "unconditional"  # sub-folder of an exported merged model: its null network
# DiT's diffusion (ε-prediction, linear β, 1,000 steps; learned σ where the weights have it) and
# its sampling defaults (sample.py: 250 ancestral steps, guidance 4)
DIT_DIFFUSION = dict(
    prediction="eps", schedule="linear", num_timesteps=1000, min_snr_gamma=None, clip_x0=None
)
DIT_SAMPLE = {
    "sampler": "ddpm",
    "steps": 250,
    "cfg_scale": 4.0,
    "per_class": 8,
    "guided_channels": 3,
}  # fmt: skip  (DiT's sampler guides 3 of 4 latent channels)


SD_VAE_FACTOR = 8  # a 4-channel DiT works on SD-VAE latents, 8x smaller than its images
TIME_NOTE = (
    "diffusers' DiTTransformer2DModel computes its timestep features with frequencies "
    "10000^(-i/127) (downscale_freq_shift=1, not a setting), DiT and kind-dit with 10000^(-i/128)"
)
# licence files (LICENSE, LICENCE.md, LICENSE-MIT, COPYING, NOTICE.txt, ...: text, not a weights
# file that happens to start so) and model cards; `source-` prefixed: the copies an earlier import
# carried (and export carries on), so the licence text survives import -> export -> import
_LICENCE_FILE = re.compile(
    r"(source-)*(licen[cs]e|notice|copying)([-_][a-z0-9]+)?(\.(txt|md|rst))?", re.IGNORECASE
)
_MODEL_CARD = re.compile(r"(source-)*README\.md")
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_ROWS = re.compile(r"x_embedder\.(weight|bias)|blocks\.\d+\.(attn\.proj|mlp\.fc2)\.(weight|bias)")
_COLS = re.compile(r"blocks\.\d+\.(attn\.[qkv]|mlp\.fc1)\.weight|final_layer\.linear\.weight")
_ADALN = re.compile(r"blocks\.\d+\.adaLN_modulation\.1\.(weight|bias)")


# ---- the position embedding's channel order ------------------------------------------------


def residual_order(pos_embed: torch.Tensor, hidden: int) -> torch.Tensor:
    """The channel order of a model whose position table is `pos_embed` [tokens, hidden]
    relative to DiT's: its channel j is DiT's channel order[j]."""
    grid = math.isqrt(pos_embed.shape[0])
    dit = dit_official.dit_pos_embed(hidden, grid)
    half = hidden // 2
    swapped = torch.cat([torch.arange(half, hidden), torch.arange(half)])
    for order in (torch.arange(hidden), swapped):
        if torch.allclose(pos_embed.cpu().float(), dit[:, order], rtol=0, atol=1e-6):
            return order
    raise ValueError(
        "kind-dit's position embedding matches DiT's in neither channel order; weights cannot "
        "cross between the two exactly"
    )


def permute_residual(
    state: dict[str, torch.Tensor], order: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Dense kind-dit tensors of a network, for the same network with the residual stream's
    channel j taken from channel order[j]: the tensors that write the stream (patch embedding,
    attention projection, second MLP matrix, each adaLN chunk) reorder their rows, those that read
    it (q, k, v, first MLP matrix, final linear) their columns. The timestep and label embeddings
    feed the adaLN layers, not the stream, and stay as they are."""
    if torch.equal(order, torch.arange(len(order))):
        return dict(state)

    def rows(t: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        return t.reshape(chunks, -1, *t.shape[1:])[:, order].reshape(t.shape)

    out = dict(state)
    for key, t in state.items():
        if _ROWS.fullmatch(key):
            out[key] = rows(t)
        elif _ADALN.fullmatch(key):
            out[key] = rows(t, 6)  # shift, scale, gate for attention, then for the MLP
        elif key.startswith("final_layer.adaLN_modulation.1."):
            out[key] = rows(t, 2)  # shift, scale
        elif _COLS.fullmatch(key):
            out[key] = t[:, order]
    return out


# ---- the architecture a set of tensors describes ---------------------------------------------


def _sizes() -> str:
    return ", ".join(
        f"{b} (depth {d}, hidden {h}, {n} heads, patch {'/'.join(map(str, PATCHES[b]))})"
        for b, (d, h, n) in SIZES.items()
    )


def _dit_sample(in_channels: int) -> dict:
    """DiT's sampling defaults; guiding 3 channels is its choice for 4 latent channels only."""
    if in_channels == 4:
        return DIT_SAMPLE
    return {k: v for k, v in DIT_SAMPLE.items() if k != "guided_channels"}


def dense_config(
    state: dict[str, torch.Tensor], hints: dict, class_names: list[str] | None, what: str
) -> ModelConfig:
    """The dense kind-dit ModelConfig of DiT tensors in kind-dit's names; a clear error for an
    architecture kind-dit cannot build."""
    w = state["x_embedder.weight"]  # a 4-d kernel, as the format modules checked
    if w.shape[2] != w.shape[3]:
        raise ValueError(
            f"{what}: the patch embedding has shape {tuple(w.shape)}, not square patches"
        )
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1) + 1
    heads = hints.get("heads")
    if heads is not None and heads * hints["head_dim"] != hidden:
        raise ValueError(
            f"{what}: config.json says {heads} heads of {hints['head_dim']} channels (diffusers' "
            f"defaults where it gives none), the weights are {hidden} wide"
        )
    bases = [b for b, (d, h, n) in SIZES.items()
             if (d, h) == (depth, hidden) and heads in (None, n)]  # fmt: skip
    if not bases:
        with_heads = f", {heads} heads" if heads is not None else ""
        raise ValueError(
            f"{what} is a DiT of depth {depth}, hidden size {hidden}{with_heads}; kind-dit's "
            f"ModelConfig builds only its named sizes: {_sizes()}"
        )
    base = bases[0]
    if patch not in PATCHES[base]:
        raise ValueError(
            f"{what} uses patch {patch}; kind-dit's {base} comes with patch "
            f"{', '.join(map(str, PATCHES[base]))}"
        )
    image_size = int(hints["image_size"])
    if image_size < 1 or image_size % patch:
        raise ValueError(
            f"{what}: input size {image_size} is not a positive multiple of patch {patch}"
        )
    out_rows = state["final_layer.linear.weight"].shape[0]
    out_channels = out_rows // (patch * patch)
    if out_rows % (patch * patch) or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"{what}: the final layer gives {out_rows} values a patch for {in_channels} input "
            f"channels; kind-dit predicts {in_channels} (ε) or {2 * in_channels} (ε and a "
            "learned variance) channels"
        )
    inner = state["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = inner / hidden
    num_classes = state["y_embedder.table"].shape[0]
    for key, value in (("patch", patch), ("in_channels", in_channels),
                       ("out_channels", out_channels), ("num_classes", num_classes)):  # fmt: skip
        if hints.get(key) not in (None, value):
            raise ValueError(
                f"{what}: config.json says {key} = {hints[key]} (diffusers' default where it "
                f"gives none), the weights {value}"
            )
    names = class_names if class_names is not None else [str(c) for c in range(num_classes)]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{what}: class_names must be a list of names, got {names!r}"[:300])
    if len(names) != num_classes:
        raise ValueError(
            f"{len(names)} class names for a model with {num_classes} classes; give one name a "
            "line, in label order"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # a name picks a class: a repeated one would always pick its first
        raise ValueError(f"{what}: class names {repeated[:5]} appear more than once")
    return ModelConfig(
        size=f"{base}/{patch}",
        kind=False,
        image_size=image_size,
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        class_names=names,
        mlp_ratio=mlp_ratio,
    )


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one a line (blank lines and `#` comments skipped, as in a data spec's
    `@file`); repeated names are refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class names file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); give one class name a line") from e
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    names = [line for line in lines if line]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{path} names a class more than once: {repeated[:5]}")
    return names


def _check_tensors(
    model: DiT, state: dict[str, torch.Tensor], names: dict[str, str], what: str
) -> None:
    """Shapes that fit `model`, finite values; errors name the tensor as the source names it."""
    own = model.state_dict()
    bad = [f"{names.get(k, k)}: {tuple(state[k].shape)}, expected {tuple(v.shape)}"
           for k, v in own.items() if k in state and state[k].shape != v.shape]  # fmt: skip
    if bad:
        raise ValueError(
            f"{what}: tensors of the wrong shape for {model.config.size}: {'; '.join(bad[:5])}"
        )
    nonfinite = [names.get(k, k) for k, t in state.items() if not torch.isfinite(t).all()]
    if nonfinite:
        raise ValueError(f"{what}: NaN or infinite values in {', '.join(nonfinite[:5])}")


# ---- import ------------------------------------------------------------------------------


def _front_matter_license(readme: Path) -> str | None:
    """The `license:` of a model card's YAML front matter, if any."""
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    head = text[3:].split("\n---", 1)[0]
    found = re.search(r"^license:\s*(\S.*)$", head, re.MULTILINE)
    return found.group(1).strip().strip("'\"") if found else None


def _licence_files(src: Path, folder: Path) -> tuple[list[Path], str | None]:
    """Licence files and model cards beside a diffusers folder (and in its pipeline folder), and
    the licence a model card names."""
    files, licence = [], None
    for directory in dict.fromkeys(
        [folder, src, folder.parent if folder.name == "transformer" else folder]
    ):
        for path in sorted(directory.iterdir()):
            if path.is_file() and (
                _LICENCE_FILE.fullmatch(path.name) or _MODEL_CARD.fullmatch(path.name)
            ):
                files.append(path)
                if _MODEL_CARD.fullmatch(path.name):
                    licence = licence or _front_matter_license(path)
    return list(dict.fromkeys(files)), licence


def _copy_names(paths: list[Path]) -> list[str]:
    """`source-NAME` for each file; `source-DIR-NAME` where two directories hold a NAME."""
    count = {p.name: [q.name for q in paths].count(p.name) for p in paths}
    return [f"source-{p.parent.name}-{p.name}" if count[p.name] > 1 else f"source-{p.name}"
            for p in paths]  # fmt: skip


def _official_notice(src: Path, digest: str) -> str:
    return (
        f"This model directory was converted by `kind-dit import` from {src.name} (sha256 "
        f"{digest}),\na checkpoint in the layout of facebookresearch/DiT "
        "(https://github.com/facebookresearch/DiT).\n\n"
        "The DiT code and the pre-trained DiT weights released by Meta Platforms, Inc. are "
        "licensed under\nthe Creative Commons Attribution-NonCommercial 4.0 International licence "
        f"(CC BY-NC 4.0,\n{dit_official.LICENSE_URL}). If these are those weights, or were "
        "trained with that code, the\nlicence applies to this model: non-commercial use only, "
        'with attribution to W. Peebles and\nS. Xie, "Scalable Diffusion Models with '
        'Transformers", ICCV 2023.\n\n'
        "Changes: tensors renamed to kind-dit's DiT; each block's fused qkv split into q, k and "
        "v;\nthe null-class label row stored apart from the class rows; the residual channels "
        "reordered\nto kind-dit's position-embedding convention (the same function).\n"
    )


def _folder_notice(folder: Path, licence: str | None, copied: list[str]) -> str:
    found = (
        f"Licence named by its model card: {licence}.\n"
        if licence
        else "No licence was named in the folder; check the terms under which you obtained it.\n"
    )
    copies = f"Copies of its licence files and model card: {', '.join(copied)}.\n" if copied else ""
    return (
        f"This model directory was converted by `kind-dit import` from the diffusers\n"
        f"DiTTransformer2DModel folder {folder}.\n\n{found}{copies}"
        "(The DiT weights Meta Platforms, Inc. released, e.g. facebook/DiT-XL-2-256, are licensed "
        f"under\nCC BY-NC 4.0, {dit_official.LICENSE_URL}.)\n"
    )


def import_dit(
    src: str | Path,
    out: str | Path,
    class_names: str | Path | None = None,
    vae: str | Path | None = None,
) -> tuple[Path, list[str]]:
    """Write the dense kind-dit model directory of an official DiT checkpoint (a file) or a
    diffusers DiTTransformer2DModel folder (a directory); (its path, notes for the user).

    Everything is read and checked before `out` (new or empty) is written."""
    out = check_new_dir(out)
    src = Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if vae is not None:
        vae = vae_root(vae)
    notes: list[str] = []
    saved: dict = {}  # kind_dit.json of a folder kind-dit exported
    stated = None  # the diffusion a DiTPipeline's scheduler states
    licence_files: list[Path] = []
    if src.is_dir():
        folder = diffusers_dit.find_folder(src)
        if folder is None:
            raise ValueError(
                f"{src} is a directory without {diffusers_dit.CONFIG}: give an official DiT .pt "
                "file or a diffusers DiTTransformer2DModel folder (save_pretrained's output)"
            )
        verify_checksums(folder)  # a folder kind-dit exported records them
        config, tensors = diffusers_dit.read_folder(folder)
        notes += diffusers_dit.check_config(config, folder)
        state, hints, names = diffusers_dit.to_kind(config, tensors, str(folder))
        if (folder / KIND_JSON).is_file():
            saved = read_json(folder / KIND_JSON)
            wrong = [k for k in ("diffusion", "latent", "sample")
                     if not isinstance(saved.get(k) or {}, dict)]  # fmt: skip
            if wrong:
                raise ValueError(f"{folder / KIND_JSON}: {', '.join(wrong)} must be a mapping")
            problem = latent_problem(saved.get("latent") or {})
            if problem:
                raise ValueError(f"{folder / KIND_JSON}: {problem}; the file is damaged")
        else:
            notes.append(
                f"{TIME_NOTE}; the imported model computes DiT's, for which DiT's own weights "
                "were trained (not the one a model trained with diffusers learned)"
            )
        if saved.get("merged") not in (None, "null"):
            notes.append(
                f"this folder holds the class network of a merged model; its null class is not "
                f"the model's unconditional network (that is in {UNCONDITIONAL}/)"
            )
        if folder != src and not saved.get("diffusion"):  # a DiTPipeline: its scheduler's
            piped = diffusers_dit.pipeline_diffusion(src, DIT_DIFFUSION)
            if piped:
                stated, note = piped
                notes.append(note)
        licence_files, licence = _licence_files(src, folder)
        licence = saved.get("license") or licence
        source = {"format": "diffusers", "from": str(folder.resolve()), "license": licence}
    else:
        tensors = dit_official.read_checkpoint(src)
        state, hints, names = dit_official.to_kind(tensors, str(src))
        source = {"format": "dit-official", "from": str(src.resolve()),
                  "sha256": sha256_file(src), "license": dit_official.LICENSE}  # fmt: skip
    del tensors
    low = sorted({str(t.dtype) for t in state.values() if t.dtype != torch.float32})
    if low:
        notes.append(f"weights stored as {', '.join(low)}, converted to float32")
    state = {k: v.float() for k, v in state.items()}
    what = str(src)
    wanted = read_class_names(class_names) if class_names is not None else saved.get("class_names")
    config = dense_config(state, hints, wanted, what)
    model = DiT(config)
    hidden = state["x_embedder.weight"].shape[0]
    if "pos_embed" in hints:  # the official checkpoint's own table must be DiT's fixed one
        grid = config.image_size // model.patch
        stored = hints["pos_embed"]  # rounded to its dtype: fp16/bf16 checkpoints are common
        atol = max(1e-5, torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 1e-5
        if not torch.allclose(stored.float(), dit_official.dit_pos_embed(hidden, grid),
                              rtol=0, atol=atol):  # fmt: skip
            raise ValueError(
                f"{what}: pos_embed is not DiT's fixed sine-cosine table; kind-dit's DiT has no "
                "learned or other position embedding"
            )
    _check_tensors(model, state, names, what)
    state = permute_residual(state, residual_order(model.pos_embed, hidden))
    load_state(model, state, src)
    diffusion = DiffusionConfig.from_dict(saved.get("diffusion") or stated or DIT_DIFFUSION)
    latent = saved.get("latent")
    if latent and latent.get("latent_channels") not in (None, config.in_channels):
        raise ValueError(
            f"{what}: its latent record is of {latent['latent_channels']}-channel latents, the "
            f"model takes {config.in_channels} channels; the record is damaged"
        )
    if not saved and config.in_channels == 4:  # a latent DiT, on latents 8x smaller than images
        latent = {"vae": None, "image_size": config.image_size * SD_VAE_FACTOR}
        if source["format"] == "dit-official":  # DiT's own: the SD VAE's (either fine-tune)
            latent |= {"scaling_factor": DEFAULT_SCALING_FACTOR, "shift_factor": 0.0,
                       "latent_channels": 4, "downsampling": SD_VAE_FACTOR}  # fmt: skip
    if vae is not None:
        if not latent and config.in_channels in (1, 3):
            raise ValueError(
                f"{what} is a pixel-space model ({config.in_channels} input channels), whose "
                "samples no VAE decodes; import it without --vae"
            )
        space = vae_space(vae)
        if space["latent_channels"] != config.in_channels:
            raise ValueError(
                f"--vae {vae} makes {space['latent_channels']}-channel latents, {what} takes "
                f"{config.in_channels} channels; import with the VAE it was trained with, or "
                "without --vae"
            )
        check_space(
            latent or {},
            space,
            f"--vae {vae} is not a VAE of the latent space {what} was trained in",
            "import with that VAE (DiT's: sd-vae-ft-ema or sd-vae-ft-mse), or without --vae",
        )
        image_size = config.image_size * space["downsampling"]
        latent = (latent or {}) | space | {"vae": str(vae.resolve()), "image_size": image_size}
    if latent and not latent.get("vae"):
        notes.append("a latent model: sample it with `kind-dit sample OUT --vae VAE_DIR`")
    extra = {
        "source": source["from"],
        "imported": source | {"notes": notes},
        "sample": saved.get("sample") or ({} if saved else _dit_sample(config.in_channels)),
        "latent": latent,
    }
    copied = _copy_names(licence_files)
    if source["format"] == "dit-official":
        notice = _official_notice(src, source["sha256"])
    else:
        notice = _folder_notice(Path(source["from"]), source["license"], copied)
    with atomic_dir(out) as tmp:
        save_model_dir(tmp, model, diffusion, extra)
        atomic_write_text(tmp / NOTICE, notice)
        for path, name in zip(licence_files, copied):
            with atomic_file(tmp / name) as part:
                shutil.copyfile(path, part)
        write_checksums(tmp)
    return out, notes


# ---- export ------------------------------------------------------------------------------


def _kind_refusal(source: Path) -> ValueError:
    return ValueError(
        f"{source} is a KIND model: its attention and MLP weights are class-gated SVD factors "
        "(learngenes plus one tailor per class), which diffusers' DiT, one dense weight for "
        "every class, cannot hold. Fold one class into dense weights first: `kind-dit "
        "assemble PARTS --merge CLASS --out MODEL` (`--merge null`: the unconditional model; "
        "from a run, `kind-dit decompose RUN --out PARTS` first), then export MODEL; or export "
        "it whole as a diffusers base with one peft LoRA adapter a class: `--format peft`"
    )


def _is_kind(source: Path) -> bool:
    """Whether `source` holds a KIND (not merged) model, read from its metadata alone."""
    if is_parts_dir(source):
        return True
    for path in (source, source / "model"):
        if is_model_dir(path):
            return bool(read_json(path / MODEL_JSON, "model")["model"].get("kind", True))
    if (source / RUN_CONFIG).is_file() and latest_checkpoint(source) is not None:
        return bool(read_json(source / RUN_CONFIG).get("model", {}).get("kind", True))
    return False  # not a model at all (a diffusers folder has a config.json): load_model says so


def _to_diffusers(net: DiT, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of a dense kind-dit DiT as a DiTTransformer2DModel."""
    cfg = net.config
    if cfg.mlp_ratio != 4.0:
        raise ValueError(
            f"{what} has MLP ratio {cfg.mlp_ratio:g}; diffusers' DiTTransformer2DModel has a "
            "fixed ratio of 4 and no setting for another"
        )
    base, patch = parse_size(cfg.size)
    depth, hidden, heads = SIZES[base]
    order = residual_order(net.pos_embed, hidden)
    state = permute_residual(net.state_dict(), torch.argsort(order))
    return diffusers_dit.from_kind(
        state,
        depth=depth,
        heads=heads,
        image_size=cfg.image_size,
        patch=patch,
        in_channels=cfg.in_channels,
        out_channels=net.out_channels,
    )


def export_diffusers(source: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """Write a dense (or merged) kind-dit model as a diffusers DiTTransformer2DModel folder:
    `out` (config.json + diffusion_pytorch_model.safetensors, for `from_pretrained(out)`), for a
    merged model with its null network in `out/unconditional`, and `kind_dit.json` (class names,
    diffusion and scheduler settings, licence, notes); (its path, notes for the user)."""
    out = check_new_dir(out)
    source = Path(source).expanduser()
    if _is_kind(source):  # refused before a large KIND model is built
        raise _kind_refusal(source)
    model, diffusion, meta = load_model(source)
    if isinstance(model, MergedDiT):
        nets = [(out, model.cond), (out / UNCONDITIONAL, model.uncond)]
    elif model.config.kind:
        raise _kind_refusal(source)
    else:
        nets = [(out, model)]
    folders = [(path, *_to_diffusers(net, str(source))) for path, net in nets]
    cfg = nets[0][1].config
    notes = [
        f"{TIME_NOTE}: diffusers' outputs for this model differ from kind-dit's through its timestep embedding"
    ]
    if cfg.num_classes != 1000:
        notes.append(
            f"diffusers' DiTPipeline passes class 1000 as the null class; this model's null "
            f"class is {cfg.num_classes}: call the transformer with your own guidance loop"
        )
    if isinstance(model, MergedDiT):
        notes.append(
            f"a merged model: {out} holds its class network, {out / UNCONDITIONAL} its "
            "unconditional network (load it with from_pretrained(that path), not with "
            "subfolder=, which reads the class network's weights; use it for the null class "
            "when guiding)"
        )
    home = next((p for p in (source, source / "model") if is_model_dir(p)), None)
    carried = (
        [p for p in sorted(home.iterdir()) if p.name == NOTICE or p.name.startswith("source-")]
        if home
        else []
    )
    info = {
        "format": "kind-dit-diffusers/1",
        "source": str(source.resolve()),
        "class_names": cfg.class_names,
        "null_class": cfg.num_classes,
        "merged": meta.get("merged"),
        "diffusion": vars(diffusion),
        "scheduler": diffusion.sampler_args(cfg.learn_sigma),
        "sample": meta.get("sample"),
        "latent": meta.get("latent"),
        "license": (meta.get("imported") or {}).get("license"),
        "notes": notes,
    }
    infos = {out: info}
    if isinstance(model, MergedDiT):
        infos[out / UNCONDITIONAL] = _unconditional_info(info, out)
    with atomic_dir(out) as tmp:
        for path, config, state in folders:  # each folder complete: it imports on its own
            folder = tmp / path.relative_to(out)
            diffusers_dit.write_folder(folder, config, state)
            write_json(folder / KIND_JSON, infos[path])
            for carry in carried:
                with atomic_file(folder / carry.name) as part:
                    shutil.copyfile(carry, part)
            write_checksums(folder)
    return out, notes


def _unconditional_info(info: dict, out: Path) -> dict:
    """`kind_dit.json` of a merged model's null network (`out/unconditional`): the model's
    diffusion, sampling, latent space and licence, so that importing the folder alone gets them
    rather than DiT's defaults; no class (its null class is 0)."""
    return info | {
        "class_names": [],
        "null_class": 0,
        "merged": "null",
        "notes": [
            info["notes"][0],  # the note on diffusers' timestep features
            f"the unconditional network of the merged model in {out} (its class network), "
            "for the null class when guiding",
        ],
    }
