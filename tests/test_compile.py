"""torch.compile holds: a fixed batch size compiles once whatever the class mix, with no graph
breaks in the model's forward, and computes what eager does (KIND and dense), in training and in
sampling."""

import pytest
import torch
from torch._dynamo.utils import counters

from kind.core.decomposition import merge
from kind.core.diffusion import Diffusion, DiffusionConfig, compiled
from kind.core.model import DiT, ModelConfig

pytestmark = pytest.mark.slow
CLASSES = [str(i) for i in range(10)]


def perturbed_model(kind: bool) -> DiT:
    """A model past adaLN-Zero's identity start, so every path carries signal; dynamo's caches
    and counters cleared."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = DiT(ModelConfig(class_names=CLASSES, kind=kind, null_tailor=kind))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def assert_one_graph() -> None:
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["calls_captured"] > 0


@pytest.mark.parametrize("kind", [True, False])
def test_twelve_steps_with_random_class_mixes_compile_once(kind):
    model = perturbed_model(kind)
    # aot_eager traces forward and backward as inductor does, without its code generation (the
    # inductor run is test_train.py::test_torch_compile_trains_like_eager)
    net = torch.compile(model, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        y = torch.randint(0, 11, (8,), generator=g)  # any mix of the 10 classes and the null
        x, t = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 1000, (8,), generator=g)
        route = model.route(y, blocked=False)  # what the training step hands a compiled model
        out = net(x, t, y, route=route)
        out.square().mean().backward()
        if step % 4 == 0:
            torch.testing.assert_close(out, model(x, t, y), rtol=1e-4, atol=1e-5)
    assert_one_graph()


@pytest.mark.parametrize("kind", [True, False])
def test_guided_sampling_compiles_once_for_any_class_mix(kind):
    """Sampling hands a compiled model the static route: the same graph draws any classes at a
    fixed batch size, and draws what the eager model does (eager KIND takes the blocked route)."""
    model = perturbed_model(kind).eval()
    net = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert compiled(net) and not compiled(model)
    diffusion = Diffusion(DiffusionConfig())

    def draw(m, labels):
        y = torch.tensor(labels)
        seeds = [torch.Generator().manual_seed(i) for i in range(len(y))]
        return diffusion.sample(m, y, (1, 28, 28), null_id=model.null_id, steps=3, cfg_scale=1.5,
                                generators=seeds)  # fmt: skip

    for labels in ([0, 1, 2, 3], [4, 4, 9, 9], [7, 7, 7, 7]):  # 4 samples + 4 null rows a step
        torch.testing.assert_close(draw(net, labels), draw(model, labels), rtol=1e-4, atol=1e-5)
    assert_one_graph()
    with pytest.raises(ValueError, match="not in this model"):  # checked before the graph runs
        draw(net, [0, 1, 2, len(CLASSES) + 5])


def test_guided_sampling_of_a_merged_class_compiles_once():
    """A deployed class (one class folded into dense weights, `merge`) samples with guidance
    through its conditional and unconditional networks: the split between them is read once per
    sampling run, so the compiled model has one graph and no data-dependent shapes."""
    merged = merge(perturbed_model(True), "3")
    net = torch.compile(merged, backend="aot_eager", fullgraph=True)
    diffusion = Diffusion(DiffusionConfig())
    seeds = [torch.Generator().manual_seed(i) for i in range(3)]
    kw = dict(null_id=merged.null_id, steps=3, cfg_scale=1.5)
    y = torch.zeros(3, dtype=torch.long)  # the merged model's one class
    want = diffusion.sample(merged, y, (1, 28, 28), generators=seeds, **kw)
    seeds = [torch.Generator().manual_seed(i) for i in range(3)]
    got = diffusion.sample(net, y, (1, 28, 28), generators=seeds, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_one_graph()
