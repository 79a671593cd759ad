"""torch.compile holds: a fixed batch size compiles once whatever the class mix, with no graph
breaks in the model's forward, and computes what eager does (KIND and dense)."""

import pytest
import torch
from torch._dynamo.utils import counters

from kind.core.model import DiT, ModelConfig

pytestmark = pytest.mark.slow
CLASSES = [str(i) for i in range(10)]


@pytest.mark.parametrize("kind", [True, False])
def test_twelve_steps_with_random_class_mixes_compile_once(kind):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = DiT(ModelConfig(class_names=CLASSES, kind=kind, null_tailor=kind))
    with torch.no_grad():  # leave adaLN-Zero's identity start so every path carries signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    # aot_eager traces forward and backward as inductor does, without its code generation (the
    # inductor run is test_train.py::test_torch_compile_trains_like_eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        y = torch.randint(0, 11, (8,), generator=g)  # any mix of the 10 classes and the null
        x, t = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 1000, (8,), generator=g)
        route = model.route(y, blocked=False)  # what the training step hands a compiled model
        out = compiled(x, t, y, route=route)
        out.square().mean().backward()
        if step % 4 == 0:
            torch.testing.assert_close(out, model(x, t, y), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["calls_captured"] > 0
