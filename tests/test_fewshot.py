"""Few-shot episodes of a fold in one class convention, and their episodic evaluation."""

import pytest
import torch

from unet_seg.data.fewshot import fewshot_episodes
from unet_seg.data.synthetic import CLASS_NAMES, fold_split
from unet_seg.metrics import confusion_matrix, few_shot_scores
from unet_seg.segmentation import evaluate_episodes


def test_synthetic_task_labels_name_the_episode_class_and_the_control_shows_the_other_class():
    task = fewshot_episodes(1, size=32, train_shots=2, test_episodes=6, seed=3)
    train_classes, test_classes = fold_split(1)
    assert task.class_names == CLASS_NAMES and task.test_labels == test_classes and task.num_labels == 21
    assert task.train.shots == 2 and sorted(task.test) == [1, 5] and len(task.test[5]) == 6
    assert {int(task.train[i]["class_id"]) for i in range(15)} == set(train_classes)
    for i in range(6):
        ep, control = task.test[1][i], task.control[i]
        assert int(ep["class_id"]) in test_classes
        assert torch.equal(ep["query_mask"], control["query_mask"])  # the same query and target ...
        assert not torch.equal(ep["support_masks"], control["support_masks"])  # ... other supports
        assert torch.equal(ep["supports"][0], task.test[5][i]["supports"][0])  # k-shot extends 1-shot


def test_coco20i_task_reads_labels_one_based_like_the_synthetic_episodes(tmp_path):
    from .test_coco20i import write_fixture  # the COCO-20i layout, written small

    root = write_fixture(tmp_path)
    task = fewshot_episodes(0, root, size=32, test_shots=(1,), test_episodes=5)
    assert task.control is None and task.class_names[0] == "background" and task.num_labels == 81
    assert task.test_labels == tuple(range(1, 81, 4))
    for i in range(5):
        ep = task.test[1][i]
        assert int(ep["class_id"]) in task.test_labels and task.class_names[int(ep["class_id"])] != "background"


def episodes(n=6, size=16):
    """Tiny hand-made episodes: class 2 or 3, the query mask a random half with an ignore band."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        mask = (torch.rand(size, size, generator=g) > 0.5).long()
        mask[0] = 255
        items.append(dict(query=torch.rand(3, size, size, generator=g) * 2 - 1, query_mask=mask,
                          supports=torch.zeros(2, 3, size, size), support_masks=torch.ones(2, size, size, dtype=torch.long),
                          class_id=torch.tensor(2 + i % 2)))  # fmt: skip
    return items


def test_evaluate_episodes_scores_each_episode_as_a_label_map_of_its_class():
    data = episodes()
    predict = lambda q, s, sm: (q[:, 0] > 0).long()  # noqa: E731
    conf, shown = evaluate_episodes(predict, data, num_labels=4, device=torch.device("cpu"), batch_size=4, keep=3)
    expected = torch.zeros(4, 4, dtype=torch.long)
    for ep in data:  # the loop the function replaces, one episode at a time
        c = int(ep["class_id"])
        target = torch.where(ep["query_mask"] == 255, 255, ep["query_mask"] * c)
        expected += confusion_matrix(predict(ep["query"][None], None, None)[0] * c, target, 4)
    assert torch.equal(conf, expected)
    assert len(shown) == 3 and [t.shape for t in shown[0]] == [(3, 16, 16), (3, 16, 16), (16, 16), (16, 16), (16, 16)]
    assert few_shot_scores(conf, [2, 3])["mIoU"] > 0


def test_evaluate_episodes_scores_several_predictors_in_one_pass():
    data = episodes()
    both = lambda q, s, sm: {"ones": torch.ones_like(q[:, 0], dtype=torch.long), "zeros": torch.zeros_like(q[:, 0], dtype=torch.long)}  # noqa: E731
    conf, _ = evaluate_episodes(both, data, 4, torch.device("cpu"))
    assert set(conf) == {"ones", "zeros"} and conf["zeros"][:, 1:].sum() == 0 and conf["ones"][:, 0].sum() == 0
    with pytest.raises(ValueError, match="masks"):
        evaluate_episodes(lambda q, s, sm: q[:, 0, :4].long(), data, 4, torch.device("cpu"))


def test_bad_support_mask_values_are_refused_before_the_episode_reaches_the_device():
    from unet_seg.data.synthetic import FewShotEpisodes
    from unet_seg.segmentation import episode_tensors

    batch = next(iter(torch.utils.data.DataLoader(FewShotEpisodes(0, 2, fold_split(0)[1], size=32), batch_size=2)))
    out = episode_tensors(batch, "cpu")  # valid
    assert [tuple(t.shape) for t in out] == [(2, 3, 32, 32), (2, 32, 32), (2, 1, 3, 32, 32), (2, 1, 32, 32), (2,)]
    with pytest.raises(ValueError, match=r"support_masks must hold 0/1"):
        episode_tensors({**batch, "support_masks": batch["support_masks"] * 2}, "cpu")
    with pytest.raises(ValueError, match=r"query_mask must hold 0/1"):
        episode_tensors({**batch, "query_mask": batch["query_mask"] + 3}, "cpu")
