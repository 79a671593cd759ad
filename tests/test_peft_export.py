"""`kind-dit export --format peft`: a KIND model as diffusers' DiT (its learngenes) plus one peft
LoRA adapter per tailor group, checked by running diffusers + peft on one mixed batch (each sample
its class's adapter, `"__base__"` for the null class) against the KIND model's own outputs.

diffusers' timestep frequencies differ from DiT's (10000^(-i/127)); as in tests/test_interop.py,
the reference is diffusers' model with that one setting put back (`with_dit_time`). Models are
random and small (tiny/2: depth 4, hidden 128; 8x8 inputs, 4 channels, learned σ), tailors
random too (every bank row N(0, 0.05²)), so a wrong factor, permutation or name shows.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from peft import PeftModel
from safetensors.torch import load_file

from kind.cli.main import main
from kind.core.diffusion import DiffusionConfig
from kind.core.model import DiT, ModelConfig
from kind.store.load import load_model
from kind.store.modeldir import save_model_dir
from kind.store.parts import decompose
from kind.store.peft_export import _adapter_names
from test_interop import fails, randomise, with_dit_time

NAMES = ["c0", "c1", "c2", "c3"]
NULL = len(NAMES)
TARGETS = ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v", "ff.net.0.proj", "ff.net.2"]


def kind_model(seed: int, **options) -> DiT:
    cfg = ModelConfig(size="tiny/2", kind=True, image_size=8, in_channels=4, learn_sigma=True,
                      class_names=NAMES, rank_tailor=4, **options)  # fmt: skip
    model = DiT(cfg)
    randomise(model, seed)  # learngenes, dense layers, label rows and every tailor
    return model.eval()


def batch(y: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = len(y)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), \
        torch.tensor(y)  # fmt: skip


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).norm() / b.norm() < 1e-5
    assert (a - b).abs().max() < 1e-5 * b.abs().max()


@torch.no_grad()
def test_peft_export_computes_the_kind_models_mixed_batch(tmp_path, capsys):
    model = kind_model(5)
    decompose(model, DiffusionConfig(), tmp_path / "parts")  # from a parts directory
    main(["export", str(tmp_path / "parts"), "--out", str(tmp_path / "d"), "--format", "peft"])
    printed = capsys.readouterr().out
    assert "10000^(-i/127)" in printed and "modules_to_save" in printed
    out = tmp_path / "d"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["base", *NAMES, "kind_dit.json", "README.md", "checksums.json"]
    )
    # an adapter is what peft itself writes: its config keys, names, shapes
    config = json.loads((out / "c0" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert sorted(config["target_modules"]) == TARGETS and not config["modules_to_save"]
    weights = load_file(out / "c0" / "adapter_model.safetensors")
    assert len(weights) == 4 * 6 * 2
    assert weights["base_model.model.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape == (
        4, 128)  # fmt: skip
    assert weights["base_model.model.transformer_blocks.3.ff.net.2.lora_B.weight"].shape == (
        128, 4)  # fmt: skip
    info = json.loads((out / "kind_dit.json").read_text())
    assert info["class_names"] == NAMES and info["null_class"] == NULL
    assert info["adapters"] == {n: n for n in NAMES}

    base = DiTTransformer2DModel.from_pretrained(out / "base")
    assert base.config.num_embeds_ada_norm == NULL
    peft_model = PeftModel.from_pretrained(with_dit_time(base), out / "c0", adapter_name="c0")
    peft_model.load_adapter(out / "c2", adapter_name="c2")
    peft_model.load_adapter(out / "c3", adapter_name="c3")
    peft_model.eval()
    y = [0, 2, NULL, 3, 0, NULL, 2]
    x, t, labels = batch(y)
    names = ["__base__" if c == NULL else NAMES[c] for c in y]
    theirs = peft_model(x, t, labels, adapter_names=names).sample  # one mixed batch
    ours = model(x, t, labels)
    assert ours.shape == (7, 8, 8, 8)  # ε and the learned-variance channels
    close(ours, theirs)
    # the base alone is the unconditional (learngene-only) network, for every label
    with peft_model.disable_adapter():
        close(
            model(x, t, torch.full_like(labels, NULL)), peft_model(x, t, labels * 0 + NULL).sample
        )
    # base/ imports alone with the model's diffusion (v, cosine), not DiT's (ε, linear)
    main(["import", str(out / "base"), "--out", str(tmp_path / "imp")])
    imported, diffusion, _ = load_model(tmp_path / "imp")
    assert diffusion == DiffusionConfig() and imported.config.class_names == NAMES


@torch.no_grad()
def test_shared_groups_and_decomposed_adaln_export_one_adapter_per_group(tmp_path, capsys):
    model = kind_model(6, class_to_group=[0, 1, 1, 0], decompose_adaln=True)
    save_model_dir(tmp_path / "m", model, DiffusionConfig())
    main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "d"), "--format", "peft"])
    assert "group_0001: c1, c2" in capsys.readouterr().out
    out = tmp_path / "d"
    info = json.loads((out / "kind_dit.json").read_text())
    assert info["adapters"] == {"c0": "group_0000", "c1": "group_0001", "c2": "group_0001",
                                "c3": "group_0000"}  # fmt: skip
    base = with_dit_time(DiTTransformer2DModel.from_pretrained(out / "base"))
    peft_model = PeftModel.from_pretrained(base, out / "group_0000", adapter_name="g0")
    peft_model.load_adapter(out / "group_0001", adapter_name="g1")
    peft_model.eval()
    y = [1, 0, NULL, 2, 3]
    x, t, labels = batch(y)
    theirs = peft_model(x, t, labels, adapter_names=["g1", "g0", "__base__", "g1", "g0"]).sample
    close(model(x, t, labels), theirs)


def test_peft_export_refuses_a_null_tailor_and_a_dense_model(tmp_path, capsys):
    save_model_dir(tmp_path / "null", kind_model(7, null_tailor=True), DiffusionConfig())
    err = fails(["export", str(tmp_path / "null"), "--out", str(tmp_path / "d"),
                 "--format", "peft"], capsys)  # fmt: skip
    assert "null class a tailor" in err and "not the null model" in err
    dense = DiT(ModelConfig(size="tiny/2", kind=False, image_size=8, in_channels=4,
                            class_names=NAMES))  # fmt: skip
    save_model_dir(tmp_path / "dense", dense, DiffusionConfig())
    err = fails(["export", str(tmp_path / "dense"), "--out", str(tmp_path / "d"),
                 "--format", "peft"], capsys)  # fmt: skip
    assert "--format diffusers" in err
    assert not (tmp_path / "d").exists()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])


def test_adapter_folders_never_share_a_name():
    """A class literally named like a generated folder, names that differ only in case (one
    folder on macOS or Windows) and a name that is no plain word each get a folder of their own."""
    names = ["group_0001", "x y", "Cat", "cat", "Base", "dog"]
    cfg = ModelConfig(size="tiny/2", kind=True, image_size=8, in_channels=4, class_names=names,
                      rank_tailor=4)  # fmt: skip
    folders = _adapter_names(DiT(cfg))
    assert folders == {0: "group_0000", 1: "group_0001", 2: "group_0002", 3: "group_0003",
                       4: "group_0004", 5: "dog"}  # fmt: skip
    assert len({f.lower() for f in folders.values()}) == len(names)
