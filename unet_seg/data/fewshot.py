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

The synthetic episodes hold two objects of two classes of the split in every image, the query's
painted in random order: only the supports say which of the two is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

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
