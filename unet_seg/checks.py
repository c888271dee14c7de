"""Argument checks that several modules make, written once so that each mistake reads the same
everywhere. Torch-free: they read `.shape` and `.dtype` only."""

from __future__ import annotations

from typing import Any, Sequence


def describe(x: Any) -> str:
    """What a wrong argument was, for an error message: `Tensor shape=(2, 3) dtype=torch.float32`
    (tensors and arrays), else its type's name."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} shape={tuple(x.shape)} dtype={x.dtype}"
    return type(x).__name__


def check_same_shape(a: Any, b: Any, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_images(x: Any, name: str) -> None:
    """A batch of RGB images [B, 3, H, W], floating point (values are not read)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be [B, 3, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def check_multiple_of_8(size: Sequence[int], name: str) -> None:
    """(height, width) of an image, mask or crop that SD's VAE takes: each a positive multiple of 8."""
    if len(size) != 2:
        raise ValueError(f"{name} must be (height, width), got {tuple(size)}")
    bad = [n for n in size if n < 8 or n % 8]
    if bad:
        raise ValueError(
            f"{name} {tuple(size)}: height and width must be multiples of 8 (the VAE downscale); "
            f"{bad[0]} is not a positive multiple of 8"
        )
