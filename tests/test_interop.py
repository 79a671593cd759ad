"""`kind-dit import` and `kind-dit export --format diffusers`, checked against an independent
reference: diffusers' `DiTTransformer2DModel` holding the same weights.

diffusers computes DiT's timestep features with frequencies 10000^(-i/127) where DiT divides by
128 (`downscale_freq_shift=1`); the reference here is diffusers' model with that one setting put
back to DiT's (`test_reference_computes_dits_timestep_features` checks it against DiT's formula).
Everything else (patch and position embedding, attention, MLP, adaLN, final layer, label table,
unpatchify, learned-σ channels) is diffusers' own code. Models are random and small (kind-dit's
`tiny/2`: depth 4, hidden 128, 4 heads; 8x8 inputs, 4 channels, 10 classes); no downloads.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from kind.cli.main import main
from kind.core.decomposition import merge
from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.model import DiT, ModelConfig, sincos_pos_embed
from kind.store.dit_official import dit_pos_embed
from kind.store.interop import residual_order
from kind.store.load import load_model
from kind.store.modeldir import save_model_dir

CLASSES = 10
SHAPE = dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
             num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=CLASSES)  # fmt: skip


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter N(0, 0.05²): DiT's init zeroes adaLN and the output layer, which would hide
    a wrong mapping behind zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def make_reference(seed: int = 0, norm_eps: float = 1e-6, **shape) -> DiTTransformer2DModel:
    """A random diffusers DiT with one timestep MLP and label table copied into every block, as
    diffusers' conversion of DiT writes them."""
    ref = DiTTransformer2DModel(**(SHAPE | shape), norm_eps=norm_eps).eval()
    randomise(ref, seed)
    first = ref.transformer_blocks[0].norm1.emb.state_dict()
    for block in ref.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return ref


def with_dit_time(ref: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """A copy of `ref` whose timestep features use DiT's frequencies (the one change)."""
    ref = copy.deepcopy(ref)
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return ref


def inputs(classes: int = CLASSES):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    y = torch.tensor([0, 3, classes - 1, classes, 5, classes])  # `classes` is the null class
    return x, t, y


@torch.no_grad()
def assert_same(ours: torch.nn.Module, ref: DiTTransformer2DModel, classes: int = CLASSES):
    """Outputs [B, 8, 8, 8] (ε and the learned-variance channels) within 1e-5 relative."""
    x, t, y = inputs(classes)
    a, b = ours(x, t, y), ref(x, t, y).sample
    assert a.shape == b.shape == (6, 8, 8, 8)
    assert (a - b).norm() / b.norm() < 1e-5
    assert (a - b).abs().max() < 1e-5 * b.abs().max()


def relative_gap(ours: torch.nn.Module, ref: DiTTransformer2DModel) -> float:
    with torch.no_grad():
        x, t, y = inputs()
        a, b = ours(x, t, y), ref(x, t, y).sample
    return float((a - b).norm() / b.norm())


def official_state(ref: DiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """The reference's weights under facebookresearch/DiT's names: fused qkv, one label table
    with the null row last, and diffusers' own position table as `pos_embed` [1, T, D]."""
    s = {k: v.clone() for k, v in ref.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "pos_embed": ref.pos_embed.pos_embed.clone(),
        "y_embedder.embedding_table.weight": s[emb + "class_embedder.embedding_table.weight"],
    }
    for w in ("weight", "bias"):
        out[f"x_embedder.proj.{w}"] = s[f"pos_embed.proj.{w}"]
        out[f"t_embedder.mlp.0.{w}"] = s[f"{emb}timestep_embedder.linear_1.{w}"]
        out[f"t_embedder.mlp.2.{w}"] = s[f"{emb}timestep_embedder.linear_2.{w}"]
        out[f"final_layer.linear.{w}"] = s[f"proj_out_2.{w}"]
        out[f"final_layer.adaLN_modulation.1.{w}"] = s[f"proj_out_1.{w}"]
        for i in range(SHAPE["num_layers"]):
            b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
            out[f"{b}attn.qkv.{w}"] = torch.cat([s[f"{d}attn1.to_{p}.{w}"] for p in "qkv"])
            out[f"{b}attn.proj.{w}"] = s[f"{d}attn1.to_out.0.{w}"]
            out[f"{b}mlp.fc1.{w}"] = s[f"{d}ff.net.0.proj.{w}"]
            out[f"{b}mlp.fc2.{w}"] = s[f"{d}ff.net.2.{w}"]
            out[f"{b}adaLN_modulation.1.{w}"] = s[f"{d}norm1.linear.{w}"]
    return out


def dense_model(seed: int = 2) -> DiT:
    model = DiT(ModelConfig(size="tiny/2", kind=False, image_size=8, in_channels=4,
                            learn_sigma=True, class_names=[f"c{i}" for i in range(CLASSES)]))  # fmt: skip
    randomise(model, seed)
    return model.eval()


def fails(argv: list[str], capsys) -> str:
    """Run a command that must fail as a user error (exit 2); its message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ---- the reference and the conventions -------------------------------------------------------


def test_reference_computes_dits_timestep_features():
    t = torch.tensor([0, 1, 10, 250, 999])
    half = 128
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    dit = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # DiT's TimestepEmbedder
    ref = make_reference()
    proj = with_dit_time(ref).transformer_blocks[0].norm1.emb.time_proj
    torch.testing.assert_close(proj(t), dit, rtol=0, atol=1e-6)
    stock = ref.transformer_blocks[0].norm1.emb.time_proj
    assert (stock(t) - dit).abs().max() > 0.1  # diffusers' own frequencies: i/127


def test_position_embedding_channel_orders():
    """DiT's table is MAE's formula (column in the first half of the channels, row in the second,
    each sines then cosines of 10000^(-k/(dim/4))); kind-dit's own holds DiT's channels in the
    order `residual_order` reports (the two halves swapped), which the weights are permuted to."""
    for dim, grid in ((128, 4), (64, 3), (1152, 16)):
        ours = dit_pos_embed(dim, grid)
        quarter = dim // 4
        omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        row, col = torch.div(torch.arange(grid * grid), grid, rounding_mode="floor"), (
            torch.arange(grid * grid) % grid)  # fmt: skip
        col_angle, row_angle = col[:, None] * omega, row[:, None] * omega  # [T, dim/4]
        formula = torch.cat([col_angle.sin(), col_angle.cos(), row_angle.sin(), row_angle.cos()], 1)
        torch.testing.assert_close(ours, formula.float(), rtol=0, atol=1e-6)
        order = residual_order(sincos_pos_embed(dim, grid), dim)
        torch.testing.assert_close(sincos_pos_embed(dim, grid), ours[:, order], rtol=0, atol=1e-6)


# ---- import ----------------------------------------------------------------------------------


def test_official_checkpoint_imports_to_dits_outputs(tmp_path, capsys):
    ref = make_reference()
    torch.save(official_state(ref), tmp_path / "dit.pt")
    main(["import", str(tmp_path / "dit.pt"), "--out", str(tmp_path / "m")])
    assert "model ->" in capsys.readouterr().out
    model, diffusion, meta = load_model(tmp_path / "m")
    assert_same(model, with_dit_time(ref))
    assert relative_gap(model, ref) > 1e-3  # stock diffusers: its own timestep frequencies
    cfg = model.config
    assert (cfg.size, cfg.kind, cfg.image_size, cfg.in_channels, cfg.learn_sigma) == (
        "tiny/2", False, 8, 4, True)  # fmt: skip
    assert cfg.class_names == [str(i) for i in range(CLASSES)]
    assert (diffusion.prediction, diffusion.schedule, diffusion.num_timesteps) == (
        "eps", "linear", 1000)  # fmt: skip
    assert meta["imported"]["license"] == "CC-BY-NC-4.0"
    assert meta["latent"] == {"vae": None, "image_size": 64, "scaling_factor": 0.18215,
                              "shift_factor": 0.0, "latent_channels": 4, "downsampling": 8}  # fmt: skip
    notice = (tmp_path / "m" / "NOTICE").read_text()
    assert "CC BY-NC 4.0" in notice and meta["imported"]["sha256"] in notice
    assert "NOTICE" in json.loads((tmp_path / "m" / "checksums.json").read_text())["sha256"]


def test_official_checkpoint_with_class_names_and_a_vae(tmp_path, vae_dir, capsys):
    """DiT's weights work on the SD VAE's latents: a VAE of another latent space is refused."""
    from diffusers import AutoencoderKL

    torch.save(official_state(make_reference()), tmp_path / "dit.pt")
    names = [f"class {i}" for i in range(CLASSES)]
    (tmp_path / "names.txt").write_text("# one a line\n" + "\n".join(names) + "\n\n")
    args = ["import", str(tmp_path / "dit.pt"), "--out", str(tmp_path / "m"), "--class-names",
            str(tmp_path / "names.txt"), "--vae"]  # fmt: skip
    assert "downsampling 2, not 8" in fails([*args, str(vae_dir)], capsys)  # the tests' x2 VAE
    sd_like = tmp_path / "sd-like"  # four down blocks: x8, as the SD VAE
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4,
                  layers_per_block=1, norm_num_groups=8).save_pretrained(sd_like)  # fmt: skip
    main([*args, str(sd_like)])
    model, _, meta = load_model(tmp_path / "m")
    assert model.config.class_names == names
    assert meta["latent"]["vae"] == str(sd_like.resolve()) and meta["latent"]["downsampling"] == 8


def test_diffusers_folder_imports_to_the_same_outputs(tmp_path, capsys, vae_dir):
    ref = make_reference(seed=3)
    pipe = tmp_path / "pipe"  # a DiTPipeline folder: the transformer in transformer/
    ref.save_pretrained(pipe / "transformer")
    (pipe / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# DiT\n")
    (pipe / "LICENSE").write_text("Attribution-NonCommercial 4.0 International\n")
    (pipe / "license_weights.safetensors").write_bytes(b"not a licence")
    main(["import", str(pipe), "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "10000^(-i/127)" in out  # the note on diffusers' timestep frequencies
    model, diffusion, meta = load_model(tmp_path / "m")
    assert_same(model, with_dit_time(ref))
    assert diffusion.prediction == "eps" and model.config.learn_sigma
    assert meta["imported"]["license"] == "cc-by-nc-4.0"
    assert (tmp_path / "m" / "source-LICENSE").read_text().startswith("Attribution")
    assert (tmp_path / "m" / "source-README.md").is_file()
    assert not (tmp_path / "m" / "source-license_weights.safetensors").exists()
    assert "cc-by-nc-4.0" in (tmp_path / "m" / "NOTICE").read_text()
    # a diffusers DiT may have been trained on any VAE's latents: none is assumed, the one
    # given is recorded with its latent space and sets the image size (x2 here)
    assert meta["latent"] == {"vae": None, "image_size": 8 * 8}
    main(["import", str(pipe), "--out", str(tmp_path / "v"), "--vae", str(vae_dir)])
    latent = load_model(tmp_path / "v")[2]["latent"]
    assert latent["image_size"] == 8 * 2 and latent["downsampling"] == 2
    wide = tmp_path / "wide-vae"  # a VAE of 8-channel latents (its config is what is read)
    shutil.copytree(vae_dir, wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(config | {"latent_channels": 8}))
    err = fails(["import", str(pipe), "--out", str(tmp_path / "w"), "--vae", str(wide)], capsys)
    assert "makes 8-channel latents" in err and "takes 4 channels" in err


def test_a_pipelines_scheduler_sets_the_imported_diffusion(tmp_path, capsys):
    pipe = tmp_path / "pipe"
    make_reference(seed=3).save_pretrained(pipe / "transformer")
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  clip_sample=False).save_pretrained(pipe / "scheduler")  # fmt: skip
    main(["import", str(pipe), "--out", str(tmp_path / "m")])
    assert "v-prediction, cosine schedule" in capsys.readouterr().out
    _, diffusion, meta = load_model(tmp_path / "m")
    assert diffusion == DiffusionConfig(prediction="v", schedule="cosine", min_snr_gamma=None,
                                        clip_x0=None)  # fmt: skip
    assert meta["sample"]["steps"] == 250  # DiT's sampling defaults still
    # DiT's own scheduler (diffusers' defaults clip x0 to ±1 unless told not to)
    shutil.rmtree(pipe / "scheduler")
    DDPMScheduler().save_pretrained(pipe / "scheduler")
    main(["import", str(pipe), "--out", str(tmp_path / "dit")])
    assert load_model(tmp_path / "dit")[1] == DiffusionConfig(
        prediction="eps", schedule="linear", min_snr_gamma=None, clip_x0=1.0
    )
    # what kind-dit's diffusion cannot hold is refused, naming the setting
    shutil.rmtree(pipe / "scheduler")
    DDPMScheduler(beta_schedule="scaled_linear", beta_end=0.012).save_pretrained(pipe / "scheduler")
    err = fails(["import", str(pipe), "--out", str(tmp_path / "no")], capsys)
    assert "beta_schedule 'scaled_linear'" in err and "transformer/ folder alone" in err
    assert not (tmp_path / "no").exists()


def test_diffusers_first_dit_folder_imports(tmp_path, capsys):
    """diffusers first saved DiT as a `Transformer2DModel` with norm_type ada_norm_zero (as
    facebook/DiT-XL-2-256 on the Hub still is), with keys DiT has no use for; diffusers reads it
    as a DiTTransformer2DModel, and so does kind-dit. Another Transformer2DModel is refused."""
    ref = make_reference(seed=5)
    folder = tmp_path / "pipe" / "transformer"
    ref.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    legacy = {k: v for k, v in config.items() if k != "norm_eps"} | {
        "_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
        "cross_attention_dim": None, "num_vector_embeds": None, "only_cross_attention": False,
        "use_linear_projection": False}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(legacy))
    main(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "m")])
    assert "eps 1e-05" in capsys.readouterr().out  # no norm_eps then: diffusers' default
    assert_same(load_model(tmp_path / "m")[0], with_dit_time(ref))

    (folder / "config.json").write_text(json.dumps(legacy | {"norm_type": "layer_norm"}))
    err = fails(["import", str(folder), "--out", str(tmp_path / "other")], capsys)
    assert "Transformer2DModel with norm_type 'layer_norm', not a DiT" in err


def test_dit_training_checkpoint_imports_its_ema_weights(tmp_path, capsys):
    """DiT's train.py saves {"model", "ema", "opt", "args": argparse.Namespace}; the EMA weights
    are the model (as DiT's find_model takes them). Other objects are refused in our words."""
    ref = make_reference()
    ema = official_state(ref)
    ckpt = {"model": {k: torch.zeros_like(v) for k, v in ema.items()}, "ema": ema, "opt": {},
            "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}  # fmt: skip
    torch.save(ckpt, tmp_path / "0400000.pt")
    main(["import", str(tmp_path / "0400000.pt"), "--out", str(tmp_path / "m")])
    assert_same(load_model(tmp_path / "m")[0], with_dit_time(ref))

    torch.save(ckpt | {"args": pathlib.PurePosixPath("x")}, tmp_path / "other.pt")
    err = fails(["import", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o")], capsys)
    assert "other.pt holds objects other than tensors" in err and "PurePosixPath" in err
    assert "torch.save(model.state_dict()" in err
    assert "weights_only=False" not in err and "\x1b" not in err and err.count("\n") == 1


def test_licence_files_survive_import_export_import(tmp_path):
    """Export carries an import's licence copies (`source-LICENSE`, ...); importing the export
    copies them again, as `source-source-LICENSE`: the licence text is never lost on the way."""
    pipe = tmp_path / "pipe"
    make_reference().save_pretrained(pipe / "transformer")
    (pipe / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# DiT\n")
    (pipe / "LICENSE").write_text("Attribution-NonCommercial 4.0 International\n")
    main(["import", str(pipe), "--out", str(tmp_path / "m")])
    main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "d")])
    main(["import", str(tmp_path / "d"), "--out", str(tmp_path / "back")])
    back = tmp_path / "back"
    assert (back / "source-source-LICENSE").read_text() == (pipe / "LICENSE").read_text()
    assert (back / "source-source-README.md").read_text() == (pipe / "README.md").read_text()
    assert "source-source-LICENSE" in (back / "NOTICE").read_text()
    assert load_model(back)[2]["imported"]["license"] == "cc-by-nc-4.0"


def test_diffusers_folder_with_diffusers_norm_eps_imports_with_a_note(tmp_path, capsys):
    make_reference(norm_eps=1e-5).save_pretrained(tmp_path / "ref")
    main(["import", str(tmp_path / "ref"), "--out", str(tmp_path / "m")])
    assert "eps 1e-05" in capsys.readouterr().out


# ---- export ----------------------------------------------------------------------------------


def test_export_loads_in_diffusers_with_the_same_outputs_and_round_trips(tmp_path, capsys):
    model = dense_model()
    diffusion = DiffusionConfig()  # kind-dit's default: v-prediction, cosine
    save_model_dir(tmp_path / "m", model, diffusion, {"sample": {"steps": 7}})
    main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "d"), "--format", "diffusers"])
    assert "10000^(-i/127)" in capsys.readouterr().out
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path / "d").eval()
    assert loaded.config.norm_eps == 1e-6 and loaded.config.num_embeds_ada_norm == CLASSES
    assert_same(model, with_dit_time(loaded))
    info = json.loads((tmp_path / "d" / "kind_dit.json").read_text())
    assert info["class_names"] == model.config.class_names and info["null_class"] == CLASSES
    assert info["scheduler"]["prediction_type"] == "v_prediction"
    assert info["scheduler"]["beta_schedule"] == "squaredcos_cap_v2"
    # the record's scheduler steps through the timesteps kind-dit's sampler does
    record = DDPMScheduler(**info["scheduler"])
    record.set_timesteps(25)
    ours = Diffusion(diffusion).scheduler("ddpm", 25, model.config.learn_sigma)
    assert record.timesteps.tolist() == ours.timesteps.tolist()
    assert record.timesteps[0] == diffusion.num_timesteps - 1
    # and back: the same tensors bit for bit, the same class names, diffusion and sampling
    main(["import", str(tmp_path / "d"), "--out", str(tmp_path / "back")])
    back, back_diffusion, meta = load_model(tmp_path / "back")
    assert back.config == model.config and back_diffusion == diffusion
    assert meta["sample"] == {"steps": 7}
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the export records its checksums; a file changed since is named on import
    weights = tmp_path / "d" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    err = fails(["import", str(tmp_path / "d"), "--out", str(tmp_path / "again")], capsys)
    assert "diffusion_pytorch_model.safetensors does not match its sha256" in err


@pytest.fixture(scope="module")
def kind_model() -> DiT:
    """A random KIND DiT with four classes (built once: its SVD initialisation is the slow part)."""
    kind = DiT(ModelConfig(size="tiny/2", kind=True, image_size=8, in_channels=4,
                           learn_sigma=True, class_names=[str(i) for i in range(4)]))  # fmt: skip
    randomise(kind, 4)
    return kind.eval()


def test_export_of_a_merged_model_writes_class_and_null_networks(tmp_path, kind_model):
    kind = kind_model
    merged = merge(kind, "2")
    save_model_dir(tmp_path / "m", merged, DiffusionConfig(), {"merged": "2"})
    main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "d")])
    x, t, _ = inputs()
    cond = with_dit_time(DiTTransformer2DModel.from_pretrained(tmp_path / "d").eval())
    # a path, not subfolder=: diffusers reads a root's own weights file whatever the subfolder
    null = with_dit_time(DiTTransformer2DModel.from_pretrained(tmp_path / "d" / "unconditional"))
    with torch.no_grad():
        ones, zeros = torch.ones(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)
        ours_cond, ours_null = merged(x, t, zeros), merged(x, t, ones)  # class "2", null
        theirs_cond, theirs_null = cond(x, t, zeros).sample, null(x, t, zeros).sample
        full = kind(x, t, torch.full((6,), 2))
    for a, b in ((ours_cond, theirs_cond), (ours_null, theirs_null), (full, theirs_cond)):
        assert (a - b).norm() / b.norm() < 1e-5
    assert json.loads((tmp_path / "d" / "kind_dit.json").read_text())["merged"] == "2"


def test_the_null_network_of_a_merged_export_imports_with_the_models_settings(tmp_path, kind_model):
    """`unconditional/` imports on its own with the model's diffusion (kind-dit's v-prediction and
    cosine schedule here, not DiT's ε and linear), sampling settings and licence copies."""
    merged = merge(kind_model, "2")
    save_model_dir(
        tmp_path / "m", merged, DiffusionConfig(), {"merged": "2", "sample": {"steps": 7}}
    )
    (tmp_path / "m" / "source-LICENSE").write_text("the source's licence\n")
    main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "d")])
    main(["import", str(tmp_path / "d" / "unconditional"), "--out", str(tmp_path / "null")])
    null, diffusion, meta = load_model(tmp_path / "null")
    assert diffusion == DiffusionConfig() and diffusion.prediction == "v"
    assert meta["sample"] == {"steps": 7} and null.config.class_names == []
    for k, v in merged.uncond.state_dict().items():
        assert torch.equal(null.state_dict()[k], v), k
    assert (tmp_path / "null" / "source-source-LICENSE").read_text() == "the source's licence\n"


def test_export_refuses_a_kind_model_and_a_foreign_mlp_ratio(tmp_path, capsys, kind_model):
    save_model_dir(tmp_path / "kind", kind_model, DiffusionConfig())
    err = fails(["export", str(tmp_path / "kind"), "--out", str(tmp_path / "d")], capsys)
    assert "KIND model" in err and "--merge" in err
    wide = DiT(ModelConfig(size="tiny/2", kind=False, image_size=8, in_channels=4,
                           class_names=["a"], mlp_ratio=2.0))  # fmt: skip
    save_model_dir(tmp_path / "wide", wide, DiffusionConfig())
    err = fails(["export", str(tmp_path / "wide"), "--out", str(tmp_path / "d")], capsys)
    assert "MLP ratio 2" in err
    make_reference().save_pretrained(tmp_path / "ref")  # a config.json, but no kind-dit model
    err = fails(["export", str(tmp_path / "ref"), "--out", str(tmp_path / "d")], capsys)
    assert "holds no model" in err and "KIND" not in err
    assert not (tmp_path / "d").exists()


# ---- errors ----------------------------------------------------------------------------------


def test_import_errors_name_the_problem_and_write_nothing(tmp_path, capsys):
    state = official_state(make_reference())
    out = str(tmp_path / "m")

    broken = dict(state)
    del broken["blocks.2.mlp.fc1.weight"]
    broken["blocks.0.attn.q_norm.weight"] = torch.ones(128)
    torch.save(broken, tmp_path / "broken.pt")
    err = fails(["import", str(tmp_path / "broken.pt"), "--out", out], capsys)
    assert "missing: blocks.2.mlp.fc1.weight" in err and "unknown: blocks.0.attn.q_norm" in err

    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    err = fails(["import", str(tmp_path / "notes.txt"), "--out", out], capsys)
    assert "not a PyTorch checkpoint" in err
    (tmp_path / "empty").mkdir()
    err = fails(["import", str(tmp_path / "empty"), "--out", out], capsys)
    assert "without config.json" in err

    torch.save(state, tmp_path / "dit.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    err = fails(["import", str(tmp_path / "dit.pt"), "--out", str(tmp_path / "full")], capsys)
    assert "not empty" in err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]

    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    err = fails(["import", str(tmp_path / "dit.pt"), "--out", out,
                 "--class-names", str(tmp_path / "latin1.txt")], capsys)  # fmt: skip
    assert "latin1.txt is not UTF-8 text" in err

    (tmp_path / "names.txt").write_text("a\nb\n")
    err = fails(["import", str(tmp_path / "dit.pt"), "--out", out,
                 "--class-names", str(tmp_path / "names.txt")], capsys)  # fmt: skip
    assert "2 class names for a model with 10 classes" in err
    assert not (tmp_path / "m").exists()


def test_import_refuses_what_kind_dit_cannot_build(tmp_path, capsys, vae_dir):
    out = str(tmp_path / "m")
    small = make_reference(num_layers=2, attention_head_dim=16)
    small.save_pretrained(tmp_path / "small")  # depth 2, hidden 64: no kind-dit size
    err = fails(["import", str(tmp_path / "small"), "--out", out], capsys)
    assert "depth 2, hidden size 64" in err and "tiny (depth 4, hidden 128" in err

    untied = DiTTransformer2DModel(**SHAPE)  # every block has its own random embedders
    untied.save_pretrained(tmp_path / "untied")
    err = fails(["import", str(tmp_path / "untied"), "--out", out], capsys)
    assert "block 1's" in err and "one timestep embedder" in err

    make_reference().save_pretrained(tmp_path / "patch")  # patch-2 weights, config patch 4
    config = json.loads((tmp_path / "patch" / "config.json").read_text())
    (tmp_path / "patch" / "config.json").write_text(json.dumps(config | {"patch_size": 4}))
    err = fails(["import", str(tmp_path / "patch"), "--out", out], capsys)
    assert "config.json says patch = 4" in err and "the weights 2" in err

    for key, value in (("sample_size", "abc"), ("norm_eps", "x")):  # a hand-edited config.json
        make_reference().save_pretrained(tmp_path / key)
        config = json.loads((tmp_path / key / "config.json").read_text())
        (tmp_path / key / "config.json").write_text(json.dumps(config | {key: value}))
        err = fails(["import", str(tmp_path / key), "--out", out], capsys)
        assert f"config.json: {key} = {value!r} is not" in err
    make_reference().save_pretrained(tmp_path / "edited")  # kind-dit's record beside it, edited
    (tmp_path / "edited" / "kind_dit.json").write_text(json.dumps({"latent": "x"}))
    err = fails(["import", str(tmp_path / "edited"), "--out", out], capsys)
    assert "kind_dit.json: latent must be a mapping" in err
    (tmp_path / "edited" / "kind_dit.json").write_text(json.dumps({"latent": {"vae": 5}}))
    err = fails(["import", str(tmp_path / "edited"), "--out", out], capsys)
    assert "kind_dit.json: latent.vae is 5, not str | None" in err
    channels = make_reference().config.in_channels  # a record of other latents than it takes
    (tmp_path / "edited" / "kind_dit.json").write_text(
        json.dumps({"latent": {"vae": None, "latent_channels": channels + 1}})
    )
    err = fails(["import", str(tmp_path / "edited"), "--out", out], capsys)
    assert f"of {channels + 1}-channel latents, the model takes {channels} channels" in err
    classes = make_reference().config.num_embeds_ada_norm  # its record's names, one repeated
    (tmp_path / "edited" / "kind_dit.json").write_text(json.dumps({"class_names": ["a"] * classes}))
    err = fails(["import", str(tmp_path / "edited"), "--out", out], capsys)
    assert "class names ['a'] appear more than once" in err

    geglu = make_reference()
    geglu.register_to_config(activation_fn="geglu")
    geglu.save_pretrained(tmp_path / "geglu")
    err = fails(["import", str(tmp_path / "geglu"), "--out", out], capsys)
    assert "activation_fn = 'geglu'" in err

    state = official_state(make_reference())
    state["pos_embed"] = torch.randn_like(state["pos_embed"])  # a learned table
    torch.save(state, tmp_path / "learned.pt")
    err = fails(["import", str(tmp_path / "learned.pt"), "--out", out], capsys)
    assert "not DiT's fixed sine-cosine table" in err

    state = official_state(make_reference())
    state["pos_embed"] = torch.tensor(1.0)
    torch.save(state, tmp_path / "pos0d.pt")
    err = fails(["import", str(tmp_path / "pos0d.pt"), "--out", out], capsys)
    assert "pos_embed has shape ()" in err

    state = official_state(make_reference())
    state["y_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"][-1:]
    torch.save(state, tmp_path / "nullonly.pt")  # the null row and no class
    err = fails(["import", str(tmp_path / "nullonly.pt"), "--out", out], capsys)
    assert "at least one class row" in err

    torch.save(official_state(make_reference()), tmp_path / "dit.pt")
    for vae in (tmp_path / "no-vae", tmp_path / "dit.pt"):  # the VAE is checked before import
        err = fails(["import", str(tmp_path / "dit.pt"), "--out", out, "--vae", str(vae)], capsys)
        assert f"VAE directory {vae}" in err and ("does not exist" in err or "is a file" in err)
    pixel = make_reference(in_channels=3, out_channels=6)
    torch.save(official_state(pixel), tmp_path / "pixel.pt")
    err = fails(["import", str(tmp_path / "pixel.pt"), "--out", out, "--vae", str(vae_dir)],
                capsys)  # fmt: skip
    assert "pixel-space model (3 input channels)" in err and "without --vae" in err
    assert not (tmp_path / "m").exists()


def test_import_reads_null_settings_as_diffusers_defaults(tmp_path, capsys):
    """null in config.json, which no diffusers model is built with, reads as a setting left out:
    diffusers' default, said in a note; a default that does not fit the weights is refused."""
    make_reference().save_pretrained(tmp_path / "good")  # sample_size 8, num_layers 4, ...
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    (tmp_path / "good" / "config.json").write_text(json.dumps(config | {"sample_size": None}))
    main(["import", str(tmp_path / "good"), "--out", str(tmp_path / "m")])
    assert "gives no sample_size; read as diffusers' defaults (32)" in capsys.readouterr().out
    assert load_model(tmp_path / "m")[0].config.image_size == 32
    for key, expected in (("attention_head_dim", "4 heads of 72 channels"),
                          ("num_layers", "num_layers = 28 (diffusers' default where it gives "
                                         "none), the weights hold 4 blocks")):  # fmt: skip
        (tmp_path / "good" / "config.json").write_text(json.dumps(config | {key: None}))
        err = fails(["import", str(tmp_path / "good"), "--out", str(tmp_path / key)], capsys)
        assert expected in err
    (tmp_path / "good" / "config.json").write_text(json.dumps(config | {"sample_size": 0}))
    err = fails(["import", str(tmp_path / "good"), "--out", str(tmp_path / "zero")], capsys)
    assert "input size 0 is not a positive multiple of patch 2" in err


def test_import_refuses_malformed_indexes_and_tensors(tmp_path, capsys):
    out = str(tmp_path / "m")
    folder = tmp_path / "sharded"
    make_reference().save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "a.safetensors")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    for weight_map, expected in (
        (["a.safetensors"], "weight_map is a JSON list, not an object"),
        ({"pos_embed.proj.weight": "../a.safetensors"}, "names '../a.safetensors', not the name"),
    ):  # a damaged index; a file outside the folder
        index.write_text(json.dumps({"weight_map": weight_map}))
        assert expected in fails(["import", str(folder), "--out", out], capsys)

    state = official_state(make_reference())  # 0-d tensors where shapes are read
    for key, expected in (("blocks.0.attn.qkv.bias", "[channels] (a bias)"),
                          ("x_embedder.proj.weight", "[hidden, channels, patch, patch]"),
                          ("blocks.0.mlp.fc1.weight", "[rows, columns]"),
                          ("final_layer.linear.weight", "[rows, columns]")):  # fmt: skip
        torch.save(state | {key: torch.tensor(1.0)}, tmp_path / "0d.pt")
        err = fails(["import", str(tmp_path / "0d.pt"), "--out", out], capsys)
        assert f"0d.pt: {key} has shape (), expected {expected}" in err

    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    err = fails(["import", str(tmp_path / "ddp.pt"), "--out", out], capsys)
    assert "every name starts with module. or _orig_mod." in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_official_checkpoint_imports(tmp_path, capsys, dtype):
    """DiT checkpoints are often shared in fp16 or bf16: the rounded position table is still
    DiT's (checked to the dtype's precision), and the weights load as float32."""
    ref = make_reference()
    state = {k: v.to(dtype) for k, v in official_state(ref).items()}
    torch.save(state, tmp_path / "dit.pt")
    main(["import", str(tmp_path / "dit.pt"), "--out", str(tmp_path / "m")])
    assert f"weights stored as {dtype}, converted to float32" in capsys.readouterr().out
    model, _, _ = load_model(tmp_path / "m")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())  # the reference rounded as the checkpoint was
    assert_same(model, with_dit_time(ref))


def test_pixel_space_official_checkpoint_guides_every_channel(tmp_path):
    """DiT's sampling defaults come along with an official checkpoint, except guiding 3 of the
    channels, which is its choice for 4 latent channels: a 3-channel model guides all three."""
    torch.save(official_state(make_reference(in_channels=3, out_channels=6)), tmp_path / "p.pt")
    main(["import", str(tmp_path / "p.pt"), "--out", str(tmp_path / "m")])
    _, _, meta = load_model(tmp_path / "m")
    assert meta["sample"]["sampler"] == "ddpm" and "guided_channels" not in meta["sample"]
    assert meta["latent"] is None
