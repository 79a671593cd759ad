"""`kind-dit assemble --max-params N` / `--max-gflops G`: drop the lowest-|σ| learngene components
to fit a parameter or a compute budget."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kind.cli.main import main
from kind.core.decomposition import PartsError
from kind.core.diffusion import DiffusionConfig
from kind.core.flops import count_flops
from kind.core.model import DiT, ModelConfig, count_params
from kind.store.load import load_model
from kind.store.parts import (
    assemble,
    budget_floor,
    budget_keep,
    decompose,
    forward_flops,
    shrink_to_budget,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["zero", "one", "two", "three"]
KEEP = ["one", "three"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    model = DiT(ModelConfig(class_names=NAMES, rank_tailor=4))
    with torch.no_grad():  # leave the SVD start so σ differ and every component matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return decompose(model.eval(), DiffusionConfig(), tmp_path_factory.mktemp("p") / "parts")


@pytest.fixture(scope="module")
def normal(parts, tmp_path_factory):
    out = assemble(parts, KEEP, tmp_path_factory.mktemp("a") / "normal")
    return load_model(out)[0]


def _batch(y, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(y)
    x = torch.randn(len(y), 1, 28, 28, generator=g)
    return x, torch.randint(0, 1000, (len(y),), generator=g), y


def test_full_budget_equals_the_normal_assembly(parts, normal, tmp_path):
    out = assemble(parts, KEEP, tmp_path / "m", max_params=count_params(normal))
    model = load_model(out)[0]
    assert model.config.learngene_ranks is None
    assert count_params(model) == count_params(normal)
    x, t, y = _batch([1, 3, 4, 1])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), normal(x, t, y))


def test_smaller_budget_drops_the_smallest_sigmas(parts, normal, tmp_path):
    full = count_params(normal)
    layers = dict(normal.kind_layers())
    step = max(m.in_features + m.out_features + 1 for m in layers.values())
    budget = full - 20 * step - 7
    main(["assemble", str(parts), "--classes", ",".join(KEEP), "--out", str(tmp_path / "m"),
          "--max-params", str(budget)])  # fmt: skip
    model = load_model(tmp_path / "m")[0]
    n = count_params(model)
    assert budget - step < n <= budget  # ≤ N and within one component of it
    small = dict(model.kind_layers())
    assert model.config.learngene_ranks
    dropped, kept = [], []  # |σ| of dropped components, and of kept ones that could have gone
    zeroed = DiT(normal.config)
    zeroed.load_state_dict(normal.state_dict())
    zeroed.eval()
    for name, m in layers.items():
        s, s_small = m.S.detach(), small[name].S.detach()
        assert small[name].rank_learngene == len(s_small) >= 1
        assert small[name].U.shape == (m.out_features, len(s_small))  # really smaller
        gone = ~torch.isin(s, s_small)
        assert int(gone.sum()) == len(s) - len(s_small)
        dropped += s[gone].abs().tolist()
        if len(s_small) > 1:
            kept += s_small.abs().tolist()
        with torch.no_grad():
            dict(zeroed.kind_layers())[name].S[gone] = 0
    assert len(dropped) >= 20
    assert max(dropped) <= min(kept)
    # saved exactly (in + out + 1) per dropped component
    saved = sum(
        (layers[k].rank_learngene - small[k].rank_learngene)
        * (layers[k].in_features + layers[k].out_features + 1)
        for k in layers
    )
    assert n == full - saved
    # dropping a component computes what zeroing its σ does
    x, t, y = _batch([1, 3, 4, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), zeroed(x, t, y), rtol=1e-5, atol=1e-5)


def test_too_small_budget_is_refused_before_writing(parts, normal, tmp_path):
    floor = count_params(normal) - sum(
        (m.rank_learngene - 1) * (m.in_features + m.out_features + 1)
        for _, m in normal.kind_layers()
    )
    with pytest.raises(PartsError, match="minimum reachable") as e:
        assemble(parts, KEEP, tmp_path / "m", max_params=floor - 1)
    assert str(floor) in str(e.value)
    assert not (tmp_path / "m").exists()
    keep = budget_keep(normal, floor)  # the floor itself is reachable: one component per layer
    assert all(len(idx) == 1 for idx in keep.values())
    with pytest.raises(SystemExit):
        main(["assemble", str(parts), "--out", str(tmp_path / "c"), "--max-params", "10"])
    assert not (tmp_path / "c").exists()
    for flag, value in (("--max-gflops", "nan"), ("--max-gflops", "inf"), ("--max-params", "-1")):
        with pytest.raises(SystemExit) as e:  # a usage error, not the smallest model
            main(["assemble", str(parts), "--out", str(tmp_path / "c"), flag, value])
        assert e.value.code == 2
    with pytest.raises(ValueError, match="a finite number"):
        budget_keep(normal, max_gflops=float("nan"))
    assert not (tmp_path / "c").exists()


def _counted(model: DiT) -> int:
    """FLOPs of one forward pass of one sample of the model's first class, as
    torch.utils.flop_counter counts them (attention through the math kernel, which it counts)."""
    c, size = model.config.in_channels, model.config.image_size
    x = torch.randn(1, c, size, size)
    y = torch.tensor(model.config.held_classes[:1])
    with sdpa_kernel(SDPBackend.MATH), count_flops() as counter, torch.no_grad():
        model.eval()(x, torch.tensor([500]), y)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "config",
    [
        dict(kind=False),  # dense
        dict(),  # 16 tokens: the learngene through its factors, the tailor through its factors
        dict(size="tiny/2"),  # 196 tokens: the class's tailor folded into one weight
        dict(size="tiny/2", rank_tailor=0, rank_learngene=128),  # learngene materialised
        dict(size="tiny/4", decompose_adaln=True, learn_sigma=True, groups=[1]),
        dict(learngene_ranks={"blocks.0.attn.q": 3, "blocks.3.mlp.fc2": 100}),
    ],
    ids=["dense", "factored", "folded", "materialised", "adaln+sigma+assembled", "budgeted"],
)
def test_flop_count_is_what_torch_counts(config):
    torch.manual_seed(0)
    model = DiT(ModelConfig(class_names=NAMES, **({"rank_tailor": 4} | config)))
    assert forward_flops(model) == _counted(model)


def test_flop_budget_fits_and_drops_the_smallest_sigmas(parts, normal, tmp_path):
    full = forward_flops(normal)
    floor, same = budget_floor(normal, gflops=True)
    assert same == full and floor < 0.8 * full
    budget = 0.8 * full / 1e9
    main(["assemble", str(parts), "--classes", ",".join(KEEP), "--out", str(tmp_path / "m"),
          "--max-gflops", str(budget)])  # fmt: skip
    model = load_model(tmp_path / "m")[0]
    counted = _counted(model)
    assert counted == forward_flops(model) <= budget * 1e9
    assert counted > budget * 1e9 - max(  # within one component's saving of the budget
        2 * 16 * (m.in_features + m.out_features) for _, m in model.kind_layers()
    )
    small = dict(model.kind_layers())
    dropped, kept = [], []
    for name, m in normal.kind_layers():
        s, s_small = m.S.detach().abs(), small[name].S.detach().abs()
        gone = ~torch.isin(s, s_small)
        dropped += s[gone].tolist()
        kept += s_small.tolist() if len(s_small) > 1 else []
    assert dropped and max(dropped) <= min(kept)
    # the same rule as --max-params: a FLOP budget that keeps what a parameter budget keeps
    keep = budget_keep(normal, max_gflops=budget)
    assert budget_keep(normal, count_params(model)) == keep
    assert forward_flops(shrink_to_budget(normal, max_gflops=full / 1e9)) == full  # fits: as is


def test_unreachable_flop_budget_and_two_budgets_are_refused(parts, normal, tmp_path):
    floor, full = budget_floor(normal, gflops=True)
    with pytest.raises(PartsError, match="minimum reachable") as e:
        assemble(parts, KEEP, tmp_path / "m", max_gflops=0.99 * floor / 1e9)
    assert f"{floor / 1e9:.6g} GFLOPs" in str(e.value)
    assert not (tmp_path / "m").exists()
    assert all(len(i) == 1 for i in budget_keep(normal, max_gflops=floor / 1e9).values())
    with pytest.raises(PartsError, match="give one"):
        assemble(parts, KEEP, tmp_path / "m", max_params=10**9, max_gflops=1.0)
    with pytest.raises(SystemExit):
        main(["assemble", str(parts), "--out", str(tmp_path / "c"), "--max-params", "10",
              "--max-gflops", "1"])  # fmt: skip
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()
