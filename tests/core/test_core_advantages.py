import pytest
import torch

from stapo.core import group_advantages, zero_variance_group_fraction


def ref_advantages(rewards, g, scale, eps=1e-6):
    """float64 re-computation, written independently of the implementation."""
    r = [float(x) for x in rewards]
    out = []
    allstd = torch.tensor(r, dtype=torch.float64).std().item() if len(r) > 1 else 0.0
    for k in range(0, len(r), g):
        grp = r[k : k + g]
        mean = sum(grp) / g
        var = sum((x - mean) ** 2 for x in grp) / (g - 1)
        std = var**0.5
        for x in grp:
            if max(grp) == min(grp):
                out.append(0.0)
            elif scale == "group":
                out.append((x - mean) / (std + eps))
            elif scale == "batch":
                out.append((x - mean) / (allstd + eps))
            else:
                out.append(x - mean)
    return torch.tensor(out, dtype=torch.float64)


def test_hand_worked_group():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> +-0.866025
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    expected = torch.tensor([0.8660254, -0.8660254, -0.8660254, 0.8660254])
    torch.testing.assert_close(adv, expected, atol=2e-6, rtol=0)


def test_hand_worked_none_and_batch():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(
        group_advantages(r, 4, scale="none"), torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75])
    )
    # batch std of 4 ones and 4 zeros (unbiased): sqrt(8 * 0.25 / 7) = 0.534522
    torch.testing.assert_close(
        group_advantages(r, 4, scale="batch"),
        torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75]) / (0.5345225 + 1e-6),
    )


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
@pytest.mark.parametrize("g", [2, 4, 8])
def test_against_float64_reference(scale, g):
    gen = torch.Generator().manual_seed(g)
    rewards = torch.randint(0, 3, (g * 6,), generator=gen).float() * 0.5
    got = group_advantages(rewards, g, scale=scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_advantages(rewards, g, scale), atol=1e-5, rtol=1e-5)


def test_zero_variance_group_is_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 1.0, 0.0])
    for scale in ("group", "none", "batch"):
        adv = group_advantages(r, 4, scale=scale)
        assert torch.equal(adv[:8], torch.zeros(8))
        assert adv[8:].abs().min() > 0
    assert zero_variance_group_fraction(r, 4) == pytest.approx(2 / 3)


def test_half_precision_computed_in_float32():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.bfloat16)
    adv = group_advantages(r, 4)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, group_advantages(r.float(), 4))


@pytest.mark.parametrize(
    "rewards, g, match",
    [
        (torch.zeros(6), 4, "does not divide"),
        (torch.zeros(6), 1, "group_size must be >= 2"),
        (torch.zeros(4), 2.0, "group_size must be an int"),
        (torch.zeros(2, 2), 2, "rewards must be 1-D"),
        (torch.tensor([1.0, float("nan")]), 2, "rewards contains non-finite"),
        (torch.tensor([1, 0]), 2, "rewards must be a floating-point"),
        ([1.0, 0.0], 2, "rewards must be a torch.Tensor"),
    ],
)
def test_errors_name_the_argument(rewards, g, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, g)


def test_unknown_scale():
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(4), 2, scale="std")


def test_empty_batch():
    assert group_advantages(torch.zeros(0), 4).numel() == 0
