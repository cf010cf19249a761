"""Group-relative advantages (GRPO, Dr.GRPO, batch-scaled)."""

from __future__ import annotations

import torch

from stapo.core._checks import check_finite, check_float

ADVANTAGE_SCALES = ("group", "none", "batch")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """Outcome advantages broadcast later to every token of a response.

    `rewards` is [B] with B = prompts x group_size; each consecutive block of `group_size` entries is
    one prompt's group. With r̄_g and s_g the group mean and unbiased std:

        scale="group":  A_i = (r_i - r̄_g) / (s_g + eps)          (GRPO)
        scale="none":   A_i =  r_i - r̄_g                          (Dr.GRPO)
        scale="batch":  A_i = (r_i - r̄_g) / (s_batch + eps)      (s_batch: unbiased std of all rewards)

    A group whose rewards are all equal gets advantage exactly 0 (no float round-off residue).
    Computed in float32 (float64 inputs stay float64).
    """
    r = check_float("rewards", rewards, ndim=1)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a baseline), got {group_size}")
    if r.shape[0] % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards B={r.shape[0]}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    check_finite("rewards", r)
    if r.dtype != torch.float64:
        r = r.float()
    if r.numel() == 0:
        return r.clone()

    groups = r.view(-1, group_size)
    flat = groups.max(dim=1, keepdim=True).values == groups.min(dim=1, keepdim=True).values
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        batch_std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
        adv = centred / (batch_std + eps)
    else:
        adv = centred
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def zero_variance_group_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    groups = check_float("rewards", rewards, ndim=1).reshape(-1, group_size)
    if groups.shape[0] == 0:
        return 0.0
    flat = groups.max(dim=1).values == groups.min(dim=1).values
    return float(flat.float().mean())
