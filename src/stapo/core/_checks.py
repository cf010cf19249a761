"""Argument checks shared by the core functions: one clear `ValueError` naming the argument."""

from __future__ import annotations

import torch


def as_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: object, ndim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """A floating tensor with finite values (checked on the valid positions by the caller if needed)."""
    x = as_tensor(name, x)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return x


def check_finite(name: str, x: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Raise if `x` has NaN/inf (only at positions where `where` is True, when given)."""
    bad = ~torch.isfinite(x)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def check_mask(name: str, mask: object, shape: torch.Size) -> torch.Tensor:
    """A bool or 0/1 mask of the given shape, returned as bool."""
    mask = as_tensor(name, mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be bool or contain only 0 and 1")
        return mask != 0
    raise ValueError(f"{name} must be a bool or 0/1 tensor, got dtype {mask.dtype}")


def check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def broadcast_advantages(advantages: object, shape: torch.Size) -> torch.Tensor:
    """Advantages given per sequence [B] or per token [B, T], returned as [B, T] (float32, or float64)."""
    adv = check_float("advantages", advantages, ndim=(1, 2))
    if adv.dim() == 1:
        if adv.shape[0] != shape[0]:
            raise ValueError(f"advantages [B] must have B={shape[0]} entries, got {adv.shape[0]}")
        adv = adv[:, None].expand(shape)
    elif tuple(adv.shape) != tuple(shape):
        raise ValueError(f"advantages [B, T] must have shape {tuple(shape)}, got {tuple(adv.shape)}")
    return adv if adv.dtype == torch.float64 else adv.float()


def check_prob(name: str, value: float, low_open: bool = False, high_open: bool = False) -> float:
    v = float(value)
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (lo_ok and hi_ok):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value}")
    return v
