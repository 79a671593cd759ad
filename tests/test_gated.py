"""The class-gated SVD layer: docs/KIND.md invariants 1 (forward isolation) and 4 (merge exactness), one
row per layer configuration, covering both the per-group-weight and the factored tailor paths."""

import pytest
import torch

from kind.core.gated import KindLinear, grouped_linear, make_route, resolve_rank

# (in, out, rank_learngene, rank_tailor, groups, tokens): small ranks and few tokens take the
# factored path, large ranks and many tokens fold each group into its own dense weight.
CASES = [
    (32, 48, 0.5, 4, [0, 1, 2], 16),
    (64, 64, 60, 4, [0, 1, 2, 3], 1),
    (48, 32, 4, 2, [0, 1], 8),
    (24, 96, 0.25, 0.125, [0, 3, 7], 32),
]


def _perturbed(layer: KindLinear) -> KindLinear:
    """Every tailor singular value pushed away from the tiny initial value, so tailors matter."""
    with torch.no_grad():
        for t in layer.tailors.values():
            t.S.normal_()
    return layer


@pytest.mark.parametrize("fin,fout,rg,rt,groups,tokens", CASES)
def test_output_of_a_sample_ignores_other_groups_tailors(fin, fout, rg, rt, groups, tokens):
    torch.manual_seed(0)
    layer = _perturbed(KindLinear(fin, fout, rg, rt, groups))
    g = torch.tensor([groups[i % len(groups)] for i in range(7)] + [-1])  # last: null class
    x = torch.randn(len(g), tokens, fin)
    route = make_route(g)
    before = layer(x, route)
    victim = str(groups[0])
    with torch.no_grad():
        for p in layer.tailors[victim].parameters():
            p.add_(torch.randn_like(p))
    after = layer(x, route)
    untouched = g != groups[0]
    assert torch.equal(before[untouched], after[untouched])  # bit for bit
    assert not torch.allclose(before[~untouched], after[~untouched])


@pytest.mark.parametrize("fin,fout,rg,rt,groups,tokens", CASES)
def test_merge_matches_the_factored_layer(fin, fout, rg, rt, groups, tokens):
    torch.manual_seed(1)
    layer = _perturbed(KindLinear(fin, fout, rg, rt, groups))
    x = torch.randn(5, tokens, fin)
    for group in [*groups, None]:
        g = torch.full((5,), -1 if group is None else group)
        ref = layer(x, make_route(g))
        merged = layer.merge(group)
        assert isinstance(merged, torch.nn.Linear)
        err = (merged(x) - ref).norm() / ref.norm()
        assert err <= 1e-5, f"group {group}: relative error {err}"


def test_null_class_uses_the_learngene_only():
    torch.manual_seed(2)
    layer = _perturbed(KindLinear(32, 32, 16, 4, [0, 1]))
    x = torch.randn(4, 3, 32)
    out = layer(x, make_route(torch.tensor([-1, -1, -1, -1])))
    assert torch.allclose(out, layer.merge(None)(x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(out, layer(x, None), rtol=0, atol=0)


def test_mixed_batch_in_any_order_gives_each_sample_its_own_output():
    torch.manual_seed(3)
    layer = _perturbed(KindLinear(32, 40, 12, 4, [0, 1, 2]))
    g = torch.tensor([2, 0, -1, 1, 0, 2])
    x = torch.randn(6, 5, 32)
    route = make_route(g)
    assert route.order is not None and route.sizes == (2, 1, 2, 1)
    out = layer(x, route)
    in_block_order = layer(x[route.order], make_route(g[route.order]))
    assert torch.equal(out[route.order], in_block_order)
    for j in range(len(g)):
        single = layer(x[j : j + 1], make_route(g[j : j + 1]))
        torch.testing.assert_close(out[j : j + 1], single, rtol=1e-5, atol=1e-6)


def test_absent_groups_get_no_gradient():
    layer = _perturbed(KindLinear(16, 16, 8, 2, [0, 1, 2]))
    x = torch.randn(3, 4, 16)
    layer(x, make_route(torch.tensor([0, 0, -1]))).sum().backward()
    assert all(p.grad is not None for p in layer.tailors["0"].parameters())
    for key in ("1", "2"):
        assert all(p.grad is None for p in layer.tailors[key].parameters())


def test_initialisation_is_an_svd_and_tailors_start_orthogonal_to_the_learngene():
    torch.manual_seed(4)
    layer = KindLinear(64, 48, 0.5, 4, [0, 1])
    assert layer.orthogonality_error() < 1e-6
    assert torch.all(layer.S[:-1] >= layer.S[1:])  # leading singular values, in order
    t = layer.tailors["0"]
    assert (layer.U.T @ t.U).abs().max() < 1e-5 and (layer.V.T @ t.V).abs().max() < 1e-5
    assert torch.all(t.S > 0) and torch.all(t.U != 0) and torch.all(t.V != 0)


def test_orthogonality_penalty_is_zero_at_init_and_grows_when_factors_drift():
    layer = KindLinear(32, 32, 16, 4, [0, 1])
    assert layer.orthogonality_penalty(("0", "1")).item() < 1e-8
    with torch.no_grad():
        layer.tailors["1"].U.mul_(2)
    assert layer.orthogonality_penalty(("1",)).item() > 1
    assert layer.orthogonality_penalty(("0",)).item() < 1e-8  # group 1 is not in that batch


@pytest.mark.parametrize("rank,expected", [(0.5, 16), (8, 8), (0.125, 4), (32, 32)])
def test_rank_is_a_count_or_a_fraction(rank, expected):
    assert resolve_rank(rank, 32, 48) == expected


def test_rank_larger_than_the_matrix_is_refused():
    with pytest.raises(ValueError, match="at most 32"):
        KindLinear(32, 48, 40, 2, [0])


def test_grouped_linear_gradients_match_finite_differences():
    torch.manual_seed(5)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: grouped_linear(x, w, b, (2, 0, 3)), (x, w, b))
