"""Encode once, sample every step: the VAE posteriors of a training set that is never augmented.

Where every training image reaches the VAE unchanged (no random crop, flip or colour jitter),
its posterior N(μ, σ²) is fixed: encode it once, store μ and σ, and draw z = μ + σ·ε with a
fresh ε each step. That is the distribution of `vae.encode(img, sample=True)`, and the same
numbers under the same ε: `encode` draws with the same `sample_latent`.

    cache = build_latent_cache("cache/", vae, keys, load, size=(512, 512))   # encodes what is missing
    z = sample_latent(cache.get("image/000009"))          # [2, 4, 64, 64] (μ, σ) -> z [4, 64, 64]

On disk: `shard_NNNN.safetensors` files in the cache folder, each {key: [2, C, h, w]} in the
VAE's dtype, with the sha256 of the VAE's weights and the image size in its metadata; key k lives
in shard sha256(k) mod `shards`. A shard is written atomically (temp + rename) by one rank
(shard i by rank i mod world), so that several processes build one cache without locks, and an
interrupted build goes on where it stopped. A cache of other VAE weights (or dtype), of another
image size, or with a corrupt shard is refused (`LatentCacheError`): nothing is written over
files that another run may need. The cache trusts that the files behind its keys do not change.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .files import atomic_path
from .hub import weights_fingerprint
from .models.vae import sample_latent
from .train.distributed import barrier, print0, rank_and_world
from .train.report import progress

__all__ = ["LatentCache", "LatentCacheError", "build_latent_cache", "open_latent_cache", "sample_latent"]

FORMAT = "unet_seg.latent_cache/1"
SHARD_GLOB = "shard_*.safetensors"


class LatentCacheError(ValueError):
    """A latent cache that this run cannot use: built by another VAE, at another size, or corrupt."""


def shard_of(key: str, shards: int) -> int:
    """The shard that holds `key`: sha256(key) mod `shards` (the same on every rank and run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % shards


class LatentCache:
    """Read side: `cache.get(key)` -> posterior [2, C, h, w] (μ, σ), memory-mapped from its shard.
    Picklable for DataLoader workers (each process opens the shards it reads)."""

    def __init__(self, directory: Path, index: dict[str, Path]):
        self.directory, self.index = directory, index
        self._open: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> Tensor:
        if key not in self.index:
            raise KeyError(f"{key!r} is not in the latent cache {self.directory}")
        path = self.index[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[path].get_tensor(key)

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "index": self.index, "_open": {}}


def _metadata(vae: nn.Module, size: tuple[int, int], shards: int) -> dict[str, str]:
    """What every shard of this cache records: the VAE's weights (`hub.weights_fingerprint`), the size, the shard count."""
    fingerprint = weights_fingerprint(vae.state_dict(), type(vae).__name__)
    return {"format": FORMAT, "vae_sha256": fingerprint, "image_size": f"{size[0]}x{size[1]}", "shards": str(shards)}


def _read_shards(directory: Path, expected: dict[str, str]) -> dict[Path, list[str]]:
    """Every shard in `directory` -> its keys, each shard checked against `expected` metadata."""
    found = {}
    for path in sorted(directory.glob(SHARD_GLOB)):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise LatentCacheError(f"{path}: corrupt or truncated latent cache shard ({e}); delete it to encode its entries again") from e
        if meta.get("format") != FORMAT:
            raise LatentCacheError(f"{path}: not a unet_seg latent cache shard (format {meta.get('format')!r}); give another cache folder")
        for field, what in (("vae_sha256", "VAE weights sha256"), ("image_size", "image size"), ("shards", "shard count")):
            if meta.get(field) != expected[field]:
                raise LatentCacheError(
                    f"{path}: the latent cache was built with {what} {meta.get(field)}, this run has {expected[field]}; "
                    f"give another cache folder, or delete {directory} to rebuild it"
                )
        found[path] = keys
    return found


def open_latent_cache(directory: Union[str, Path], vae: nn.Module, size: tuple[int, int], shards: int = 256,
                      keys: Iterable[str] = ()) -> LatentCache:  # fmt: skip
    """The cache in `directory` for this `vae` at image `size` (H, W), every shard checked
    (`LatentCacheError` if built otherwise or corrupt); `keys` must all be in it."""
    return _open(Path(directory), _metadata(vae, size, shards), keys)


def _open(directory: Path, meta: dict[str, str], keys: Iterable[str]) -> LatentCache:
    index = {}
    for path, names in _read_shards(directory, meta).items():
        index.update(dict.fromkeys(names, path))
    missing = [k for k in keys if k not in index]
    if missing:
        raise LatentCacheError(f"{directory}: {len(missing)} posterior(s) missing from the latent cache, e.g. {missing[:3]}")
    return LatentCache(directory, index)


class _Images(Dataset):
    def __init__(self, keys: list[str], load: Callable[[str], Tensor]):
        self.keys, self.load = keys, load

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Tensor:
        return self.load(self.keys[i])


@torch.no_grad()
def build_latent_cache(
    directory: Union[str, Path],
    vae: nn.Module,
    keys: Iterable[str],
    load: Callable[[str], Tensor],
    *,
    size: tuple[int, int],
    batch_size: int = 16,
    num_workers: int = 0,
    shards: int = 256,
    desc: str = "encoding VAE posteriors once",
) -> LatentCache:
    """Encode the posteriors of `keys` that `directory` does not hold yet and return the cache.

    load(key) -> image [3, H, W] in [-1, 1], H, W = `size` (in DataLoader workers when
    `num_workers`); `vae.posterior` encodes them on the VAE's device. Call it on every rank:
    each encodes and writes its own shards (shard i on rank i mod world), then all wait for
    all. Existing shards are checked first (`open_latent_cache`'s errors); a shard that gains
    entries is rewritten whole, atomically. A non-finite posterior raises, naming its keys."""
    directory, keys = Path(directory), sorted(set(keys))
    meta = _metadata(vae, size, shards)  # the VAE hashed once per call
    held = {k for names in _read_shards(directory, meta).values() for k in names}
    rank, world = rank_and_world()
    missing = [k for k in keys if k not in held]
    todo = sorted((shard_of(k, shards), k) for k in missing if shard_of(k, shards) % world == rank)
    if missing:
        print0(f"latent cache {directory}: encoding {len(missing)} of {len(keys)} posteriors (once; later runs read them)")
    device = next(vae.parameters()).device
    loader = DataLoader(_Images([k for _, k in todo], load), batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator())  # leaves the global RNG (the run's noise) alone
    bar, done, pending = progress(total=len(todo), desc=desc), 0, defaultdict(dict)
    for images in loader:
        batch = todo[done : done + len(images)]
        if images.shape[1:] != (3, *size):
            raise ValueError(f"load({batch[0][1]!r}) gave an image {tuple(images.shape[1:])}, the cache holds (3, {size[0]}, {size[1]})")
        post = vae.posterior(images.to(device)).cpu()
        bad = [k for (_, k), ok in zip(batch, post.flatten(1).isfinite().all(1).tolist()) if not ok]
        if bad:
            raise FloatingPointError(f"the VAE's posterior of {bad[:3]} is not finite: nothing of them was cached")
        for (shard, key), p in zip(batch, post):
            pending[shard][key] = p.clone()
        done += len(batch)
        for shard in [s for s in pending if done == len(todo) or s < todo[done][0]]:  # shards with nothing left to encode
            _write_shard(directory / f"shard_{shard:04d}.safetensors", pending.pop(shard), meta)
        bar.update(len(batch))
    bar.close()
    barrier()
    return _open(directory, meta, keys)


def _write_shard(path: Path, new: dict[str, Tensor], meta: dict[str, str]) -> None:
    """`new` entries added to the shard at `path` (created if absent), written atomically."""
    tensors = {}
    if path.is_file():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    with atomic_path(path) as tmp:
        save_file({**tensors, **new}, str(tmp), metadata=meta)
