"""Run configuration: nested dataclasses, read from YAML/JSON, overridden by `--set key=value`.

Every section rejects unknown keys with the list of known ones, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kind.core.device import MAX_THREADS
from kind.core.diffusion import DiffusionConfig
from kind.core.model import SIZES, ModelConfig, parse_size
from kind.core.seeds import SEED_MAX
from kind.data.images import MAX_IMAGE_SIZE
from kind.io import is_a, type_name, write_json

MAX_CHANNELS = 64  # image or latent channels: SD3/FLUX VAEs have 16


def check_range(key: str, value: Any, ok: bool, allowed: str) -> None:
    """A config value outside its range is an error naming the key, the value and the range."""
    if not ok:
        raise ValueError(f"{key} = {value!r} is out of range; allowed: {allowed}")


def check_rank(key: str, rank: float) -> None:
    """A rank is a whole count of components (≥ 1) or a fraction of min(in, out) (< 1): 2.5 is
    neither (the layers would silently take 2)."""
    check_range(key, rank, rank < 1 or rank == int(rank),
                "a whole count (>= 1) or a fraction of min(in, out) (< 1)")  # fmt: skip


def _count(key: str, value: Any, low: int, optional: bool = False, high: int | None = None) -> None:
    ok = (optional and value is None) or (
        is_a(value, int) and low <= value <= (math.inf if high is None else high)
    )
    wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    check_range(key, value, ok, wanted + (" or null" if optional else ""))


def _real(key: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False,
          open_high: bool = False, optional: bool = False) -> None:  # fmt: skip
    finite_ok = is_a(value, float) and math.isfinite(value)
    ok = (optional and value is None) or (
        finite_ok
        and (value > low if open_low else value >= low)
        and (value < high if open_high else value <= high)
    )
    allowed = f"a number {'>' if open_low else '>='} {low:g}"
    if high != math.inf:
        allowed += f" and {'<' if open_high else '<='} {high:g}"
    check_range(key, value, ok, allowed + (" or null" if optional else ""))


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 128  # global batch: all ranks and all micro-batches of one optimiser step
    micro_batch_size: int | None = None  # per rank and forward; None = batch_size / world size
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999  # the decay ramps up as min(ema_decay, (1 + n) / (10 + n))
    class_dropout: float = 0.1  # label -> null class, for classifier-free guidance
    orth_weight: float = 0.0  # weight of the orthogonality penalty (KIND models)
    hflip: bool = False  # random horizontal flips (never for digits)
    seed: int = 0
    log_every: int = 25
    sample_every: int = 1000  # sample grid with EMA weights; 0 = only at the end
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row (none is applied)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; None = torch's default
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)
    grad_checkpointing: bool = False
    compile: bool = False
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard extra)
    # a dense DiT (run or model directory) whose weights start a KIND model (kind.core.kindify);
    # None: DiT's random init. Used once, when the run starts: --resume loads its checkpoint
    init_from: str | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                     "max_bad_steps"):  # fmt: skip
            _count(f"train.{name}", getattr(self, name), 1)
        for name in ("warmup_steps", "sample_every", "seed"):
            _count(f"train.{name}", getattr(self, name), 0)
        check_range("train.seed", self.seed, self.seed <= SEED_MAX, f"0 to {SEED_MAX}")
        _count("train.micro_batch_size", self.micro_batch_size, 1, optional=True)
        _count("train.threads", self.threads, 1, optional=True, high=MAX_THREADS)
        _real("train.lr", self.lr, 0, open_low=True)
        _real("train.weight_decay", self.weight_decay, 0)
        _real("train.grad_clip", self.grad_clip, 0, open_low=True, optional=True)
        _real("train.ema_decay", self.ema_decay, 0, 1, open_high=True)
        _real("train.class_dropout", self.class_dropout, 0, 1, open_high=True)
        _real("train.orth_weight", self.orth_weight, 0)
        check_range("train.precision", self.precision, self.precision in ("fp32", "bf16", "fp16"),
                    "fp32, bf16 or fp16")  # fmt: skip
        check_range("train.init_from", self.init_from,
                    self.init_from is None or (isinstance(self.init_from, str)
                                               and bool(self.init_from.strip())),
                    "a dense run or model directory, or null")  # fmt: skip


@dataclass
class SampleConfig:
    """Sampling defaults: the periodic grids during training and `kind-dit sample`."""

    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 1.5
    per_class: int = 8  # samples a class in grids (a grid shows at most 64 classes of 16)
    guided_channels: int | None = None  # guide the first k channels only (DiT: 3); None: all

    def __post_init__(self):
        check_range(
            "sample.sampler", self.sampler, self.sampler in ("ddim", "ddpm"), "ddim or ddpm"
        )
        _count("sample.steps", self.steps, 1)
        _count("sample.per_class", self.per_class, 1)
        _real("sample.cfg_scale", self.cfg_scale, 0)
        if self.guided_channels is not None:
            _count("sample.guided_channels", self.guided_channels, 1)

    @classmethod
    def saved(cls, sample: dict | None) -> SampleConfig:
        """The sampling defaults a model directory, run or parts directory records (its `sample`
        section: what it was trained or imported to sample with), the rest the defaults above;
        keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (sample or {}).items() if k in known})


@dataclass
class Config:
    data: str = "mnist:0-5"
    group_file: str | None = None  # YAML/JSON {class name: group}; None = one group per class
    vae: str | None = None  # VAE directory for latent data; None = the one the latent store records
    # image size and channels unset: the data's own, unless set (then the data is resized to them)
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(image_size=None, in_channels=None)
    )
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        check_range("data", self.data, isinstance(self.data, str) and bool(self.data.strip()),
                    "a data spec such as mnist:0-5, a folder or a latent store")  # fmt: skip
        m = self.model  # the sizes a run builds its model with
        width = SIZES[parse_size(m.size)[0]][1]  # min(in, out) of every gated layer
        for key in ("rank_learngene", "rank_tailor"):
            rank = getattr(m, key)
            _real(f"model.{key}", rank, 0)
            check_rank(f"model.{key}", rank)
            check_range(f"model.{key}", rank, rank < 1 or rank <= width,
                        f"a fraction (< 1) of a layer's smaller side, or a whole count up to "
                        f"{width} (the width of size {m.size})")  # fmt: skip
            check_range(f"model.{key}", rank, not 0 < rank < 1 or round(rank * width) >= 1,
                        f"0, or a fraction that keeps at least one of a layer's {width} "
                        f"components (above {0.5 / width:g}); a smaller one rounds to none")  # fmt: skip
        _count("model.image_size", m.image_size, 1, optional=True, high=MAX_IMAGE_SIZE)
        _count("model.in_channels", m.in_channels, 1, optional=True, high=MAX_CHANNELS)
        _real("model.mlp_ratio", m.mlp_ratio, 0, open_low=True)
        _real("model.tailor_sigma", m.tailor_sigma, 0)
        check_range("group_file", self.group_file, self.group_file is None or (
            isinstance(self.group_file, str) and bool(self.group_file.strip())),
            "the path of a YAML/JSON file {class name: group}")  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _apply(obj: Any, updates: dict, where: str = "") -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        if not isinstance(key, str):
            raise ValueError(f"config key {key!r} in {where.rstrip('.') or 'the top level'} is "
                             "not a name; config keys are names such as train.lr")  # fmt: skip
        if key not in names:
            raise ValueError(
                f"unknown config key {where + key!r}; known keys in "
                f"{where.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where + key!r} is a section; give a mapping")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], where + key))
    if hasattr(obj, "__post_init__"):
        obj.__post_init__()


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """A value checked against its field's annotated type (an int widens to a float where the
    field takes fractions; YAML 1.1 reads 1e-4 as text): a default of None accepts no more than
    the field's type, so `model.learngene_ranks=[1]` is refused here, not deep in the model."""
    fractional = is_a(0.5, kind)
    if fractional and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if is_a(value, kind):
        return float(value) if fractional and type(value) is int else value
    raise ValueError(f"config key {key!r} expects a {type_name(kind)}, got {value!r:.100}")


def _scalar(raw: str) -> Any:
    """A YAML scalar, with 3e-4 read as a number (YAML 1.1 wants 3.0e-4)."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"--set value {raw!r} is not a YAML scalar or list: {e}") from e
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_overrides(pairs: list[str]) -> dict:
    """['train.lr=3e-4', 'model.kind=false'] -> {'train': {'lr': 0.0003}, 'model': {'kind': False}}.
    Values are parsed as YAML scalars/lists, so numbers, booleans, null and [a, b] work."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        node = out
        *parents, leaf = key.strip().split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # `--set train=1 --set train.lr=2`
                raise ValueError(f"--set {pair!r}: {'.'.join(parents[: i + 1])} was set to a "
                                 "value by an earlier --set; give each key once")  # fmt: skip
        node[leaf] = _scalar(raw)
    return out


def load_config(
    path: str | Path | None = None, overrides: dict | None = None, base: dict | None = None
) -> Config:
    """Defaults, then `base` (a saved config dict), then the file at `path`, then `overrides`."""
    cfg = Config()
    if base:
        _apply(cfg, base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"config file {path} {what}; give a YAML/JSON file")
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
        _apply(cfg, loaded)
    if overrides:
        _apply(cfg, overrides)
    return cfg


def _read_yaml(path: Path) -> Any:
    """A YAML/JSON file's content; a clear error naming the file and the line when malformed."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML/JSON: {e}") from e
    except (UnicodeDecodeError, RecursionError) as e:  # binary, or nested past any config
        raise ValueError(f"{path} is not a YAML/JSON text file ({type(e).__name__})") from e


def save_config(cfg: Config, path: Path) -> None:
    write_json(path, cfg.to_dict())


def read_group_file(path: str, class_names: list[str]) -> list[int]:
    """τ from a YAML/JSON mapping {class name: group name or id}; groups are numbered in order of
    first appearance along class_names. Every class must be mapped."""
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise FileNotFoundError(
            f"group_file {path} {what}; give a YAML/JSON file {{class name: group}}"
        )
    mapping = _read_yaml(Path(path))
    if not isinstance(mapping, dict):
        raise ValueError(f"group file {path} must map class names to groups")
    mapping = {str(k): str(v) for k, v in mapping.items()}
    missing = [c for c in class_names if c not in mapping]
    if missing:
        raise ValueError(
            f"group file {path} does not map classes {missing[:10]}; every class of "
            "the data needs a group"
        )
    order: dict[str, int] = {}
    return [order.setdefault(mapping[c], len(order)) for c in class_names]
