"""stapo.core._kernels: the NumPy (CPU) path gives exactly what the plain PyTorch path gives, and
the S2T mask / STAPO loss are the same through either path."""

import functools
import math

import pytest
import torch

from stapo.core import _kernels as K
from stapo.core import masks
from stapo.core import s2t_mask, stapo_loss
from stapo.core.masks import s2t_mask_with_counts


@pytest.fixture
def torch_path(monkeypatch):
    """Force the plain PyTorch ops (the path every non-CPU device takes)."""
    monkeypatch.setattr(K, "_as_numpy", lambda x: None)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(7, 33, generator=g) * 3).to(dtype)
    x[0, :5] = 0.5  # exactly at the threshold used below
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [0.5, -1.2345678901234, torch.tensor(0.25), torch.tensor(0.1, dtype=torch.float64)])
def test_comparisons_match_torch(dtype, value):
    x = _inputs(dtype)
    for view in (x, x.t(), x[:, ::2], x[:, :1].expand(7, 33)):
        assert torch.equal(K.less(view, value), view < value)
        assert torch.equal(K.greater(view, value), view > value)
        assert torch.equal(K.greater_equal(view, value), view >= value)


def test_comparison_in_the_tensors_dtype():
    # log(0.01) rounds differently in float32 and float64: compare like `x < c` does (in x's dtype)
    c = math.log(0.01)
    x32 = torch.tensor([c], dtype=torch.float32)
    x64 = torch.tensor([c], dtype=torch.float64)
    assert torch.equal(K.less(x32, c), x32 < c)
    assert torch.equal(K.less(x64, c), x64 < c)
    assert not bool(K.less(x64, c))


def test_boolean_helpers_match_torch():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(5, 9, generator=g) < 0.5
    b = torch.rand(5, 9, generator=g) < 0.5
    row = torch.rand(5, 1, generator=g) < 0.5
    assert torch.equal(K.both(a, b), a & b)
    assert torch.equal(K.both(a, b, row), a & b & row)
    assert torch.equal(K.and_not(a, b), a & ~b)
    assert float(K.count(a)) == int(a.sum()) and K.count(a).dtype == torch.float32
    assert K.any_true(a) and not K.any_true(torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite(dtype):
    x = torch.rand(4, 6).to(dtype)
    where = torch.ones(4, 6, dtype=torch.bool)
    where[:, 4:] = False
    assert K.all_finite(x) and K.all_finite(x, where)
    big = torch.full((4, 6), 1e30, dtype=torch.float32).to(dtype)  # finite, but its square overflows
    assert K.all_finite(big) == bool(torch.isfinite(big).all())
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 5] = bad  # padding only
        assert not K.all_finite(y)
        assert K.all_finite(y, where)
        y[2, 0] = bad  # a valid position
        assert not K.all_finite(y, where)
        assert not K.all_finite(y.t(), where.t())  # non-contiguous


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau_h,q", [(None, 0.3), (None, 0.9), (1.0, 0.3)])
def test_s2t_and_stapo_loss_same_through_both_paths(seed, tau_h, q, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 40
    lp = -torch.rand(B, T, generator=g) * 8
    old = lp + 0.1 * torch.randn(B, T, generator=g)
    ent = torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    valid = torch.rand(B, T, generator=g) > 0.2
    ent[~valid] = float("nan")  # garbage padding must not matter on either path

    def run():
        parts = s2t_mask_with_counts(lp, ent, adv, valid, tau_p=0.05, tau_h=tau_h, tau_h_quantile=q)
        x = lp.clone().requires_grad_()
        loss, metrics = stapo_loss(x, old, adv, valid, ent, tau_p=0.05, tau_h=tau_h, tau_h_quantile=q)
        loss.backward()
        return parts, loss.detach(), x.grad, metrics

    fast = run()
    # what a GPU runs: PyTorch ops and the top-k quantile selection
    monkeypatch.setattr(K, "_as_numpy", lambda x: None)
    topk = functools.partial(masks.masked_quantile_and_count, select="topk")
    monkeypatch.setattr(masks, "masked_quantile_and_count", topk)
    plain = run()
    assert fast[0].spurious.dtype == plain[0].spurious.dtype == torch.bool
    assert int(fast[0].n_spurious) > 0  # the case exercises the mask
    for a, b in zip(fast[0], plain[0]):
        assert torch.equal(a, b)
    assert torch.equal(fast[1], plain[1]) and torch.equal(fast[2], plain[2])
    assert fast[3].keys() == plain[3].keys()
    for k in fast[3]:
        assert torch.equal(fast[3][k], plain[3][k]), k


def test_non_finite_entropy_on_valid_token_raises_on_both_paths(torch_path):
    lp = torch.full((1, 3), -5.0)
    ent = torch.tensor([[0.1, float("nan"), 0.1]])
    with pytest.raises(ValueError, match="entropy"):
        s2t_mask(lp, ent, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool), tau_h=0.5)


def test_tensors_numpy_cannot_view_take_the_torch_path():
    x = torch.tensor([[0.1, 0.9], [0.6, 0.2]])
    sparse = x.to_sparse()
    assert K._as_numpy(sparse) is None
    assert K._as_numpy(torch.nn.Parameter(x)) is not None

    class Sub(torch.Tensor):
        pass

    sub = x.as_subclass(Sub)
    assert K._as_numpy(sub) is None
    assert torch.equal(K.less(sub, 0.5).as_subclass(torch.Tensor), x < 0.5)
    # under torch.func.vmap the tensors are wrapped: the helpers still give the plain result
    out = torch.func.vmap(lambda row: K.less(row, 0.5))(x)
    assert torch.equal(out, x < 0.5)


@pytest.mark.parametrize("threshold", [None, 0.7, float("nan")])
def test_high_entropy_mask_same_through_both_paths(threshold, monkeypatch):
    from stapo.core import high_entropy_mask

    g = torch.Generator().manual_seed(5)
    ent = torch.rand(6, 30, generator=g) * 2
    valid = torch.rand(6, 30, generator=g) < 0.7
    fast = high_entropy_mask(ent, valid, 0.2, threshold=threshold)
    monkeypatch.setattr(K, "_as_numpy", lambda x: None)
    plain = high_entropy_mask(ent, valid, 0.2, threshold=threshold)
    assert torch.equal(fast, plain)
    if threshold is not None:
        assert torch.equal(fast, valid & (ent >= threshold))  # NaN keeps nothing
    else:
        assert 0 < int(fast.sum()) < int(valid.sum())
