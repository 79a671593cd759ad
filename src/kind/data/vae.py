"""The SD-VAE of the latent-diffusion path: loaded from a local directory (never the network),
the latent space it defines, and images to latents and back with it.

Latents are scaled as latent diffusion does: z = (mean - shift) * scaling_factor, with the factor
(0.18215 for SD VAEs) read from the VAE config, so the diffusion sees unit-order data. The latent
space (SPACE_KEYS) is recorded wherever latents are kept (a store, a model), so latents are never
decoded with a VAE that reads them otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kind.core.images import to_uint8
from kind.data.images import DataError
from kind.io import is_a, read_json, sha256_file, type_name

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

DEFAULT_SCALING_FACTOR = 0.18215  # SD 1.x/2.x VAEs (sd-vae-ft-ema, sd-vae-ft-mse)
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"  # the one weights file `load_vae` reads
GET_VAE = (
    "download stabilityai/sd-vae-ft-ema on a machine with network "
    "(`hf download stabilityai/sd-vae-ft-ema --local-dir PATH`, or with an older huggingface_hub "
    "`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir PATH`), copy PATH here "
    "and pass --vae PATH"
)


class LatentError(DataError):
    """A VAE directory or latent store that cannot be used; the message says what to do."""


def load_vae(path: str | Path | None, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """An SD-style ``AutoencoderKL`` (eval mode, no grad) from a local directory, never the network.

    ``path`` holds ``config.json`` + ``diffusion_pytorch_model.safetensors`` (the layout of the
    stabilityai/sd-vae-ft-* repositories); a full Stable Diffusion directory works too (its
    ``vae/`` sub-folder is used). Only safetensors weights load, so loading never unpickles.
    ``dtype`` is applied while loading (diffusers warns when a loaded VAE is cast afterwards).
    """
    root = vae_root(path)
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(
            root, local_files_only=True, use_safetensors=True, torch_dtype=dtype
        )
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        raise LatentError(f"cannot load the VAE in {root} ({err}); {GET_VAE}.") from err
    log.info("loaded VAE %s (scaling factor %g)", root, scaling_factor(vae))
    return vae.eval().requires_grad_(False)


def vae_root(path: str | Path | None) -> Path:
    """The folder of the AutoencoderKL that `load_vae` would load from `path`, checked without
    loading it (a model directory records the VAE its samples decode with)."""
    return _vae_config(path)[0]


def _vae_config(path: str | Path | None) -> tuple[Path, dict]:
    """(`vae_root(path)`, its parsed config.json), or a LatentError saying what is wrong."""
    if path is None or not str(path).strip():
        raise LatentError(f"no VAE directory given; {GET_VAE}.")
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise LatentError(f"VAE directory {root} {what}; {GET_VAE}.")
    if not (root / "config.json").is_file() and (root / "vae" / "config.json").is_file():
        root = root / "vae"  # a whole Stable Diffusion pipeline directory
    if not (root / "config.json").is_file():
        raise LatentError(f"{root} is not a VAE directory (no config.json); {GET_VAE}.")
    try:
        config = read_json(root / "config.json")
    except (OSError, ValueError) as err:
        raise LatentError(f"{err}; {GET_VAE}.") from err  # err names the file
    class_name = config.get("_class_name")
    if class_name != "AutoencoderKL":
        raise LatentError(
            f"{root} holds a {class_name or 'non-diffusers'} model, not an AutoencoderKL VAE; "
            f"{GET_VAE}."
        )
    if not (root / VAE_WEIGHTS).is_file():
        raise LatentError(
            f"{root} has no {VAE_WEIGHTS} (only safetensors weights are loaded); {GET_VAE}."
        )
    return root, config


# What fixes the meaning of a latent: z = (mean - shift_factor) * scaling_factor, with
# latent_channels channels, one cell per `downsampling` pixels along a side. Latents made with
# one VAE and decoded with a VAE that differs in any of these decode to wrong images, silently.
SPACE_KEYS = ("scaling_factor", "shift_factor", "latent_channels", "downsampling")
CONFIG_SHA = "vae_config_sha256"


def latent_space(config: Mapping) -> dict:
    """The SPACE_KEYS values of a VAE config (a loaded VAE's ``config`` or its config.json),
    with diffusers' defaults where a key is absent: scaling 0.18215 and shift 0 (SD 1.x/2.x
    VAEs have neither key), 4 channels, and 2 pixels a cell per down block after the first."""
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    return {
        "scaling_factor": DEFAULT_SCALING_FACTOR if scale is None else float(scale),
        "shift_factor": 0.0 if shift is None else float(shift),
        "latent_channels": int(config.get("latent_channels", 4)),
        "downsampling": 2 ** (len(config.get("block_out_channels", (64,))) - 1),
    }


def vae_space(path: str | Path) -> dict:
    """The latent space of the VAE at `path`, read from its config.json without loading the
    weights: `latent_space`, plus the sha256 of the config file, which tells two VAE builds
    apart where the values agree."""
    root, config = _vae_config(path)
    try:
        space = latent_space(config)
    except (TypeError, ValueError) as err:
        raise LatentError(
            f"{root / 'config.json'} has a malformed scaling_factor, shift_factor, "
            f"latent_channels or block_out_channels ({err}); {GET_VAE}."
        ) from err
    return space | {CONFIG_SHA: sha256_file(root / "config.json")}


def check_space(recorded: Mapping, found: Mapping, mismatch: str, fix: str) -> None:
    """Refuse the latent space `found` where its SPACE_KEYS differ from those `recorded` (a
    store's meta, a model's ``latent`` record); a key either lacks is not compared, so stores and
    models from before it was recorded stay usable. ``mismatch`` names the two VAEs, ``fix``
    says what to do. Another config.json with the same values only warns: sd-vae-ft-ema and
    sd-vae-ft-mse decode each other's latents (DiT samples with either), and a VAE re-saved by
    another diffusers version has another config file."""
    differ = [k for k in SPACE_KEYS if k in recorded and k in found and recorded[k] != found[k]]
    if differ:
        values = ", ".join(f"{k} {found[k]!r}, not {recorded[k]!r}" for k in differ)
        raise LatentError(
            f"{mismatch}: {values}; latents made with one VAE decode wrong with the other; {fix}"
        )
    digests = (recorded.get(CONFIG_SHA), found.get(CONFIG_SHA))
    if None not in digests and digests[0] != digests[1] and digests not in _WARNED:
        _WARNED.add(digests)  # once: a run checks its VAE where it opens the data and decodes
        log.warning("%s, or another build of it: the latent space is the same, but config.json "
                    "differs; if the two are different VAEs (not, say, sd-vae-ft-ema and -mse), "
                    "samples decode wrong", mismatch)  # fmt: skip


_WARNED: set[tuple[str, str]] = set()  # (recorded, found) config digests warned about


def scaling_factor(vae: AutoencoderKL) -> float:
    """The VAE config's ``scaling_factor``, 0.18215 (SD 1.x/2.x) where the config has none."""
    return latent_space(vae.config)["scaling_factor"]


def _shift_factor(vae: AutoencoderKL) -> float:
    """The config's ``shift_factor`` (SD3/FLUX VAEs), 0 for SD 1.x/2.x VAEs, which have none."""
    return latent_space(vae.config)["shift_factor"]


def downsampling(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along a side: 2 per down block after the first (8 for SD VAEs)."""
    return latent_space(vae.config)["downsampling"]


def _vae_place(vae: AutoencoderKL) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> scaled posterior means, float32 [B, C, H/f, W/f] on the CPU."""
    device, dtype = _vae_place(vae)
    x = (images.to(device, torch.float32) / 127.5 - 1.0).to(dtype)  # uint8 -> [-1, 1]
    mean = vae.encode(x).latent_dist.mean  # [B, C, h, w]
    return ((mean.float() - _shift_factor(vae)) * scaling_factor(vae)).cpu()


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Scaled latents float [B, C, h, w] -> uint8 images [B, 3, H, W] on the CPU, in batches so a
    large sample set fits the decoder's memory."""
    device, dtype = _vae_place(vae)
    scale, shift = scaling_factor(vae), _shift_factor(vae)
    out = []
    for start in range(0, len(latents), batch_size):
        z = latents[start : start + batch_size].to(device, torch.float32) / scale + shift
        x = vae.decode(z.to(dtype)).sample  # [b, C, h, w] -> [b, 3, H, W] in about [-1, 1]
        out.append(to_uint8(x).cpu())
    if not out:
        f = downsampling(vae)
        return torch.empty(0, 3, latents.shape[-2] * f, latents.shape[-1] * f, dtype=torch.uint8)
    return torch.cat(out)


# a model's latent record (run.json, model.json, a parts manifest, an export's kind_dit.json)
# and a latent store's meta.json: each key's kind, the sizes at least 1
LATENT_RECORD = {"vae": str | None, "image_size": int | None, "scaling_factor": float,
                 "shift_factor": float, "latent_channels": int, "downsampling": int,
                 CONFIG_SHA: str}  # fmt: skip
_SIZES = ("image_size", "latent_channels", "downsampling")


def latent_problem(latent, prefix: str = "latent.") -> str | None:
    """What is wrong with a model's latent record (a hand-edited `"vae": 5`), or None, so that
    a damaged record is named where it is read rather than failing deep in decoding. Keys the
    record lacks are not problems here (records from before a key existed); a store's reader
    checks the keys it needs itself."""
    if not isinstance(latent, dict):
        return f"its latent record is {latent!r:.60}, not a JSON object"

    def fits(key, kind) -> bool:
        value = latent[key]
        return is_a(value, kind) and not (key in _SIZES and value is not None and value < 1)

    bad = [f"{prefix}{k} is {latent[k]!r:.60}, not {type_name(kind)}{' >= 1' * (k in _SIZES)}"
           for k, kind in LATENT_RECORD.items() if k in latent and not fits(k, kind)]  # fmt: skip
    return "; ".join(bad) or None


def decoder(latent: dict, vae_path: str | Path | None = None, device: str | torch.device = "cpu"):
    """A function latents -> uint8 images for a model trained on a store; `latent` is the entry a
    run records (its "vae" path and latent space), `vae_path` overrides it (the VAE moved to
    another machine). A VAE of another latent space is refused before it is loaded."""
    problem = latent_problem(latent)
    if problem:
        raise LatentError(f"the model's {problem}; its record is damaged or was edited by hand "
                          "(restore it from a copy)")  # fmt: skip
    if not latent and vae_path is not None:
        raise ValueError(
            f"--vae {vae_path}: this model records no latent space; it is a pixel-space model, "
            "whose samples are images already: drop --vae"
        )
    path, made_with = vae_path or latent.get("vae"), latent.get("vae") or "not recorded"
    check_space(
        latent,
        vae_space(path),
        f"VAE {path} is not the VAE this model's latents were made with ({made_with})",
        "decode with that VAE (--vae DIR, a copy of it)",
    )
    vae = load_vae(path).to(device)
    return lambda z: decode(vae, z)
