"""Few-shot episodes of one fold, synthetic (`--demo`) or COCO-20i, in one class convention.

    task = fewshot_episodes(fold=0, root=None, size=64, test_episodes=200, seed=0)     # synthetic
    task = fewshot_episodes(fold=0, root="/data/COCO2014", size=512)                   # COCO-20i
    task.train                # episodes of the fold's training classes (`train_shots` supports)
    task.test[1], task.test[5]  # 1- and 5-shot episodes of its held-out classes
    task.control              # synthetic only: 1-shot test episodes whose supports show the query's
                              # *other* class (`FewShotEpisodes(supports_of="distractor")`); else None
    task.class_names[label]   # "background" for 0;  task.test_labels: the held-out labels

Every episode's "class_id" is a label: 0 is background, classes count from 1 (synthetic 1..20,
COCO-20i 1..80), so that `mask * class_id` is a label map that `metrics.confusion_matrix` and
`metrics.few_shot_scores` read for either source. Episode keys: see `synthetic.FewShotEpisodes`.

    cached = cached_episodes(task.train, vae, "cache/")   # COCO-20i: the same episodes as VAE posteriors

The synthetic episodes hold two objects of two classes of the split in every image, the query's
painted in random order: only the supports say which of the two is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from . import synthetic

TRAIN_EPISODES = 100_000  # synthetic: a length no demo run exhausts


@dataclass(frozen=True)
class FewShotTask:
    train: Dataset
    test: dict[int, Dataset]
    control: Optional[Dataset]
    class_names: tuple[str, ...]
    test_labels: tuple[int, ...]

    @property
    def num_labels(self) -> int:
        """Labels including background: the size of the confusion matrices."""
        return len(self.class_names)


def fewshot_episodes(
    fold: int,
    root: Union[str, Path, None] = None,
    *,
    size: int,
    train_shots: int = 1,
    test_shots: Sequence[int] = (1, 5),
    test_episodes: Optional[int] = None,
    seed: int = 0,
) -> FewShotTask:
    """The episodes of `fold` (0..3): COCO-20i under `root` (HSNet's layout, `coco20i.COCO20i`;
    test episodes drawn with HSNet's seed 0, `test_episodes` default 1000), or the synthetic
    ones when `root` is None (`synthetic.FewShotEpisodes`, seeds `seed` for training and
    `seed + 1` for the tests and the control, `test_episodes` default 200). `size`: image side."""
    if root is None:
        train_classes, test_classes = synthetic.fold_split(fold)
        n = test_episodes or 200
        kw = dict(size=size, random_order=True)  # two classes per image: the support's is the target
        return FewShotTask(
            train=synthetic.FewShotEpisodes(seed, TRAIN_EPISODES, train_classes, shots=train_shots, **kw),
            test={k: synthetic.FewShotEpisodes(seed + 1, n, test_classes, shots=k, **kw) for k in test_shots},
            control=synthetic.FewShotEpisodes(seed + 1, n, test_classes, shots=1, supports_of="distractor", **kw),
            class_names=synthetic.CLASS_NAMES,
            test_labels=test_classes,
        )
    from .coco20i import COCO20I_LABELS, COCO20i, fold_classes

    return FewShotTask(
        train=COCO20i(root, fold, "train", shots=train_shots, size=size, seed=seed),
        test={k: COCO20i(root, fold, "val", shots=k, size=size, episodes=test_episodes) for k in test_shots},
        control=None,
        class_names=COCO20I_LABELS,
        test_labels=tuple(c + 1 for c in fold_classes(fold)),
    )


class CachedEpisodes(Dataset):
    """COCO-20i episodes as VAE posteriors: item i is the episode `episodes[i]` (the same draws,
    `COCO20i.episode_ids`) with every image and mask replaced by its posterior [2, 4, h, w]
    (μ, σ: `latent_cache.sample_latent` draws the latent) from `cache`, read, not encoded:
    {"query", "query_mask": [2, 4, h, w], "supports", "support_masks": [K, 2, 4, h, w], "class_id"}."""

    def __init__(self, episodes, cache):
        self.episodes, self.cache = episodes, cache

    def __len__(self) -> int:
        return len(self.episodes)

    def set_epoch(self, epoch: int) -> None:
        self.episodes.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        class_id, query, supports = self.episodes.episode_ids(index)
        get = self.cache.get
        return {
            "query": get(image_key(query)),
            "query_mask": get(mask_key(query, class_id)),
            "supports": torch.stack([get(image_key(s)) for s in supports]),
            "support_masks": torch.stack([get(mask_key(s, class_id)) for s in supports]),
            "class_id": torch.tensor(class_id + 1),
        }


def image_key(stem: str) -> str:
    return f"image/{stem}"


def mask_key(stem: str, class_id: int) -> str:
    """The key of the mask of class `class_id` (0..79) in image `stem`: "mask/<stem>/<label 1..80>"."""
    return f"mask/{stem}/{class_id + 1}"


def cached_episodes(episodes, vae, directory: Union[str, Path], **kwargs) -> CachedEpisodes:
    """`episodes` (a `coco20i.COCO20i`) over posteriors in the latent cache `directory`, encoding
    (`latent_cache.build_latent_cache`, `kwargs` to it; every rank calls this) the posteriors of
    every image and every (image, class) mask that its episodes can draw, once: white-on-black
    mask images (`codecs.mask_to_image`, ignore pixels as background), as the uncached step."""
    from ..latent_cache import build_latent_cache

    keys = [k for c, stems in episodes.class_images.items() for s in stems for k in (image_key(s), mask_key(s, c))]
    size = (episodes.size, episodes.size)
    return CachedEpisodes(episodes, build_latent_cache(directory, vae, keys, _Render(episodes), size=size, **kwargs))


class _Render:
    """key -> the image the uncached step encodes: "image/<stem>" the image, "mask/<stem>/<label>"
    the white-on-black mask image (a picklable callable for DataLoader workers)."""

    def __init__(self, episodes):
        self.episodes = episodes

    def __call__(self, key: str):
        from ..codecs import mask_to_image

        kind, stem, *label = key.split("/")
        if kind == "image":
            return self.episodes.image(stem)
        return mask_to_image(self.episodes.mask(stem, int(label[0]) - 1)[None])[0]
