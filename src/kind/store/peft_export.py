"""A KIND model as a diffusers DiT (its learngenes) plus one peft LoRA adapter per tailor group.

A tailor is a LoRA: U_T diag(σ_T) V_Tᵀ x = B A x with lora_B = U_T [out, r] and
lora_A = diag(σ_T) V_Tᵀ [r, in], at scaling 1 (lora_alpha = r). So a KIND model exports as

- `OUT/base/`: the learngene-only network (every KindLinear's learngene folded into a dense
  weight, biases and dense layers as they are; the label table with the held classes' rows in
  order and the null row last) as a `DiTTransformer2DModel` folder, written by the dense exporter
  (`kind.store.interop`). Without a null tailor it is the model's unconditional network.
- `OUT/<adapter>/`: one peft LoRA adapter folder per tailor group (`adapter_config.json` +
  `adapter_model.safetensors`) on the six gated matrices of every block, under diffusers' names.
- `OUT/kind_dit.json`: class names, which adapter each class uses, its diffusers label id, the
  diffusion settings, notes; `OUT/README.md`: how to load it.

With peft, `PeftModel.from_pretrained(base, OUT/<adapter>)` (plus `load_adapter` for more) and
`model(x, t, y, adapter_names=[...])` in eval mode computes the KIND model's mixed batch: each
sample its class's adapter, `"__base__"` for the null class. The position-embedding channel
reordering the dense exporter applies to dense weights (`interop.permute_residual`) is applied to
the factors: rows of lora_B for the layers that write the residual stream, columns of lora_A for
those that read it (probed from `permute_residual` itself, so the two cannot disagree).

Refused, with the reason: a null tailor (the base would not be the null model and peft has no
adapter that applies to `"__base__"` rows), tailors in layers outside the six (not expressible
under the six diffusers names), and a dense or merged model (use `--format diffusers`). A tailor
group shared by several classes (a many-to-one τ) exports as one adapter named `group_NNNN` that
all its classes use: every class keeps its own label row in the base, so the adapter is the
group's tailor and nothing else.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from kind.core.decomposition import MergedDiT, PartsError
from kind.core.model import DiT, load_state
from kind.io import (
    atomic_dir,
    atomic_save_tensors,
    atomic_write_text,
    check_new_dir,
    write_checksums,
    write_json,
)
from kind.store import diffusers_dit
from kind.store.interop import (
    KIND_JSON,
    TIME_NOTE,
    _to_diffusers,
    permute_residual,
    residual_order,
)
from kind.store.load import load_model

BASE = "base"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's prefix of a saved adapter's tensor names
_GATED = re.compile(r"blocks\.(\d+)\.(attn\.[qkv]|attn\.proj|mlp\.fc1|mlp\.fc2)")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_GENERATED_NAME = re.compile(r"group_\d+", re.IGNORECASE)
_TO_DIFFUSERS = {ours: theirs for theirs, ours in diffusers_dit._BLOCK.items()}  # kind -> diffusers


def diffusers_module(name: str) -> str:
    """kind-dit's `blocks.i.attn.q` -> diffusers' `transformer_blocks.i.attn1.to_q`."""
    m = _GATED.fullmatch(name)
    return f"transformer_blocks.{m.group(1)}.{_TO_DIFFUSERS[m.group(2)]}"


def learngene_model(model: DiT) -> DiT:
    """The dense DiT of `model`'s learngenes: each KindLinear folded to U_G diag(σ_G) V_Gᵀ (with
    its bias), every other tensor as it is, the label table of the classes `model` holds."""
    cfg = model.config
    dense_cfg = type(cfg).from_dict(
        cfg.to_dict()
        | dict(
            kind=False,
            class_to_group=None,
            groups=None,
            null_tailor=False,
            class_names=[cfg.class_names[c] for c in cfg.held_classes],
        )  # fmt: skip
    )
    dense = DiT(dense_cfg)
    layers = dict(model.kind_layers())
    state = {}
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if name == "tailors.rows" or (owner in layers and leaf in ("U", "S", "V")):
            continue
        state[name] = tensor
    for owner, layer in layers.items():
        linear = layer.merge(None)
        state[f"{owner}.weight"] = linear.weight.detach()
    load_state(dense, state, "the learngene weights")
    return dense.eval()


def _check(model: DiT, source: Path) -> None:
    cfg = model.config
    if cfg.null_group is not None and cfg.null_group in model.tailors.groups:
        raise PartsError(
            f"{source} gives the null class a tailor of its own (null_tailor): its unconditional "
            "network is learngene plus that tailor, so the learngene-only base is not the null "
            'model, and peft\'s `"__base__"` rows take no adapter. Export the null network with '
            "`kind-dit assemble PARTS --merge null` and `export --format diffusers` instead"
        )
    outside = [n for n, _ in model.gated if not _GATED.fullmatch(n)]
    if outside:
        raise PartsError(
            f"{source} has tailors in {', '.join(outside[:5])}: a peft export covers the six "
            "gated matrices of each block (q, k, v, proj, fc1, fc2) only"
        )
    ranks = {m.rank_tailor for _, m in model.gated}
    if len(ranks) != 1:
        raise PartsError(f"{source}: tailor ranks {sorted(ranks)} differ between layers")


def _adapter_names(model: DiT) -> dict[int, str]:
    """Tailor group -> adapter folder name: the class's name when the group has one class and
    the name is a plain word, else `group_NNNN` (also for groups several classes share). Names
    are distinct even on a case-insensitive file system, and a class named like a generated
    name (`group_0001`) gets a generated one, so no adapter overwrites another."""
    cfg = model.config
    classes = {g: [c for c in cfg.held_classes if cfg.tau[c] == g] for g in model.tailors.groups}
    names = {}
    for g, members in classes.items():
        name = cfg.class_names[members[0]] if len(members) == 1 else ""
        ok = (
            _SAFE_NAME.fullmatch(name)
            and name.lower() not in (BASE, "__base__")
            and not _GENERATED_NAME.fullmatch(name)
        )
        names[g] = name if ok else f"group_{g:04d}"
    folded = Counter(n.lower() for n in names.values())
    return {g: n if folded[n.lower()] == 1 else f"group_{g:04d}" for g, n in names.items()}


def _factor_permutations(model: DiT) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per gated layer (row order, column order) that `permute_residual` gives its dense weight
    in the export, read off index probes: W' = W[rows][:, cols], so B' = B[rows], A' = A[:, cols]."""
    hidden = model.pos_embed.shape[1]
    perm = torch.argsort(residual_order(model.pos_embed, hidden))
    row_probe, col_probe = {}, {}
    for name, m in model.gated:
        fout, fin = m.out_features, m.in_features
        row_probe[f"{name}.weight"] = torch.arange(fout, dtype=torch.float64)[:, None].expand(
            -1, fin
        )
        col_probe[f"{name}.weight"] = torch.arange(fin, dtype=torch.float64)[None].expand(fout, -1)
    rows, cols = permute_residual(row_probe, perm), permute_residual(col_probe, perm)
    return {name: (rows[f"{name}.weight"][:, 0].long(), cols[f"{name}.weight"][0].long())
            for name, _ in model.gated}  # fmt: skip


def _lora_config(model: DiT, targets: list[str]) -> dict:
    from diffusers import DiTTransformer2DModel
    from peft import LoraConfig

    r = model.gated[0][1].rank_tailor
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none",
                        target_modules=targets, inference_mode=True).to_dict()  # fmt: skip
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["auto_mapping"] = {
        "base_model_class": DiTTransformer2DModel.__name__,
        "parent_library": DiTTransformer2DModel.__module__,
    }
    return config


def _readme(model: DiT, adapters: dict[str, list[str]]) -> str:
    first = next(iter(adapters))
    return (
        "# A KIND model as a diffusers DiT and peft LoRA adapters\n\n"
        "Written by `kind-dit export --format peft`. `base/` is the learngene-only network, a "
        "`DiTTransformer2DModel`\n(the model's unconditional network: the null class uses no "
        "tailor); every other folder is a\npeft LoRA adapter holding one tailor group "
        "(lora_B = U_T, lora_A = diag(σ_T) V_Tᵀ, scaling 1)\non each block's attn1.to_q/to_k/"
        "to_v/to_out.0 and ff.net.0.proj/ff.net.2.\n\n"
        "The class label rows are all in the base's class embedder (classes in the order of\n"
        f"`{KIND_JSON}`'s `class_names`, the null class last, id {len(model.config.held_classes)}"
        "), so the adapters carry no\nmodules_to_save: pass the class id as `class_labels` "
        "and activate that class's adapter.\n\n"
        "```python\nfrom diffusers import DiTTransformer2DModel\nfrom peft import PeftModel\n\n"
        "# local folders only: nothing is downloaded\n"
        'base = DiTTransformer2DModel.from_pretrained("OUT/base", local_files_only=True)\n'
        f'model = PeftModel.from_pretrained(base, "OUT/{first}", adapter_name="{first}").eval()\n'
        '# model.load_adapter("OUT/<other>", adapter_name="<other>") for more classes, then a\n'
        '# mixed batch: one adapter name per sample, "__base__" for the null class\n'
        f'out = model(x, t, y, adapter_names=["{first}", "__base__"]).sample\n```\n\n'
        f"Note: {TIME_NOTE}.\n"
    )


@torch.no_grad()
def export_peft(source: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """Write a KIND model (parts, model or run directory) as `out/base` (diffusers) plus one peft
    LoRA adapter folder per tailor group; (its path, notes for the user)."""
    out = check_new_dir(out)
    source = Path(source).expanduser()
    model, diffusion, meta = load_model(source)
    if isinstance(model, MergedDiT) or not model.config.kind:
        raise PartsError(
            f"{source} is a dense or merged model, with no tailors to export as adapters: use "
            "`kind-dit export --format diffusers`"
        )
    if model.tailors is None:
        raise PartsError(f"{source} is a KIND model without tailors (rank_tailor 0): nothing "
                         "to export as adapters; use `kind-dit assemble --merge null`")  # fmt: skip
    _check(model, source)
    cfg = model.config
    base = learngene_model(model)
    base_config, base_state = _to_diffusers(base, str(source))
    order = _factor_permutations(model)
    names = _adapter_names(model)
    targets = sorted({diffusers_module(n).split(".", 2)[2] for n, _ in model.gated})
    lora_config = _lora_config(model, targets)
    chunks = model.tailors.rows.detach().split(model.tailors.widths, dim=1)
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for i, g in enumerate(model.tailors.groups):
        tensors = {}
        for name, layer in model.gated:
            U, S, V = (f[0].double() for f in layer.unpack(chunks[layer.bank_slot][i : i + 1]))
            rows, cols = order[name]
            key = PEFT_PREFIX + diffusers_module(name)
            tensors[f"{key}.lora_A.weight"] = (S[:, None] * V.T)[:, cols].float()  # [r, in]
            tensors[f"{key}.lora_B.weight"] = U[rows].float()  # [out, r]
        adapters[names[g]] = tensors
    label = {c: j for j, c in enumerate(cfg.held_classes)}  # class id -> diffusers label id
    uses = {cfg.class_names[c]: names[cfg.tau[c]] for c in cfg.held_classes}
    members = {a: [c for c, used in uses.items() if used == a] for a in adapters}
    notes = [
        f"{TIME_NOTE}: diffusers' outputs for this model differ from kind-dit's through its "
        "timestep embedding",
        f"{len(adapters)} peft LoRA adapters (r = {lora_config['r']}, lora_alpha = r); the class "
        "label rows are in base/'s class embedder (no modules_to_save): activate a class's "
        'adapter and pass its label id; "__base__" (no adapter) for the null class',
    ]
    shared = {a: m for a, m in members.items() if len(m) > 1}
    if shared:
        notes.append(
            "tailor groups shared by several classes export as one adapter each: "
            + "; ".join(f"{a}: {', '.join(m)}" for a, m in shared.items())
        )
    info = {
        "format": "kind-dit-peft/1",
        "source": str(source.resolve()),
        "class_names": [cfg.class_names[c] for c in cfg.held_classes],
        "label_ids": {cfg.class_names[c]: label[c] for c in cfg.held_classes},
        "null_class": len(cfg.held_classes),
        "adapters": uses,
        "base": BASE,
        "diffusion": vars(diffusion),
        "scheduler": diffusion.sampler_args(cfg.learn_sigma),
        "sample": meta.get("sample"),
        "latent": meta.get("latent"),
        "license": (meta.get("imported") or {}).get("license"),
        "notes": notes,
    }
    with atomic_dir(out) as tmp:
        diffusers_dit.write_folder(tmp / BASE, base_config, base_state)
        write_json(tmp / BASE / KIND_JSON, _base_info(info, out))
        for name, tensors in adapters.items():
            write_json(tmp / name / ADAPTER_CONFIG, lora_config)
            atomic_save_tensors(tmp / name / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
        write_json(tmp / KIND_JSON, info)
        atomic_write_text(tmp / "README.md", _readme(model, members))
        for folder in (tmp, tmp / BASE, *(tmp / name for name in adapters)):
            write_checksums(folder)
    return out, notes


# what `out/base` records of the export's kind_dit.json (as a diffusers export would)
_BASE_KEYS = ("source", "class_names", "null_class", "diffusion", "scheduler", "sample", "latent",
              "license")  # fmt: skip


def _base_info(info: dict, out: Path) -> dict:
    """`kind_dit.json` of `out/base`, so that importing the folder alone gets the model's
    diffusion, sampling, latent space and licence rather than DiT's defaults."""
    return {
        "format": "kind-dit-diffusers/1",
        "merged": None,
        **{k: info[k] for k in _BASE_KEYS},
        "notes": [
            info["notes"][0],  # the note on diffusers' timestep features
            f"the learngene-only network of the KIND model exported to {out}: its null class is "
            "the model's unconditional network; its class labels without their adapters "
            f"({out}/<class>) are not the model's classes",
        ],
    }
