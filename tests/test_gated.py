"""The class-gated SVD layer and its tailor bank: docs/KIND.md invariants 1 (forward isolation) and
4 (merge exactness), one row per layer configuration, through both routes (blocked: per-group folded
weights or gathered factors, chosen from the shapes; static: per-sample gathered factors)."""

import pytest
import torch

from kind.core.flops import count_flops
from kind.core.gated import (
    KindLinear,
    Linear,
    TailorBank,
    _Fold,
    fold,
    grouped_linear,
    linears,
    make_route,
    resolve_rank,
)

# (in, out, rank_learngene, rank_tailor, groups, tokens): small ranks and few tokens take the
# gathered path, large ranks and many tokens fold each group into its own dense weight.
CASES = [
    (32, 48, 0.5, 4, [0, 1, 2], 16),
    (64, 64, 60, 4, [0, 1, 2, 3], 1),
    (48, 32, 4, 2, [0, 1], 8),
    (24, 96, 0.25, 0.125, [0, 3, 7], 32),
]


def _layer(fin, fout, rg, rt, groups):
    """A layer with its own bank, every tailor's singular values pushed away from the tiny
    initial value so tailors matter."""
    layer = KindLinear(fin, fout, rg, rt)
    bank = TailorBank([layer], groups)
    bank.reset([layer])
    with torch.no_grad():
        layer.unpack(bank.rows)[1].normal_()
    return layer, bank


def _run(layer, bank, x, groups_of_samples, blocked=True):
    """The layer's output for samples of the given groups (-1: none), in the input order."""
    rows = torch.tensor([-1 if g < 0 else bank.groups.index(g) for g in groups_of_samples])
    return layer(x, bank.attach(make_route(rows, blocked=blocked)))


@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("fin,fout,rg,rt,groups,tokens", CASES)
def test_output_of_a_sample_ignores_other_groups_tailors(
    fin, fout, rg, rt, groups, tokens, blocked
):
    torch.manual_seed(0)
    layer, bank = _layer(fin, fout, rg, rt, groups)
    g = [groups[i % len(groups)] for i in range(7)] + [-1]  # last: null class
    x = torch.randn(len(g), tokens, fin)
    before = _run(layer, bank, x, g, blocked)
    with torch.no_grad():
        row = bank.rows[0]
        row.add_(torch.randn_like(row))
    after = _run(layer, bank, x, g, blocked)
    untouched = torch.tensor(g) != groups[0]
    assert torch.equal(before[untouched], after[untouched])  # bit for bit
    assert not torch.allclose(before[~untouched], after[~untouched])
    with torch.no_grad():  # a diverged tailor: the null sample may read its row, never use it
        row.fill_(float("inf"))
    assert torch.equal(before[untouched], _run(layer, bank, x, g, blocked)[untouched])


@pytest.mark.parametrize("fin,fout,rg,rt,groups,tokens", CASES)
def test_blocked_and_static_routes_agree(fin, fout, rg, rt, groups, tokens):
    """Outputs and every gradient: the input's, the learngene's and the bank rows'."""
    torch.manual_seed(6)
    layer, bank = _layer(fin, fout, rg, rt, groups)
    g = [groups[-1], -1, groups[0], groups[-1], groups[0]]
    x = torch.randn(len(g), tokens, fin, requires_grad=True)
    gy = torch.randn(len(g), tokens, fout)
    params = [x, layer.U, layer.S, layer.V, layer.bias, bank.rows]
    results = []
    for blocked in (True, False):
        y = _run(layer, bank, x, g, blocked=blocked)
        y.backward(gy)
        results.append([y.detach()] + [p.grad.to_dense() for p in params])
        for p in params:
            p.grad = None
    names = ["y", "x", "U", "S", "V", "bias", "bank rows"]
    for name, got, want in zip(names, *results, strict=True):
        # relative to the tensor's norm: a gradient sums many products, so an element near zero
        # can differ by fp32 rounding of its larger terms (~1e-5 absolute on an Intel Xeon)
        err = ((got - want).norm() / want.norm()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.1e}"


def test_thin_products_gradients():
    """The fold's own backward (a's gradient as the transposed product) against finite
    differences, with and without a gradient for the learngene weights (a frozen learngene)."""
    torch.manual_seed(7)
    w = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)  # [L, out, in]
    a = torch.randn(3, 2, 6, 2, dtype=torch.float64, requires_grad=True)  # [n, L, out, r]
    b = torch.randn(3, 2, 2, 5, dtype=torch.float64, requires_grad=True)  # [n, L, r, in]
    assert torch.autograd.gradcheck(_Fold.apply, (w, a, b))
    assert torch.autograd.gradcheck(_Fold.apply, (w.detach(), a, b))


def _model_layers():
    """Gated layers of three shapes plus one that does not fold these rows, with their bank (every
    tailor pushed away from zero) and a blocked route of two groups and a null sample."""
    torch.manual_seed(3)
    shapes = [(16, 32, 8), (32, 16, 8), (16, 32, 8), (16, 32, 4), (16, 32, 8), (64, 64, 8)]
    layers = [KindLinear(fin, fout, rg, 2) for fin, fout, rg in shapes]
    bank = TailorBank(layers, [0, 1, 2])
    bank.reset(layers)
    with torch.no_grad():
        bank.rows.normal_()
    rows = 40  # 2 groups fold a 16x32 layer (2·16·32 ≤ 40·32), not a 64x64 one
    return layers, bank, make_route(torch.tensor([0, 2, 2, -1, 0])), rows


def _folded(layers, bank, route, rows, together: bool) -> list[torch.Tensor]:
    """The folded weights of the layers that fold, then the gradients of a loss on them: the bank
    rows' and every folding layer's U, S and V."""
    attached = bank.attach(route)
    ws = (
        fold(layers, attached, rows) if together else [fold([m], attached, rows)[0] for m in layers]
    )
    assert ws[-1] is None and all(w is not None for w in ws[:-1])
    sum(w.float().square().sum() * i for i, w in enumerate(ws[:-1], 1)).backward()
    params = [bank.rows] + [p for m in layers[:-1] for p in (m.U, m.S, m.V)]
    grads = [p.grad.to_dense() for p in params]
    for p in params:
        p.grad = None
    return [w.detach() for w in ws[:-1]] + grads


def test_layers_of_one_shape_fold_together_as_each_alone():
    """`fold` over the layers of a model (one batched product a shape) gives each layer the
    weights, and its factors and bank rows the gradients, of folding it alone; layers that do not
    fold these rows get None."""
    layers, bank, route, rows = _model_layers()
    together, alone = (_folded(layers, bank, route, rows, t) for t in (True, False))
    for got, want in zip(together, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fold_under_bf16_autocast():
    """Under autocast the folded weights come out in the GEMMs' dtype (bf16 on a CPU), folded
    together or alone, forward and backward, within bf16 rounding of fp32's."""
    layers, bank, route, rows = _model_layers()
    want = _folded(layers, bank, route, rows, together=False)
    for together in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _folded(layers, bank, route, rows, together)
        assert all(w.dtype == torch.bfloat16 for w in got[: len(layers) - 1])
        for g, w in zip(got, want, strict=True):
            assert ((g.float() - w).norm() / w.norm()).item() < 2e-2


@pytest.mark.parametrize("fin,fout,rg,rt,groups,tokens", CASES)
def test_merge_matches_the_factored_layer(fin, fout, rg, rt, groups, tokens):
    torch.manual_seed(1)
    layer, bank = _layer(fin, fout, rg, rt, groups)
    x = torch.randn(5, tokens, fin)
    for group in [*groups, None]:
        ref = _run(layer, bank, x, [-1 if group is None else group] * 5)
        merged = layer.merge(None if group is None else bank.chunk(layer, group))
        assert isinstance(merged, torch.nn.Linear)
        err = (merged(x) - ref).norm() / ref.norm()
        assert err <= 1e-5, f"group {group}: relative error {err}"


def test_null_class_uses_the_learngene_only():
    torch.manual_seed(2)
    layer, bank = _layer(32, 32, 16, 4, [0, 1])
    x = torch.randn(4, 3, 32)
    out = _run(layer, bank, x, [-1] * 4)
    assert torch.allclose(out, layer.merge(None)(x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(out, layer(x, None), rtol=0, atol=0)


def test_mixed_batch_in_any_order_gives_each_sample_its_own_output():
    torch.manual_seed(3)
    layer, bank = _layer(32, 40, 12, 4, [0, 1, 2])
    g = [2, 0, -1, 1, 0, 2]
    route = make_route(torch.tensor(g))
    assert route.order is not None and route.sizes == (2, 1, 2, 1)
    x = torch.randn(6, 5, 32)
    out = _run(layer, bank, x, g)
    for j in range(len(g)):
        single = _run(layer, bank, x[j : j + 1], g[j : j + 1])
        torch.testing.assert_close(out[j : j + 1], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocked", [True, False])
def test_absent_groups_get_a_zero_gradient(blocked):
    layer, bank = _layer(16, 16, 8, 2, [0, 1, 2])
    x = torch.randn(3, 4, 16)
    _run(layer, bank, x, [0, 0, -1], blocked).sum().backward()
    assert bank.rows.grad.is_sparse  # the gathered rows only: no [G, N] of zeros
    grad = bank.rows.grad.to_dense()
    assert grad[0].abs().sum() > 0
    assert torch.all(grad[1:] == 0)


def test_one_bank_tensor_however_many_groups():
    layers = [KindLinear(16, 16, 8, 2) for _ in range(3)]
    bank = TailorBank(layers, list(range(611)))
    assert bank.rows.shape == (611, 3 * 2 * (16 + 1 + 16))
    assert [layer.bank_slot for layer in layers] == [0, 1, 2]
    assert len(list(bank.parameters())) == 1


def test_initialisation_is_an_svd_and_tailors_start_orthogonal_to_the_learngene():
    torch.manual_seed(4)
    layer = KindLinear(64, 48, 0.5, 4)
    bank = TailorBank([layer], [0, 1])
    bank.reset([layer])
    assert layer.orthogonality_error(bank.rows) < 1e-6
    assert torch.all(layer.S[:-1] >= layer.S[1:])  # leading singular values, in order
    U, S, V = (f[0] for f in layer.unpack(bank.rows))
    assert (layer.U.T @ U).abs().max() < 1e-5 and (layer.V.T @ V).abs().max() < 1e-5
    assert torch.all(S > 0) and torch.all(U != 0) and torch.all(V != 0)


def test_orthogonality_penalty_is_zero_at_init_and_grows_when_factors_drift():
    layer = KindLinear(32, 32, 16, 4)
    bank = TailorBank([layer], [0, 1])
    bank.reset([layer])
    assert layer.orthogonality_penalty(bank.rows).item() < 1e-8
    with torch.no_grad():
        layer.unpack(bank.rows)[0][1].mul_(2)
    assert layer.orthogonality_penalty(bank.rows[1:]).item() > 1
    assert layer.orthogonality_penalty(bank.rows[:1]).item() < 1e-8  # group 1 is not in it


@pytest.mark.parametrize("rank,expected", [(0.5, 16), (8, 8), (0.125, 4), (32, 32)])
def test_rank_is_a_count_or_a_fraction(rank, expected):
    assert resolve_rank(rank, 32, 48) == expected


def test_rank_larger_than_the_matrix_is_refused():
    with pytest.raises(ValueError, match="at most 32"):
        KindLinear(32, 48, 40, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_equals_each_block_through_its_own_weight(dtype):
    """The grouped GEMM (fp32: torch's grouped_mm; float64, which it lacks: the block loop) gives
    each block of samples, an empty one included, its own weight's output and gradients."""
    torch.manual_seed(5)
    x = torch.randn(5, 3, 4, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 8, 4, dtype=dtype, requires_grad=True)
    b = torch.randn(8, dtype=dtype, requires_grad=True)
    route = make_route(torch.tensor([0, 0, 1, 1, 1]))  # blocks of 2, 3 and 0 samples (no null)
    assert route.sizes == (2, 3, 0) and route.offsets.tolist() == [2, 5, 5]
    w_of = torch.tensor([0, 0, 1, 1, 1])
    gy = torch.randn(5, 3, 8, dtype=dtype)
    grads = []
    for fn in (
        lambda: grouped_linear(x, w, b, route),
        lambda: torch.einsum("btk,bok->bto", x, w[w_of]) + b,
    ):
        with count_flops() as counter:
            y = fn()
            y.backward(gy)
        assert counter.get_total_flops() == 3 * 2 * 15 * 4 * 8  # y, grad x, grad w: 15 rows
        grads.append([y.detach()] + [p.grad.clone() for p in (x, w, b)])
        x.grad = w.grad = b.grad = None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    grouped_linear(x, w, b, route).sum().backward()  # a gradient of stride 0 (all ones)
    torch.testing.assert_close(w.grad[0], (x[:2].sum((0, 1)))[None].expand(8, -1))
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x, w, b: grouped_linear(x, w, b, route), (x, w, b))


# 16 tokens: the layers fold (one grouped GEMM); 12: their learngenes materialise (one GEMM, the
# tailors apart); 1: the learngenes run factored (one by one)
@pytest.mark.parametrize("tokens", [16, 12, 1])
@pytest.mark.parametrize("route", ["blocked", "static", "none"])
def test_layers_run_together_give_each_layers_own_output_and_gradients(tokens, route):
    """Attention's q, k and v through `linears` (their weights stacked, one GEMM) equal the three
    layers called one by one, outputs and gradients, for KIND layers and dense ones."""
    torch.manual_seed(3)
    kind = [KindLinear(32, 32, 16, 4) for _ in range(3)]
    bank = TailorBank(kind, [0, 1, 2])
    bank.reset(kind)
    with torch.no_grad():
        bank.rows.mul_(3)  # tailors that matter
    slots = torch.tensor([0, 0, 1, 2, 2, -1])  # already in block order
    dense = [Linear(32, 32) for _ in range(3)]
    x = torch.randn(6, tokens, 32)
    assert kind[0].folds(3, x.numel() // 32) == (tokens == 16)
    assert kind[0].materialises(x.numel() // 32) == (tokens >= 12)
    for layers, params in (
        (kind, [bank.rows, *kind[1].parameters()]),
        (dense, dense[2].parameters()),
    ):
        params = list(params)
        outs = {}
        for how in ("together", "apart"):
            r = None if route == "none" else bank.attach(make_route(slots, route == "blocked"))
            ys = linears(tuple(layers), x, r) if how == "together" else [m(x, r) for m in layers]
            sum((y * torch.randn_like(y, generator=torch.Generator().manual_seed(i))).sum()
                for i, y in enumerate(ys)).backward()  # fmt: skip
            grads = [p.grad.to_dense().clone() for p in params if p.grad is not None]
            for p in params:
                p.grad = None
            outs[how] = (ys, grads)
        assert len(outs["together"][1]) == len(params) - (route == "none" and layers is kind)
        for a, b in zip(*(outs[h][0] + outs[h][1] for h in ("together", "apart")), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
