"""Shared test utilities: random weights, error measures, hub layouts written by hand."""

import math
from pathlib import Path

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter: diffusers zero-initialises some convs, which hides bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40) -> None:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dst = repo / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
