"""The size table of `kind-dit info`: parameters and bytes of the learngenes, each tailor, models
assembled for a few classes, and the dense DiT of the same size, for any model directory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kind.core.decomposition import split_state
from kind.core.model import DiT, ModelConfig, count_params
from kind.store.load import load_model
from kind.store.parts import count_tensors, is_parts_dir, read_manifest


def size_table(source: str | Path) -> list[tuple[str, int, int | None]]:
    """(part, parameters, bytes) rows: learngenes, each tailor, the model assembled for 1, 2 and
    all classes, and the dense DiT of the same size and classes. Bytes are file sizes for a parts
    directory, fp32 sizes (4 bytes a parameter) otherwise."""
    source = Path(source)
    if is_parts_dir(source):
        manifest = read_manifest(source)
        config = ModelConfig.from_dict(manifest["model"])
        lg = manifest["learngene"]
        tailors = [
            (int(g), t["params"], t["bytes"], t["classes"]) for g, t in manifest["tailors"].items()
        ]
        learngene = (lg["params"], lg["bytes"])
    else:
        model, _, _ = load_model(source)
        config = model.config
        if not config.kind:
            n = count_params(model)
            return [("dense model", n, 4 * n)]
        lg_state, tailor_states = split_state(model)
        learngene = (count_tensors(lg_state), 4 * count_tensors(lg_state))
        tailors = [
            (
                g,
                count_tensors(t),
                4 * count_tensors(t),
                [c for c in config.held_classes if config.tau[c] == g],
            )
            for g, t in tailor_states.items()
        ]
    names = config.class_names
    rows = [("learngene", *learngene)]
    null = [t for t in tailors if t[0] == config.null_group]  # travels with every assembly
    if null:
        tailors.remove(null[0])
        learngene = (learngene[0] + null[0][1], learngene[1] + null[0][2])
        rows.append(("null tailor (the unconditional model)", null[0][1], null[0][2]))
    rows += [(f"tailor {g} ({', '.join(names[c] for c in cls)})", p, b) for g, p, b, cls in tailors]
    for k in sorted({1, 2, len(tailors)} & set(range(1, len(tailors) + 1))):
        label = "all" if k == len(tailors) else str(k)
        chosen = tailors[:k]
        rows.append(
            (
                f"assembled: {label} tailor group(s)",
                learngene[0] + sum(t[1] for t in chosen),
                learngene[1] + sum(t[2] for t in chosen),
            )
        )
    dense = DiT(replace(config, kind=False, groups=None, null_tailor=False))
    n = count_params(dense)
    rows.append((f"dense DiT, same size, {config.num_classes} classes", n, 4 * n))
    return rows
